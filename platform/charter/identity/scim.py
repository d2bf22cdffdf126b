"""SCIM 2.0 (RFC 7643, 7644): the identity provider provisions and deprovisions users.

Under /scim/v2, for an identity provider's own credential only: an API key of a user of
kind `provisioner` (`charter scim credential`), whose keys open nothing else. Resources are
read and written with `scim2-models`; errors are SCIM's (`urn:...:Error`, `scimType`),
as `application/scim+json`.

What Charter keeps of a User is what it uses: `userName` (Charter's username: lower case;
SCIM compares user names without case), `displayName` (from `name` when a request has no
`displayName`), `active` and `externalId`. The User schema it publishes lists exactly
these, so a client knows the rest (names' parts, e-mails, phone numbers, addresses) is not
kept: data minimisation. `active` is required (Charter has no account that is neither).
`active: false` and DELETE end the person's access at once
(charter.identity.lifecycle.deprovision); `active: true` gives an account back, with no
key, role or team (those are granted again). A user deleted over
SCIM keeps its row and audit trail; SCIM answers 404 for it from then on.

The quirks providers are known to send are accepted: Entra ID's `"active": "False"` (a
string) and PATCH paths in any case, Okta's PATCH `replace` without a path.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any

from flask import Blueprint, Response, g, request
from pydantic import ValidationError
from scim2_models import (
    Context,
    EnterpriseUser,
    Group,
    GroupMember,
    ListResponse,
    Meta,
    PatchOp,
    Required,
    ResourceType,
    ResponseParameters,
    Schema,
    ServiceProviderConfig,
    User,
)
from sqlalchemy import delete, func, select

from charter import scope
from charter.actor import Actor
from charter.db import utcnow
from charter.errors import CharterError
from charter.identity import lifecycle
from charter.identity.models import ScimGroup, ScimGroupMember
from charter.identity.models import User as UserRow
from charter.identity.service import _USERNAME
from charter.identity.sso import sync_groups
from charter.uow import record, refuse, unit_of_work

bp = Blueprint("scim", __name__, url_prefix="/scim/v2")

# What a request is read as: the core User, with the enterprise extension Entra ID sends
# known (and not kept).
ScimUser = User[EnterpriseUser]

SCIM_JSON = "application/scim+json"
MAX_COUNT = 200  # resources a page holds at most
MAX_FILTER = 500  # characters a filter may have
KEPT = ("userName", "displayName", "active", "externalId")
# The one filter Charter answers: `<attribute> eq "<value>"`, on the attributes providers
# look resources up by (the tables below); anything else is 400 invalidFilter.
_EQ = re.compile(r'^\s*([A-Za-z.]+)\s+eq\s+"((?:[^"\\]|\\.){0,400})"\s*$')


class ScimError(CharterError):
    """An error in SCIM's shape: `scim_type` is RFC 7644's scimType, where one applies."""

    def __init__(self, message: str, *, status: int, scim_type: str | None = None,
                 code: str = "scim_error") -> None:
        super().__init__(message, code=code, status=status)
        self.scim_type = scim_type


def error_response(exc: CharterError) -> Response:
    """Any refusal on /scim/v2, in SCIM's error shape."""
    body: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                            "status": str(exc.status), "detail": exc.message}
    scim_type = exc.scim_type if isinstance(exc, ScimError) else {
        409: "uniqueness", 412: None}.get(exc.status)
    if scim_type:
        body["scimType"] = scim_type
    import json

    out = Response(json.dumps(body), status=exc.status, mimetype=SCIM_JSON)
    if exc.status == 401:
        out.headers["WWW-Authenticate"] = 'Bearer realm="charter-scim"'
    return out


def _provisioner() -> Actor:
    actor: Actor | None = g.get("actor")
    if actor is None:
        raise ScimError("authentication required: the identity provider's SCIM credential",
                        status=401, code="unauthenticated")
    if actor.kind != "provisioner":
        refuse(ScimError("SCIM is for the identity provider's credential only "
                         "(`charter scim credential`)", status=403, code="forbidden")
               .audited(actor.ref, "scim.access", "scim", request.path[:200]))
    return actor


def _recorded(view: Callable[..., Response]) -> Callable[..., Response]:
    """A change the provider asked for and Charter refused is an audit event
    (`scim.refused`: the method and path, the code and why), written once the refusal
    has changed nothing."""

    @wraps(view)
    def run(**kwargs: Any) -> Response:
        try:
            return view(**kwargs)
        except ScimError as exc:
            actor: Actor | None = g.get("actor")
            if actor is None or actor.kind != "provisioner" or exc.audit is not None:
                raise
            exc.details = {**exc.details, "scim_type": exc.scim_type}
            refuse(exc.audited(actor.ref, "scim.refused", "scim",
                               f"{request.method} {request.path}"[:200]))

    return run


def _json(payload: dict[str, Any], status: int = 200, *, etag: str | None = None,
          location: str | None = None) -> Response:
    import json

    out = Response(json.dumps(payload, default=str), status=status, mimetype=SCIM_JSON)
    if etag:
        out.headers["ETag"] = etag
    if location:
        out.headers["Location"] = location
    return out


def _body() -> dict[str, Any]:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ScimError("the body must be a JSON object", status=400, scim_type="invalidSyntax")
    return payload


def _base() -> str:
    public = scope.current().settings.public_url
    return (public.rstrip("/") if public else request.host_url.rstrip("/")) + "/scim/v2"


def _etag(row: UserRow | ScimGroup) -> str:
    return f'W/"{row.row_version}"'


def _if_match(row: UserRow | ScimGroup) -> None:
    """RFC 7644 §3.14: a change with `If-Match` applies only to the version it names."""
    wanted = request.headers.get("If-Match")
    if wanted and wanted.strip() not in ("*", _etag(row), _etag(row).removeprefix("W/")):
        raise ScimError("the resource changed since that version was read", status=412,
                        code="precondition_failed")


def _validated(model: Any, payload: Any, ctx: Context, what: str) -> Any:
    """`payload` read as `model` in SCIM's context `ctx`; 400 invalidValue if it is not one."""
    try:
        return model.model_validate(payload, scim_ctx=ctx)
    except ValidationError as exc:
        raise ScimError(f"the {what} is invalid: {_first(exc)}", status=400,
                        scim_type="invalidValue") from None


def _patch_of(model: Any, quirks: Any) -> Any:
    """The request's PatchOp on `model`, each operation through `quirks` first."""
    payload = _body()
    operations = payload.get("Operations")
    if isinstance(operations, list):
        payload = {**payload, "Operations": [quirks(op) for op in operations]}
    return _validated(PatchOp[model], payload, Context.RESOURCE_PATCH_REQUEST, "patch")


def _patched(patch: Any, resource: Any) -> None:
    """Apply `patch` to `resource` (nothing is stored yet: a failure changes nothing)."""
    try:
        patch.patch(resource)
    except Exception as exc:  # noqa: BLE001 - scim2-models' path and value errors
        raise ScimError(f"the patch cannot be applied: {str(exc)[:300]}", status=400,
                        scim_type=getattr(exc, "scim_type", None) or "invalidPath") from None


def _eq(raw: str, known: Any) -> tuple[str, str]:
    """(attribute in lower case, value) of a filter on one of `known`'s attributes."""
    found = _EQ.match(raw) if len(raw) <= MAX_FILTER else None
    if found is None or found.group(1).lower() not in known:
        raise ScimError(f"the filter is not one Charter answers: one of "
                        f"{', '.join(sorted(known))} `eq` a quoted string (at most "
                        f"{MAX_FILTER} characters)", status=400, scim_type="invalidFilter")
    return found.group(1).lower(), re.sub(r"\\(.)", r"\1", found.group(2))


def _where(query: Any, filters: dict[str, tuple[Any, bool]], attribute: str,
           value: str) -> Any:
    """`query` narrowed to `attribute` = `value` (without case where the table says so)."""
    column, no_case = filters[attribute]
    return query.where(func.lower(column) == value.lower() if no_case else column == value)


def _page(source: Any) -> tuple[int, int]:
    """(startIndex, count) of a list or search, bounded: 1-based, at most MAX_COUNT."""
    try:
        start = int(source.get("startIndex", 1))
        count = int(source.get("count", MAX_COUNT))
    except (TypeError, ValueError):
        raise ScimError("startIndex and count are integers", status=400,
                        scim_type="invalidValue") from None
    return max(1, start), min(MAX_COUNT, max(0, count))


def _listed(model: Any, query: Any, order: Any, build: Any, page: tuple[int, int],
            params: ResponseParameters[Any] | None) -> Response:
    """One page of what `query` selects, each row made a resource by `build`."""
    start, count = page
    with unit_of_work() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(*order).offset(start - 1).limit(count)).all()
        resources = [build(session, r) for r in rows]
    return _answer_list(model, resources, total, start, params)


def _answer_list(model: Any, resources: list[Any], total: int, start: int,
                 params: ResponseParameters[Any] | None = None,
                 ctx: Context = Context.SEARCH_RESPONSE) -> Response:
    return _json(ListResponse[model](total_results=total, start_index=start,
                                     items_per_page=len(resources), resources=resources)
                 .model_dump(scim_ctx=ctx, response_parameters=params))


# --- discovery ------------------------------------------------------------------------------

def _user_schema() -> Schema:
    """The core User schema, with only the attributes Charter keeps."""
    schema = User.to_schema()
    schema.attributes = [a for a in schema.attributes or [] if a.name in KEPT]
    for attribute in schema.attributes:
        if attribute.name == "active":
            attribute.required = Required.true
    return schema


@bp.get("/ServiceProviderConfig")
def service_provider_config() -> Response:
    _provisioner()
    config = ServiceProviderConfig.model_validate({
        "documentationUri": "https://github.com/charter/charter/blob/main/docs/identity.md",
        "patch": {"supported": True}, "bulk": {"supported": False, "maxOperations": 0,
                                             "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_COUNT},
        "changePassword": {"supported": False}, "sort": {"supported": False},
        "etag": {"supported": True},
        "authenticationSchemes": [{"type": "oauthbearertoken", "name": "Bearer token",
                                   "description": "An API key of the provider's own "
                                                  "credential (charter scim credential)",
                                   "primary": True}],
        "meta": {"resourceType": "ServiceProviderConfig",
                 "location": f"{_base()}/ServiceProviderConfig"}})
    return _json(config.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))


def _resource_type(model: Any, name: str) -> ResourceType:
    rt = ResourceType.from_resource(model)
    rt.schema_extensions = None
    rt.meta = Meta(resource_type="ResourceType", location=f"{_base()}/ResourceTypes/{name}")
    return rt


def _types() -> dict[str, ResourceType]:
    return {"User": _resource_type(User, "User"), "Group": _resource_type(Group, "Group")}


@bp.get("/ResourceTypes")
def resource_types() -> Response:
    _provisioner()
    found = list(_types().values())
    return _answer_list(ResourceType, found, len(found), 1,
                        ctx=Context.RESOURCE_QUERY_RESPONSE)


@bp.get("/ResourceTypes/<name>")
def resource_type(name: str) -> Response:
    _provisioner()
    found = _types().get(name)
    if found is None:
        raise ScimError(f"no resource type {name}", status=404, code="not_found")
    return _json(found.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))


def _schemas() -> dict[str, Schema]:
    out = {}
    for schema in (_user_schema(), Group.to_schema()):
        schema.meta = Meta(resource_type="Schema", location=f"{_base()}/Schemas/{schema.id}")
        out[str(schema.id)] = schema
    return out


@bp.get("/Schemas")
def schemas() -> Response:
    _provisioner()
    found = list(_schemas().values())
    return _answer_list(Schema, found, len(found), 1, ctx=Context.RESOURCE_QUERY_RESPONSE)


@bp.get("/Schemas/<path:schema_id>")
def schema(schema_id: str) -> Response:
    _provisioner()
    found = _schemas().get(schema_id)
    if found is None:
        raise ScimError(f"no schema {schema_id}", status=404, code="not_found")
    return _json(found.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE))


# --- users ----------------------------------------------------------------------------------

def _resource(row: UserRow) -> User[Any]:
    created = row.created_at
    return ScimUser(
        id=row.id, external_id=row.external_id, user_name=row.username,
        display_name=row.display_name or None, active=row.active,
        meta=Meta(resource_type="User", created=created,
                  last_modified=row.updated_at or created,
                  location=f"{_base()}/Users/{row.id}", version=_etag(row)))


def _out(row: UserRow, params: ResponseParameters[Any] | None = None) -> dict[str, Any]:
    dumped: dict[str, Any] = _resource(row).model_dump(
        scim_ctx=Context.RESOURCE_QUERY_RESPONSE, response_parameters=params)
    return dumped


def _params(source: Any) -> ResponseParameters[Any] | None:
    """The `attributes` and `excludedAttributes` a request asked for (RFC 7644 §3.9)."""
    found = {k: source[k] for k in ("attributes", "excludedAttributes")
             if source.get(k) not in (None, "", [])}
    if not found:
        return None
    try:
        return ResponseParameters[User[Any]].model_validate(found)
    except ValidationError as exc:
        raise ScimError(f"attributes: {_first(exc)}", status=400,
                        scim_type="invalidValue") from None


# Whom SCIM reads and changes: the provider's people (made over SCIM, or by a first SSO
# sign-in before SCIM was set up); never a local account (an admin's, a break-glass admin).
PROVIDERS_PEOPLE = ("scim", "sso")
_PEOPLE = (UserRow.kind == "user", UserRow.scim_deleted_at.is_(None),
           UserRow.source.in_(PROVIDERS_PEOPLE))
# The filters on users and groups: attribute (lower case) -> (column, compared without case).
USER_FILTERS: dict[str, tuple[Any, bool]] = {
    "username": (UserRow.username, True), "externalid": (UserRow.external_id, False),
    "id": (UserRow.id, False), "emails.value": (UserRow.email, True),
    "emails": (UserRow.email, True)}
GROUP_FILTERS: dict[str, tuple[Any, bool]] = {
    "displayname": (ScimGroup.display_name, False),
    "externalid": (ScimGroup.external_id, False), "id": (ScimGroup.id, False)}


def _live(session: Any, user_id: str) -> UserRow:
    row: UserRow | None = session.get(UserRow, user_id, with_for_update=True)
    if (row is None or row.kind != "user" or row.scim_deleted_at is not None
            or row.source not in PROVIDERS_PEOPLE):
        raise ScimError(f"no user {user_id}", status=404, code="not_found")
    return row


def _parsed(payload: dict[str, Any], ctx: Context) -> User[Any]:
    parsed: User[Any] = _validated(ScimUser, _quirks(payload), ctx, "user")
    return parsed


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"[:300]


def _bool(value: Any) -> Any:
    """Entra ID sends booleans as strings ("True", "False")."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _quirks(payload: dict[str, Any]) -> dict[str, Any]:
    """Entra's string booleans; and `emails` dropped before validation: Charter keeps
    none, and the validator refuses addresses providers do send (Okta's examples use
    `@okta.local`, a special-use domain)."""
    if "active" in payload:
        payload = {**payload, "active": _bool(payload["active"])}
    if "emails" in payload:
        payload = {k: v for k, v in payload.items() if k != "emails"}
    return payload


def _username(resource: User[Any]) -> str:
    name = (resource.user_name or "").strip().lower()
    if not _USERNAME.match(name):
        raise ScimError("userName must be 2-100 characters: letters, digits, . _ @ -",
                        status=400, scim_type="invalidValue", code="invalid_value")
    return name


def _display(resource: User[Any]) -> str:
    name = resource.display_name or (resource.name.formatted if resource.name else None)
    if not name and resource.name and (resource.name.given_name or resource.name.family_name):
        name = " ".join(p for p in (resource.name.given_name, resource.name.family_name) if p)
    return (name or "")[:200]


@bp.post("/Users")
@_recorded
def create_user() -> Response:
    actor = _provisioner()
    resource = _parsed(_body(), Context.RESOURCE_CREATION_REQUEST)
    username = _username(resource)
    with unit_of_work() as session:
        if session.scalar(select(UserRow.id).where(UserRow.username == username)):
            raise ScimError(f"a user named {username!r} exists", status=409,
                            scim_type="uniqueness", code="user_exists")
        row = UserRow(id=str(uuid.uuid4()), username=username, display_name=_display(resource),
                      kind="user", source="scim", external_id=resource.external_id,
                      active=resource.active is not False,
                      role_rows=[])
        session.add(row)
        session.flush()
        record(session, actor=actor.ref, action="user.create", target_type="user",
               target_id=row.id, details={"username": username, "kind": "user",
                                          "via": "scim", "roles": []})
        out = _out(row)
        if not row.active:
            row.deprovisioned_at = utcnow()
        return _json(out, 201, etag=_etag(row), location=out["meta"]["location"])


@bp.get("/Users/<user_id>")
def get_user(user_id: str) -> Response:
    _provisioner()
    with unit_of_work() as session:
        row = _live(session, user_id)
        return _json(_out(row, _params(request.args)), etag=_etag(row))


@bp.get("/Users")
def list_users() -> Response:
    _provisioner()
    return _search(request.args.get("filter"), _page(request.args), _params(request.args))


def _search_body() -> tuple[str | None, tuple[int, int], dict[str, Any]]:
    body = _body()
    raw = body.get("filter")
    if raw is not None and not isinstance(raw, str):
        raise ScimError("filter is a string", status=400, scim_type="invalidFilter")
    return raw, _page(body), body


@bp.post("/Users/.search")
def search_users() -> Response:
    _provisioner()
    raw, page, body = _search_body()
    return _search(raw, page, _params(body))


@bp.post("/.search")
def search_all() -> Response:
    """Users and groups at once (RFC 7644 §3.4.3, at the root): `id` and `externalId`
    filters look in both, `userName` and `emails.value` in users, `displayName` in groups."""
    _provisioner()
    raw, (start, count), body = _search_body()
    users: Any = select(UserRow).where(*_PEOPLE)
    groups: Any = select(ScimGroup)
    if raw is not None:
        attribute, value = _eq(raw, {*USER_FILTERS, *GROUP_FILTERS})
        users = (_where(users, USER_FILTERS, attribute, value)
                 if attribute in USER_FILTERS else None)
        groups = (_where(groups, GROUP_FILTERS, attribute, value)
                  if attribute in GROUP_FILTERS else None)
    with unit_of_work() as session:
        found: list[Any] = []
        if users is not None:
            found += [_resource(r) for r in session.scalars(
                users.order_by(UserRow.created_at, UserRow.id)).all()]
        if groups is not None:
            found += [_group(session, r) for r in session.scalars(
                groups.order_by(ScimGroup.created_at, ScimGroup.id)).all()]
    return _answer_list(ScimUser | Group, found[start - 1:start - 1 + count], len(found),
                        start, _params(body))


def _search(raw: str | None, page: tuple[int, int],
            params: ResponseParameters[Any] | None) -> Response:
    """One page of the users `raw` (a filter Charter answers, or None: all) selects."""
    query = select(UserRow).where(*_PEOPLE)
    if raw is not None:
        query = _where(query, USER_FILTERS, *_eq(raw, USER_FILTERS))
    return _listed(User[Any], query, (UserRow.created_at, UserRow.id),
                   lambda session, row: _resource(row), page, params)


def _apply(actor: Actor, row: UserRow, resource: User[Any], session: Any) -> bool | None:
    """Set what Charter keeps of `resource` on `row`; the new `active` when it changed."""
    username = _username(resource)
    if username != row.username:
        if session.scalar(select(UserRow.id).where(UserRow.username == username,
                                                   UserRow.id != row.id)):
            raise ScimError(f"a user named {username!r} exists", status=409,
                            scim_type="uniqueness", code="user_exists")
        row.username = username
    row.display_name = _display(resource)
    row.external_id = resource.external_id
    # `active` left out (a PUT without it, a PATCH removing it) changes nothing: only an
    # explicit true or false opens or ends an account.
    changed = (resource.active if resource.active is not None
               and resource.active != row.active else None)
    row.row_version += 1
    return changed


def _after(actor: Actor, user_id: str, active: bool | None, started: datetime) -> None:
    """Carry out an `active` change: deprovision (access ends at once) or give back."""
    if active is False:
        lifecycle.deprovision(actor, user_id, via="scim", reason="the identity provider "
                              "deactivated the user", requested_at=started)
    elif active is True:
        with unit_of_work() as session:
            row = session.get(UserRow, user_id, with_for_update=True)
            assert row is not None
            row.active, row.deprovisioned_at = True, None
            row.row_version += 1
            record(session, actor=actor.ref, action="user.reactivate", target_type="user",
                   target_id=row.id, details={"username": row.username, "via": "scim"})


def _answer(user_id: str) -> Response:
    with unit_of_work() as session:
        row = session.get(UserRow, user_id)
        assert row is not None
        return _json(_out(row), etag=_etag(row))


@bp.put("/Users/<user_id>")
@_recorded
def replace_user(user_id: str) -> Response:
    actor, started = _provisioner(), utcnow()
    resource = _parsed(_body(), Context.RESOURCE_REPLACEMENT_REQUEST)
    with unit_of_work() as session:
        row = _live(session, user_id)
        _if_match(row)
        active = _apply(actor, row, resource, session)
        session.flush()
        record(session, actor=actor.ref, action="user.update", target_type="user",
               target_id=row.id, details={"via": "scim", "op": "replace"})
    _after(actor, user_id, active, started)
    return _answer(user_id)


@bp.patch("/Users/<user_id>")
@_recorded
def patch_user(user_id: str) -> Response:
    actor, started = _provisioner(), utcnow()
    patch = _patch_of(ScimUser, _op_quirks)  # Entra's string booleans, Okta's path-less
    with unit_of_work() as session:
        row = _live(session, user_id)
        _if_match(row)
        resource = _resource(row)
        _patched(patch, resource)
        active = _apply(actor, row, resource, session)
        session.flush()
        record(session, actor=actor.ref, action="user.update", target_type="user",
               target_id=row.id, details={"via": "scim", "op": "patch",
                                          "paths": [str(o.path) for o in patch.operations or []
                                                    if o.path is not None][:20]})
    _after(actor, user_id, active, started)
    return _answer(user_id)


def _op_quirks(op: Any) -> Any:
    if not isinstance(op, dict):
        return op
    op = {**op}
    if isinstance(op.get("op"), str):
        op["op"] = op["op"].lower()
    path = op.get("path")
    if isinstance(path, str) and path.lower() == "active":
        op["path"], op["value"] = "active", _bool(op.get("value"))
    if path is None and isinstance(op.get("value"), dict):
        op["value"] = _quirks(op["value"])
    return op


@bp.delete("/Users/<user_id>")
@_recorded
def delete_user(user_id: str) -> Response:
    actor, started = _provisioner(), utcnow()
    with unit_of_work() as session:
        row = _live(session, user_id)
        _if_match(row)
    lifecycle.deprovision(actor, user_id, via="scim", reason="the identity provider deleted "
                          "the user", requested_at=started)
    with unit_of_work() as session:
        gone = session.get(UserRow, user_id, with_for_update=True)
        assert gone is not None
        gone.scim_deleted_at = utcnow()
        gone.row_version += 1
        record(session, actor=actor.ref, action="user.scim_delete", target_type="user",
               target_id=gone.id, details={"username": gone.username})
    return Response(status=204)



# --- groups: a provider's groups, mapped to roles and teams ---------------------------------

def sync_user(session: Any, user: UserRow, actor: Actor) -> None:
    """Bring a member's roles and provider-granted teams in line with the display names of
    the SCIM groups it is in, through the role and team maps (as an SSO sign-in's groups
    claim does). A deactivated user gets nothing."""
    if not user.active or user.kind != "user":
        return
    groups = sorted(session.scalars(select(ScimGroup.display_name).join(
        ScimGroupMember, ScimGroupMember.group_id == ScimGroup.id).where(
        ScimGroupMember.user_id == user.id)).all())
    sync_groups(session, scope.current().settings, user, groups, via="scim", actor=actor.ref)


def _group(session: Any, row: ScimGroup) -> Any:
    members = session.execute(select(UserRow.id, func.coalesce(
        ScimGroupMember.display, UserRow.username)).join(
        ScimGroupMember, ScimGroupMember.user_id == UserRow.id).where(
        ScimGroupMember.group_id == row.id).order_by(UserRow.username)).all()
    return Group(id=row.id, external_id=row.external_id, display_name=row.display_name,
                 members=[GroupMember(value=uid, display=name, type="User",
                                      ref=f"{_base()}/Users/{uid}")  # type: ignore[arg-type]
                          for uid, name in members] or None,
                 meta=Meta(resource_type="Group", created=row.created_at,
                           last_modified=row.updated_at or row.created_at,
                           location=f"{_base()}/Groups/{row.id}", version=_etag(row)))


def _group_out(session: Any, row: ScimGroup,
               params: ResponseParameters[Any] | None = None) -> dict[str, Any]:
    dumped: dict[str, Any] = _group(session, row).model_dump(
        scim_ctx=Context.RESOURCE_QUERY_RESPONSE, response_parameters=params)
    return dumped


def _group_row(session: Any, group_id: str) -> ScimGroup:
    row: ScimGroup | None = session.get(ScimGroup, group_id, with_for_update=True)
    if row is None:
        raise ScimError(f"no group {group_id}", status=404, code="not_found")
    return row


def _resync(session: Any, actor: Actor, user_ids: Any) -> None:
    """Sync the roles and teams of each user whose groups (or a group's name) changed."""
    for user_id in user_ids:
        user = session.get(UserRow, user_id)
        if user is not None:
            sync_user(session, user, actor)


def _name(resource: Any) -> str:
    name = (resource.display_name or "").strip()
    if not 1 <= len(name) <= 200:
        raise ScimError("displayName is 1-200 characters", status=400,
                        scim_type="invalidValue", code="invalid_value")
    return name


def _set_members(session: Any, actor: Actor, row: ScimGroup, resource: Any) -> None:
    """Make the group's members those of `resource`; each user whose groups changed has
    its roles and teams synced. A member that is no user here refuses the whole change."""
    displays = {str(m.value): (m.display or None) for m in resource.members or [] if m.value}
    wanted = set(displays)
    if wanted:
        known = set(session.scalars(select(UserRow.id).where(
            UserRow.id.in_(wanted), *_PEOPLE)).all())
        unknown = sorted(wanted - known)
        if unknown:
            raise ScimError(f"members that are no user here: {', '.join(unknown[:5])}",
                            status=400, scim_type="invalidValue", code="invalid_value")
    current = set(session.scalars(select(ScimGroupMember.user_id).where(
        ScimGroupMember.group_id == row.id)).all())
    for user_id in wanted - current:
        session.add(ScimGroupMember(group_id=row.id, user_id=user_id,
                                    display=(displays[user_id] or "")[:200] or None))
    for user_id in current - wanted:
        session.execute(delete(ScimGroupMember).where(
            ScimGroupMember.group_id == row.id, ScimGroupMember.user_id == user_id))
    session.flush()
    changed = sorted((wanted - current) | (current - wanted))
    _resync(session, actor, changed)
    if changed:
        record(session, actor=actor.ref, action="group.members", target_type="group",
               target_id=row.id, details={"group": row.display_name,
                                          "added": sorted(wanted - current),
                                          "removed": sorted(current - wanted)})


@bp.post("/Groups")
@_recorded
def create_group() -> Response:
    actor = _provisioner()
    resource = _validated(Group, _body(), Context.RESOURCE_CREATION_REQUEST, "group")
    name = _name(resource)
    with unit_of_work() as session:
        if session.scalar(select(ScimGroup.id).where(ScimGroup.display_name == name)):
            raise ScimError(f"a group named {name!r} exists", status=409,
                            scim_type="uniqueness", code="group_exists")
        row = ScimGroup(id=str(uuid.uuid4()), display_name=name,
                        external_id=resource.external_id, created_at=utcnow(), row_version=1)
        session.add(row)
        session.flush()
        record(session, actor=actor.ref, action="group.create", target_type="group",
               target_id=row.id, details={"group": name})
        _set_members(session, actor, row, resource)
        out = _group_out(session, row)
        return _json(out, 201, etag=_etag(row), location=out["meta"]["location"])


@bp.get("/Groups/<group_id>")
def get_group(group_id: str) -> Response:
    _provisioner()
    with unit_of_work() as session:
        row = _group_row(session, group_id)
        return _json(_group_out(session, row, _params(request.args)), etag=_etag(row))


@bp.get("/Groups")
def list_groups() -> Response:
    _provisioner()
    query = select(ScimGroup)
    raw = request.args.get("filter")
    if raw is not None:
        query = _where(query, GROUP_FILTERS, *_eq(raw, GROUP_FILTERS))
    return _listed(Group, query, (ScimGroup.created_at, ScimGroup.id), _group,
                   _page(request.args), _params(request.args))


def _rename(session: Any, actor: Actor, row: ScimGroup, resource: Any) -> None:
    name = _name(resource)
    if name != row.display_name and session.scalar(select(ScimGroup.id).where(
            ScimGroup.display_name == name, ScimGroup.id != row.id)):
        raise ScimError(f"a group named {name!r} exists", status=409,
                        scim_type="uniqueness", code="group_exists")
    renamed = name != row.display_name
    row.display_name, row.external_id = name, resource.external_id
    row.row_version += 1
    session.flush()
    if renamed:  # the maps read the name: every member is synced again
        _resync(session, actor, session.scalars(select(ScimGroupMember.user_id).where(
            ScimGroupMember.group_id == row.id)).all())


@bp.put("/Groups/<group_id>")
@_recorded
def replace_group(group_id: str) -> Response:
    actor = _provisioner()
    resource = _validated(Group, _body(), Context.RESOURCE_REPLACEMENT_REQUEST,
                          "group")
    with unit_of_work() as session:
        row = _group_row(session, group_id)
        _if_match(row)
        _rename(session, actor, row, resource)
        _set_members(session, actor, row, resource)
        record(session, actor=actor.ref, action="group.update", target_type="group",
               target_id=row.id, details={"group": row.display_name, "op": "replace"})
        return _json(_group_out(session, row), etag=_etag(row))


@bp.patch("/Groups/<group_id>")
@_recorded
def patch_group(group_id: str) -> Response:
    actor = _provisioner()
    patch = _patch_of(Group, _member_quirks)
    with unit_of_work() as session:
        row = _group_row(session, group_id)
        _if_match(row)
        resource = _group(session, row)
        _patched(patch, resource)
        _rename(session, actor, row, resource)
        _set_members(session, actor, row, resource)
        record(session, actor=actor.ref, action="group.update", target_type="group",
               target_id=row.id, details={"group": row.display_name, "op": "patch"})
        return _json(_group_out(session, row), etag=_etag(row))


def _member_quirks(op: Any) -> Any:
    """Capitalised ops (Entra ID); a `remove` of `members` with the members to remove as
    its value (Entra ID) becomes one removal per member, by filter (as Okta sends it)."""
    if not isinstance(op, dict):
        return op
    op = {**op}
    if isinstance(op.get("op"), str):
        op["op"] = op["op"].lower()
    value = op.get("value")
    if (op.get("op") == "remove" and isinstance(op.get("path"), str)
            and op["path"].lower() == "members" and isinstance(value, list) and value):
        ids = [v.get("value") for v in value if isinstance(v, dict)]
        if ids and all(isinstance(i, str) and '"' not in i for i in ids):
            op = {"op": "remove", "path": "members[" + " or ".join(
                f'value eq "{i}"' for i in ids) + "]"}
    return op


@bp.delete("/Groups/<group_id>")
@_recorded
def delete_group(group_id: str) -> Response:
    actor = _provisioner()
    with unit_of_work() as session:
        row = _group_row(session, group_id)
        _if_match(row)
        members = list(session.scalars(select(ScimGroupMember.user_id).where(
            ScimGroupMember.group_id == row.id)).all())
        session.execute(delete(ScimGroupMember).where(
            ScimGroupMember.group_id == row.id))
        session.delete(row)
        session.flush()
        _resync(session, actor, members)
        record(session, actor=actor.ref, action="group.delete", target_type="group",
               target_id=group_id, details={"group": row.display_name,
                                            "members": len(members)})
    return Response(status=204)

"""Authentication: an Authorization header to an actor, for the API and the gateway alike.

API keys (`chk_...`) or, with SSO configured, the identity provider's JWT access tokens.
Every failure is audited (never with the token) and counted per client address (as the
trusted proxies report it: `CHARTER_TRUSTED_PROXY_HOPS`); past the limit the address's
failures are answered 429 until the window passes, while valid credentials from it are
still let in: many callers may share one address. The web layer calls
`authenticate_request` once per request and keeps what it returns in its RequestContext;
the gateway calls `authenticate` again on a newer generation when its decision went stale.
"""

from __future__ import annotations

from datetime import datetime

from charter import scope
from charter.actor import Actor
from charter.audit.journal import Event
from charter.context import RequestContext
from charter.errors import CharterError, UnauthenticatedError
from charter.identity.jwt import AccessTokenVerifier
from charter.identity.ratelimit import FailureLimiter
from charter.identity.service import KEY_PREFIX, authenticate_api_key
from charter.identity.sso import provision
from charter.readcache import current_generation
from charter.settings import Settings
from charter.uow import refuse


class Authenticator:
    """A Runtime's authentication state: the failure limiter, the JWT verifier (with its
    JWKS cache), and the API keys whose use this process has recorded lately."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limiter = FailureLimiter(settings.auth_failure_limit,
                                      settings.auth_failure_window_s)
        self.jwt = AccessTokenVerifier(settings) if settings.oidc_issuer else None
        self.key_touches: dict[str, datetime] = {}  # key id -> last_used_at written here


def authenticate_request(rc: RequestContext, header: str, *,
                         optimistic: bool) -> tuple[Actor | None, int | None]:
    """The actor behind `header` (None: no header; the operation decides) and the read
    cache generation it was read on (None without a header: nothing was read).
    `optimistic` (the gateway's dispatch routes, whose decisions commit only on a current
    generation: charter.readcache) tries the newest generation this process knows first,
    without a database read."""
    rt = scope.current()
    if not header:
        return None, None  # the operation decides: public ones pass, others answer 401
    # An address past its limit is still let in with valid credentials: behind one
    # ingress (or NAT) many callers share it, and one of them guessing must not lock out
    # the rest. Its failures are answered 429 and, past the audited trip, not recorded.
    blocked = rt.authenticator.limiter.retry_after(rc.client)
    try:
        known = rt.readcache.latest if optimistic else None
        if known is not None:
            try:
                return authenticate(rc, header, generation=known, record_failure=False), known
            except UnauthenticatedError:
                pass  # perhaps the cache is behind: decide, and record, on what is current
        generation = current_generation()
        return authenticate(rc, header, generation=generation,
                            record_failure=blocked is None), generation
    except UnauthenticatedError:
        if blocked is None:
            raise
        raise CharterError("too many failed authentications; try again later",
                           code="rate_limited", status=429,
                           details={"retry_after_s": int(blocked) + 1}) from None


def authenticate(rc: RequestContext, header: str, *, generation: int,
                 record_failure: bool = True) -> Actor:
    """The actor behind `header`, read through the read cache of `generation`; or raise
    UnauthenticatedError, recorded (`auth.failed`) and counted against the client."""
    rt = scope.current()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    method = "api_key" if token.startswith(f"{KEY_PREFIX}_") else "jwt"
    try:
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("use `Authorization: Bearer <API key or token>`",
                                       code="invalid_credentials")
        if method == "api_key":
            return authenticate_api_key(token, generation=generation)
        verifier = rt.authenticator.jwt
        if verifier is None:
            raise UnauthenticatedError("invalid API key", code="invalid_credentials")
        claims = verifier.verify(token)
        return provision(rt.settings, claims, via="api")
    except UnauthenticatedError as exc:
        if not record_failure:
            raise
        tripped = exc.status == 401 and rt.authenticator.limiter.fail(rc.client)
        details: dict[str, object] = {"code": exc.code, "method": method, "client": rc.client}
        if tripped:  # this failure reached the limit: said once, in the same event
            details["limited_for_s"] = rt.settings.auth_failure_window_s
        if method == "api_key" and token.count("_") >= 2:
            details["key_id"] = token.split("_", 2)[1][:16]  # the public part only
        refuse(exc.recording(Event.of(actor="anonymous", action="auth.failed",
                                      target_type="auth", target_id=method,
                                      outcome="denied", details=details)))

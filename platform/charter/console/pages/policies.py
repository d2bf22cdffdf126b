"""Policies: the active revision and engine, the data the rules read (licenses, residency,
organisation), and a playground that evaluates an input and shows the decision."""

from __future__ import annotations

import json
from typing import Any

from flask import g, request
from werkzeug.wrappers import Response

from charter.console.blueprint import bp
from charter.console.ui import problems, render
from charter.errors import CharterError, ValidationFailedError
from charter.policy import service as policy

POLICIES = ("admission", "dispatch")
EVALUATORS = ("admin", "steward", "approver")  # as POST /api/v1/policy/evaluate
MAX_INPUT = 64_000  # characters: a playground input, not a bulk upload

# Starting points for the playground: inputs the policies allow (tests/policy_cases).
EXAMPLES: dict[str, dict[str, Any]] = {
    "admission": {
        "version": {
            "id": "v1", "model": "TinyLlama-1.1B-Chat-v1.0", "publisher": "TinyLlama",
            "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "label": "v1.0",
            "source_revision": "fe8a4ea1ffedaf415f4da2f062534de366a451e6",
            "weight_format": "safetensors", "unsafe_weights": False,
            "files": [{"path": "model.safetensors", "size": 10, "sha256": "ab" * 32,
                       "kind": "weights"}],
            "license_declared": "apache-2.0", "license_card": "apache-2.0",
            "base_model": None, "derivation": "original", "datasets": ["slimpajama"],
            "intended_use": "assistant", "risk_tier": "limited",
            "storage_region": "eu-central", "hosting_regions": ["eu-central"]},
        "lineage": {"base_model_approved": False},
    },
    "dispatch": {
        "now": 1780272000,  # 2026-06-01T00:00:00Z: times are seconds since the epoch
        "version": {
            "id": "v1", "model": "TinyLlama-1.1B-Chat-v1.0", "state": "approved",
            "license": "apache-2.0",
            "approval": {"allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
                         "allowed_purposes": ["assistant"],
                         "expires_at": 1798761600, "expires_at_utc": "2027-01-01T00:00:00Z"}},
        "request": {"purpose": "assistant", "data_class": "internal"},
        "caller": {"team": "helpdesk", "entitlements": {
            "models": ["*"], "data_classes": ["*"], "regions": ["*"]}},
        "node": {"id": "n1", "region": "eu-central", "attested_version_id": "v1"},
    },
}


def _page(*, chosen: str, text: str, decision: dict[str, Any] | None = None,
          errors: list[str] | None = None, status: int = 200) -> Response:
    errors = errors or []
    try:
        active: dict[str, Any] | None = policy.describe()
    except CharterError as exc:  # no engine: the page says so instead of failing
        active = None
        errors = [*errors, f"{problems(exc)[0]} ({exc.code})"]
    data = active["data"] if active else {}
    return render("console/pages/policies.html", section="policies", title="Policies",
                  active=active, licenses=dict(sorted(data.get("licenses", {}).items())),
                  residency=data.get("residency", {}), organisation=data.get("organisation", {}),
                  policies=POLICIES, chosen=chosen, text=text, decision=decision,
                  errors=errors, evaluators=EVALUATORS, status=status)


@bp.get("/policies")
def policies() -> Response:
    chosen = request.args.get("policy", "admission")
    chosen = chosen if chosen in POLICIES else "admission"
    return _page(chosen=chosen, text=json.dumps(EXAMPLES[chosen], indent=2))


def _input(text: str) -> dict[str, Any]:
    def bad(message: str) -> ValidationFailedError:
        return ValidationFailedError("the input is not a JSON object", details={"errors": [
            {"field": "input", "code": "invalid_json", "message": message}]})

    if len(text) > MAX_INPUT:
        raise bad(f"at most {MAX_INPUT:,} characters")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not isinstance(value, dict):
        raise bad("the input must be an object ({...})")
    return value


@bp.post("/policies/evaluate")
def policies_evaluate() -> Response:
    """Evaluate and show the decision on the page itself (no redirect: the result is the
    answer). The decision is audited by the policy service, as the API's is."""
    chosen = request.form.get("policy", "")
    text = request.form.get("input", "")
    target = chosen if chosen in POLICIES else "-"
    g.actor.require(*EVALUATORS, action="policy.evaluate", target_type="policy",
                    target_id=target)
    try:
        if chosen not in POLICIES:
            raise ValidationFailedError("choose a policy", details={"errors": [
                {"field": "policy", "code": "invalid", "message": "admission or dispatch"}]})
        decision = policy.playground(g.actor, chosen, _input(text)).as_dict()
    except CharterError as exc:
        lines = problems(exc)
        return _page(chosen=target if target != "-" else "admission", text=text,
                     errors=[f"{lines[0]} ({exc.code})", *lines[1:]], status=exc.status)
    return _page(chosen=chosen, text=text, decision=decision)

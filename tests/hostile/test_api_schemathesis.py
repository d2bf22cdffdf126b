"""schemathesis against Charter's own OpenAPI document: every operation, all default checks,
authenticated as an admin, as many examples per operation as CHARTER_FUZZ_EXAMPLES says
(100 in CI). Operations run one after another in one test so they share one database."""

from __future__ import annotations

import dataclasses
import os

import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("CHARTER_FUZZ_EXAMPLES", "100"))
# A request the schema allows may still break a rule the schema cannot state (a period whose
# start is after its end, a name already taken, a state that does not allow the action):
# those answer 422 or 409 with the project's error shape, which the other checks still hold
# against the document. Everything else is schemathesis's defaults.
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]}}})


def test_every_operation_keeps_its_contract(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    admin = make_person("admin")
    app = app_for(dataclasses.replace(configured, auth_failure_limit=1_000_000))
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app, config=CONFIG)
    failures: dict[str, str] = {}
    count = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        count += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(headers=admin.headers)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected, all reported at the end
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert count >= 30
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())

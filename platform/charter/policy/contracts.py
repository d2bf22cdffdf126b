"""Input contracts: each decision document's JSON Schema, checked before any engine.

The policies' own guards (`_valid_input` in the Rego) stay, but engines differ on malformed
input (one raises, the other iterates nothing; docs/policy.md), so Charter decides what is
well-formed itself, once, in Python: an input outside its contract is decided here, denied
with `input_invalid` naming the JSON path, and no engine sees it. The schemas travel with
the policy bundle (`policies/schemas/<policy>.input.json`) and are published in
docs/policy.md. Compiled once a bundle (jsonschema-rs, Rust): a check costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from charter.errors import ConfigurationError
from charter.policy.bundle import PolicyBundle


@dataclass(frozen=True)
class Breach:
    path: str  # JSON Pointer of the offending value ("" for the document itself)
    message: str

    @property
    def violation(self) -> dict[str, str]:
        where = self.path or "the input"
        return {"code": "input_invalid",
                "msg": f"the input does not meet its contract at {where}: {self.message}"}


class Contracts:
    """The compiled input contracts of one bundle."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self._validators: dict[str, Any] = {}
        for policy, schema in bundle.schemas.items():
            try:
                self._validators[policy] = jsonschema_rs.validator_for(schema)
            except (ValueError, jsonschema_rs.ValidationError) as exc:
                raise ConfigurationError(f"schemas/{policy}.input.json: {exc}",
                                         code="policy_schema_invalid") from exc

    def check(self, policy: str, input_doc: Any) -> Breach | None:
        """The first way `input_doc` breaks the contract of `policy`, or None (also when
        the bundle has no contract for it)."""
        validator = self._validators.get(policy)
        if validator is None or validator.is_valid(input_doc):
            return None
        error = next(iter(validator.iter_errors(input_doc)))
        path = "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}"
                       for p in error.instance_path)
        return Breach(path, error.message[:300])

"""One frozen Settings object, parsed strictly from CHARTER_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from charter.errors import ConfigurationError

PREFIX = "CHARTER_"


def _setting(default: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "secret": secret})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting Charter reads; docs/configuration.md is generated from this class."""

    database_url: str = _setting(
        "sqlite:///charter.db",
        "SQLAlchemy URL of the database. SQLite is the embedded default; use "
        "`postgresql+psycopg://user@host/db` in production.",
    )
    demo: bool = _setting(
        False,
        "Embedded demo mode: allows the built-in demo secret key. Never set in production.",
    )
    secret_key: str = _setting(
        "",
        "Key that signs console sessions. Required outside demo mode; at least 32 characters.",
        secret=True,
    )
    max_body_bytes: int = _setting(
        1_048_576, "Largest request body accepted, in bytes; larger bodies answer 413."
    )
    log_level: str = _setting("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.")
    log_format: str = _setting(
        "json", "Log format: `json` (one JSON object a line) or `console` (human-readable)."
    )
    db_pool_size: int = _setting(5, "Connections kept in the database pool (PostgreSQL).")
    db_pool_timeout_s: float = _setting(
        5.0, "Seconds to wait for a pooled database connection before answering 503."
    )
    schema_check: bool = _setting(
        True,
        "Refuse to start when the database schema is not at the revision this code expects.",
    )
    api_key_default_ttl_days: int = _setting(
        90, "Days an API key stays valid when its creator gives no expiry."
    )
    policy_backend: str = _setting(
        "inprocess",
        "Policy engine: `inprocess` (regorus, the embedded default) or `remote` (an OPA "
        "server over its REST Data API, e.g. the OPA sidecar).",
    )
    policy_dir: str = _setting(
        "", "Directory of Rego policies and data/*.json; empty means the bundled `policies/`."
    )
    opa_url: str = _setting(
        "http://127.0.0.1:8181", "Base URL of the OPA server (remote backend only)."
    )
    opa_timeout_s: float = _setting(
        0.5, "Seconds to wait for an OPA answer before refusing the action (fail closed)."
    )
    opa_push_policies: bool = _setting(
        True,
        "Load the policies and data into OPA at start (off when OPA loads the same bundle "
        "itself; Charter still checks the revision OPA holds).",
    )
    audit_page_limit: int = _setting(
        500, "Largest page of audit events the API returns at once."
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse CHARTER_* variables; unknown CHARTER_* names and bad values are errors."""
        env = os.environ if environ is None else environ
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, raw in env.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            if name not in known:
                problems.append(f"{key}: unknown setting")
                continue
            try:
                values[name] = _parse(known[name], raw)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        values.update(overrides)
        if problems:
            raise ConfigurationError("invalid configuration", details={"problems": problems})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        problems: list[str] = []
        if self.max_body_bytes < 1024:
            problems.append("CHARTER_MAX_BODY_BYTES: must be at least 1024")
        if self.log_format not in ("json", "console"):
            problems.append("CHARTER_LOG_FORMAT: must be json or console")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append("CHARTER_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
        if self.policy_backend not in ("inprocess", "remote"):
            problems.append("CHARTER_POLICY_BACKEND: must be inprocess or remote")
        if not 0 < self.opa_timeout_s <= 30:
            problems.append("CHARTER_OPA_TIMEOUT_S: must be between 0 and 30 seconds")
        if self.audit_page_limit < 1:
            problems.append("CHARTER_AUDIT_PAGE_LIMIT: must be positive")
        if problems:
            raise ConfigurationError("invalid configuration", details={"problems": problems})

    def require_secret(self) -> None:
        """Serving needs a real secret key; schema and audit commands do not."""
        if not self.demo and len(self.secret_key) < 32:
            raise ConfigurationError(
                "CHARTER_SECRET_KEY is required outside demo mode (at least 32 characters)",
                details={"problems": ["CHARTER_SECRET_KEY: missing or shorter than 32"]},
            )

    @property
    def effective_secret_key(self) -> str:
        # The demo key is public on purpose: demo mode is local and single-user.
        return self.secret_key or ("charter-demo-only-" + "x" * 32 if self.demo else "")


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    return raw


def settings_markdown() -> str:
    """The configuration reference, generated from Settings."""
    lines = [
        "# Configuration",
        "",
        "Generated by `charter config docs` from `platform/charter/settings.py`; do not edit.",
        "Every setting is read from an environment variable. Unknown `CHARTER_*` variables",
        "and malformed values stop Charter at start-up with a message naming each problem.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(Settings):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if f.metadata.get("secret"):
            default = "(none)"
        else:
            default = f"`{f.default}`" if f.default != "" else "(empty)"
        lines.append(f"| `{PREFIX}{f.name.upper()}` | {kind} | {default} | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"

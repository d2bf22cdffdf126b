"""One frozen Settings object, parsed strictly from CHARTER_* environment variables."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from charter.errors import ConfigurationError

PREFIX = "CHARTER_"
_FORBIDDEN_ALGS = {"none", "HS256", "HS384", "HS512"}


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
    opa_load_timeout_s: float = _setting(
        5.0, "Seconds to wait for OPA while Charter loads the policies and data into it, or "
        "checks the revision it holds (OPA compiles every policy on a load)."
    )
    opa_push_policies: bool = _setting(
        True,
        "Load the policies and data into OPA at start (off when OPA loads the same bundle "
        "itself; Charter still checks the revision OPA holds).",
    )
    public_url: str = _setting(
        "",
        "External base URL of Charter (e.g. `https://charter.example.org`); the OIDC "
        "redirect URI is `<public_url>/console/callback`.",
    )
    oidc_issuer: str = _setting(
        "", "OIDC issuer URL; empty disables SSO and JWT access tokens (API keys only)."
    )
    oidc_discovery_url: str = _setting(
        "", "Discovery document URL; empty means `<issuer>/.well-known/openid-configuration`."
    )
    oidc_client_id: str = _setting("", "OIDC client id of the console.")
    oidc_client_secret: str = _setting(
        "", "OIDC client secret of the console (confidential client).", secret=True
    )
    oidc_audience: str = _setting(
        "", "Audience (`aud`) that API access tokens must carry; required with an issuer."
    )
    oidc_algorithms: str = _setting(
        "RS256,PS256,ES256,EdDSA",
        "Comma-separated JWS algorithms accepted for tokens; `none` and HMAC are refused.",
    )
    oidc_scopes: str = _setting("openid profile email", "Scopes the console asks for.")
    oidc_groups_claim: str = _setting(
        "groups", "Claim holding the user's groups (a list, or a space-separated string)."
    )
    oidc_role_map: str = _setting(
        "",
        'JSON object: group -> list of Charter roles, e.g. `{"ai-approvers": ["approver"]}`. '
        "Users with no mapped role get `user`.",
    )
    oidc_team_map: str = _setting(
        "", 'JSON object: group -> team name, e.g. `{"helpdesk-devs": "helpdesk"}`.'
    )
    oidc_leeway_s: int = _setting(30, "Clock skew tolerated on `exp`, `nbf` and `iat`.")
    oidc_jwks_min_refresh_s: float = _setting(
        30.0, "Least seconds between two JWKS fetches triggered by an unknown `kid`."
    )
    oidc_http_timeout_s: float = _setting(
        3.0, "Timeout for requests to the identity provider (discovery, JWKS, tokens)."
    )
    max_token_bytes: int = _setting(8192, "Longest bearer token accepted, in bytes.")
    session_idle_timeout_s: int = _setting(
        900, "Console sessions end after this many seconds without a request."
    )
    session_max_age_s: int = _setting(28800, "Console sessions end this long after login.")
    auth_failure_limit: int = _setting(
        10, "Failed logins or API authentications allowed per client address per window."
    )
    auth_failure_window_s: int = _setting(
        60, "Window of the failed-authentication limit, in seconds."
    )
    trusted_proxy_hops: int = _setting(
        0, "How many proxies in front of Charter (ingress, load balancer) append to "
        "X-Forwarded-For and set X-Forwarded-Proto: the client address is the one that "
        "many hops from the right. 0: trust no header, use the connection's address."
    )
    limits_redis_url: str = _setting(
        "",
        "Redis that keeps the per-team and per-key limits' state (`redis://host:6379/1`, "
        "`rediss://` for TLS), shared by every worker and replica so a limit holds however "
        "many there are. Empty: this process's memory, exact only with one process (the "
        "demo); serving with more workers and no Redis logs a warning at start.",
        secret=True,
    )
    limits_unavailable: str = _setting(
        "refuse",
        "When the limits' Redis cannot be asked: `refuse` (answer 503 `limits_unavailable`, "
        "fail closed) or `allow` (serve unchecked). Either way audited (`limits.unavailable`, "
        "at most once a minute a process) and counted (charter_limits_unavailable_total).",
    )
    limits_timeout_s: float = _setting(
        0.25, "Seconds to wait for the limits' Redis before it counts as unavailable."
    )
    limits_stream_lease_s: float = _setting(
        3600.0, "Longest a stream holds its place under a concurrent-streams limit when its "
        "worker died without giving it back."
    )
    tokenizers_dir: str = _setting(
        "",
        "Folder of the versions' tokenizers, `<model name>/<version label>/tokenizer.json` "
        "(and its config), used offline to count the tokens of answers a node reported no "
        "counts for; a `tokenizer.json` must match the digest the registry pinned. Empty, "
        "or a version without one: a rough count (UTF-8 bytes / 4). Either is marked "
        "estimated.",
    )
    directory_file: str = _setting(
        "",
        "Reconciliation for a provider without SCIM (charter.identity.reconcile): a "
        "directory export of who is still here (CSV or JSON); the provider's people it no "
        "longer lists are deprovisioned every CHARTER_DIRECTORY_INTERVAL_S. Empty: off.",
    )
    directory_interval_s: float = _setting(
        3600.0, "Seconds between reconciliations with the directory export."
    )
    directory_max_removals: float = _setting(
        0.1, "The most of the provider's people one reconciliation may deprovision, as a "
        "fraction; an export that would end more (or lists nobody) changes nothing and is "
        "raised (a truncated export must not end everyone's access)."
    )
    capture_key_file: str = _setting(
        "",
        "Investigation captures (charter.inspection.captures): the file holding the "
        "key-encryption key that wraps each capture's data key (32 random bytes, as "
        "base64 or hex text, or raw; e.g. a mounted Kubernetes secret). The database never "
        "sees it. Empty: no capture can be approved or read.",
    )
    capture_max_hours: int = _setting(
        72, "Longest window an investigation capture may record for, in hours."
    )
    capture_max_retain_days: int = _setting(
        30, "Longest an investigation capture's records may be kept after its window ends, "
        "in days; then they are deleted and the capture's data key destroyed."
    )
    otel_endpoint: str = _setting(
        "",
        "OpenTelemetry tracing: the OTLP/HTTP traces endpoint spans are exported to "
        "(`http://collector:4318/v1/traces`). Empty: tracing off, at no cost.",
    )
    otel_service_name: str = _setting("charter", "The `service.name` of Charter's spans.")
    otel_timeout_s: float = _setting(
        5.0, "Seconds an export of spans may take (in the background, never a request's)."
    )
    node_allowed_networks: str = _setting(
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        "Comma-separated networks inference nodes may live in. Link-local and metadata "
        "addresses are refused whatever this says; loopback only if listed (the demo does).",
    )
    node_connect_timeout_s: float = _setting(2.0, "Seconds to connect to a node.")
    node_agent_timeout_s: float = _setting(
        5.0, "Seconds a node's attestation agent has to answer a challenge; a slower one "
        "quarantines the node (agent_timeout) until the next probe.")
    node_read_timeout_s: float = _setting(
        120.0, "Seconds a node may stay silent while generating before the call fails."
    )
    node_probe_interval_s: float = _setting(
        30.0, "Seconds between node probes (health and attestation)."
    )
    dispatch_max_new_tokens: int = _setting(
        4096, "Largest `max_tokens` / `max_new_tokens` a caller may ask for."
    )
    audit_page_limit: int = _setting(
        500, "Largest page of audit events the API returns at once."
    )
    audit_outcome_linger_s: float = _setting(
        0.2, "Seconds a gateway outcome event may wait to share the next commit before it is "
        "written on its own (decision events never wait: they commit before dispatch)."
    )
    audit_log_origin: str = _setting(
        "charter/audit",
        "The log's name in its signed checkpoints (C2SP origin line); also the signing keys' "
        "name. Make it unique to this installation, e.g. `charter.example.org/audit`.",
    )
    audit_siem_syslog: str = _setting(
        "",
        "Ship every committed audit event to a SIEM as RFC 5424 syslog over TCP: "
        "`tcp://host:port`, or `tls://host:port` (TLS, the server's certificate checked "
        "against CHARTER_AUDIT_SIEM_CA_FILE or the system's CAs). Empty: off.",
    )
    audit_siem_otlp: str = _setting(
        "",
        "Ship every committed audit event as OpenTelemetry logs: the OTLP/HTTP logs "
        "endpoint (`http://collector:4318/v1/logs`). Empty: off.",
    )
    audit_siem_ca_file: str = _setting(
        "", "CA bundle (PEM) that the SIEM's TLS certificate must chain to; empty: the "
        "system's CAs."
    )
    audit_siem_interval_s: float = _setting(
        2.0, "How often the shipper sends the events committed since it last did."
    )
    audit_siem_batch: int = _setting(
        1000, "Most events the shipper sends to a destination in one go."
    )
    audit_siem_timeout_s: float = _setting(
        10.0, "Seconds a destination has to take a batch before the shipment counts as failed."
    )
    audit_signing_keys: str = _setting(
        "",
        "Comma-separated paths of Ed25519 private keys (PKCS#8 PEM, made by `charter audit "
        "keygen`) that sign checkpoints and exports. All of them sign, so a rotation lists "
        "the old and the new key for a while. Empty: no checkpoints (the demo makes a key).",
    )
    audit_seal_key: str = _setting(
        "",
        "Path of the sealing key file (`charter audit sealkey`): every event is sealed with "
        "the current epoch's key, which evolves one way and is rewritten in place as epochs "
        "pass (keep it on writable storage). Its verification key stays with the auditors. "
        "Empty: events are not sealed.",
    )
    audit_verifier_keys: str = _setting(
        "",
        "Comma-separated verifier keys (`name+id+base64`, as `charter audit keygen` prints) "
        "that checkpoints are also trusted under, besides the signing keys': the retired "
        "keys of a rotation. Keys stored in the database are never trusted for this.",
    )
    audit_checkpoint_every: int = _setting(
        1000, "Issue a checkpoint once this many events have been written since the last."
    )
    audit_checkpoint_interval_s: float = _setting(
        60.0, "Issue a checkpoint when events were written and this long has passed since "
        "the last."
    )
    audit_checkpoint_idle_s: float = _setting(
        3600.0, "Issue a checkpoint this often even when no event was written (a fresh "
        "signature on the same tree: the log was not rolled back or forked meanwhile)."
    )
    audit_checkpoint_poll_s: float = _setting(
        5.0, "Seconds between checks whether a checkpoint is due."
    )
    audit_walk_interval_s: float = _setting(
        86400.0, "Seconds between scheduled walks of the whole log (`charter audit verify` "
        "as a task): a broken log raises the integrity alarm as an `audit.integrity_alarm` "
        "event, without waiting for someone to verify. 0 turns it off.",
    )
    audit_retention_days: int = _setting(
        183,
        "Days dispatch events (`dispatch.*` and their policy decisions) are kept; older ones "
        "that a signed checkpoint covers are purged, leaving tombstones so the log still "
        "verifies. 0 keeps them for good. Other events are always kept. The EU AI Act "
        "(Art. 19, 26(6)) asks for at least six months.",
    )
    audit_checkpoint_dir: str = _setting(
        "",
        "Folder that receives a copy of every checkpoint (`<size>-<time>.note`, and "
        "`latest.note`): mount storage the database's administrators cannot write, e.g. an "
        "object store bucket with object lock, so history cannot be rewritten unnoticed.",
    )

    audit_witnesses: str = _setting(
        "",
        "Comma-separated witnesses each checkpoint is submitted to (C2SP tlog-witness), each "
        "`<witness key> <submission URL prefix>`, e.g. `witness.example/w1+1a2b3c4d+BASE64 "
        "https://witness.example/w1`: the key as `charter witness keygen` prints it. Their "
        "cosignatures go into the checkpoints' notes and every export; a witness that "
        "refuses a checkpoint as inconsistent raises the integrity alarm.",
    )
    audit_witness_timeout_s: float = _setting(
        5.0, "Seconds to wait for one witness to answer one submission."
    )

    task_backend: str = _setting(
        "inprocess",
        "Where background tasks (batch lanes, node probes, sweeps, expiry, retention) run: "
        "`inprocess` (threads in the serving process, the embedded default) or `celery` "
        "(Celery workers and beat through `broker_url`).",
    )
    broker_url: str = _setting(
        "",
        "Celery broker (task_backend `celery`): `redis://host:6379/0` or "
        "`amqp://user:password@host:5672//` (RabbitMQ).",
        secret=True,
    )
    task_queue: str = _setting("charter", "Celery queue Charter's tasks are sent to.")
    task_visibility_timeout_s: int = _setting(
        600,
        "Redis broker: seconds before a task taken by a worker that vanished is delivered "
        "again (RabbitMQ redelivers when the worker's connection drops). Batches are safe "
        "either way: their state is in the database and the sweep queues lost lanes again.",
    )
    task_inprocess_threads: int = _setting(
        8, "Threads that run tasks in-process (task_backend `inprocess`)."
    )
    files_max_bytes: int = _setting(
        67_108_864, "Largest file accepted by `POST /v1/files`, in bytes (413 above)."
    )
    batch_max_lines: int = _setting(50_000, "Most lines (requests) one batch input file may hold.")
    batch_lanes: int = _setting(
        8,
        "Lanes per batch: lines of one batch running at once (each lane runs its lines one "
        "after another on a worker thread); the node's batch slots bound them further.",
    )
    batch_lane_s: float = _setting(
        60.0,
        "Seconds a lane runs before it queues itself again (keeps every task shorter than "
        "the broker's redelivery timeout).",
    )
    batch_node_share: float = _setting(
        0.5,
        "Share of a node's `capacity` that batch lines may use at once, across all workers "
        "(at least one slot), so batches never starve online traffic.",
    )
    batch_line_max_attempts: int = _setting(
        3, "Times a batch line is sent to nodes before it is reported failed."
    )
    batch_line_lease_s: int = _setting(
        300,
        "Seconds a worker holds a line it runs; a line whose worker vanished is taken again "
        "after this. Must exceed node_read_timeout_s + batch_slot_wait_s.",
    )
    batch_sweep_interval_s: float = _setting(
        5.0,
        "Seconds between sweeps of running batches (start lost batches, queue lanes whose "
        "worker vanished, honour cancellation and expiry, finalize).",
    )
    batch_slot_wait_s: float = _setting(
        60.0, "Seconds an admitted line waits for a free batch slot on its nodes before the "
        "attempt is given up (recorded as failed; the line is tried again)."
    )
    file_retention_days: int = _setting(
        30,
        "Days the content of batch files (inputs, outputs, errors) is kept; then it is "
        "purged (audited; the file's digest stays).",
    )
    maintenance_interval_s: float = _setting(
        300.0, "Seconds between maintenance rounds: approval expiry, file and audit "
        "retention, the inspection findings' count, and the purge of captures past their "
        "retention."
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
        if not 0 < self.directory_max_removals <= 1:
            problems.append("CHARTER_DIRECTORY_MAX_REMOVALS: a fraction above 0, at most 1")
        if self.directory_interval_s < 60:
            problems.append("CHARTER_DIRECTORY_INTERVAL_S: at least 60 seconds")
        if not 1 <= self.capture_max_hours <= 24 * 31:
            problems.append("CHARTER_CAPTURE_MAX_HOURS: must be between 1 and 744")
        if not 1 <= self.capture_max_retain_days <= 3650:
            problems.append("CHARTER_CAPTURE_MAX_RETAIN_DAYS: must be between 1 and 3650")
        if self.log_format not in ("json", "console"):
            problems.append("CHARTER_LOG_FORMAT: must be json or console")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append("CHARTER_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
        if self.policy_backend not in ("inprocess", "remote"):
            problems.append("CHARTER_POLICY_BACKEND: must be inprocess or remote")
        if not 0 < self.opa_timeout_s <= 30:
            problems.append("CHARTER_OPA_TIMEOUT_S: must be between 0 and 30 seconds")
        if not 0 < self.opa_load_timeout_s <= 300:
            problems.append("CHARTER_OPA_LOAD_TIMEOUT_S: must be between 0 and 300 seconds")
        if self.oidc_issuer and not self.public_url:
            problems.append("CHARTER_PUBLIC_URL: required when CHARTER_OIDC_ISSUER is set "
                            "(the console's redirect URI is built from it)")
        if self.oidc_issuer and not self.oidc_audience:
            problems.append("CHARTER_OIDC_AUDIENCE: required when CHARTER_OIDC_ISSUER is set")
        bad_algs = {a.strip() for a in self.oidc_algorithms.split(",")} & _FORBIDDEN_ALGS
        if bad_algs:
            problems.append(f"CHARTER_OIDC_ALGORITHMS: refused algorithms {sorted(bad_algs)}")
        for name in ("oidc_role_map", "oidc_team_map"):
            raw = getattr(self, name)
            if raw:
                try:
                    parsed = json.loads(raw)
                    assert isinstance(parsed, dict)
                except (ValueError, AssertionError):
                    problems.append(f"CHARTER_{name.upper()}: must be a JSON object")
        if self.audit_page_limit < 1:
            problems.append("CHARTER_AUDIT_PAGE_LIMIT: must be positive")
        origin = self.audit_log_origin
        if not origin or len(origin) > 100 or not origin.isprintable() or any(
                c.isspace() or c == "+" for c in origin):
            problems.append("CHARTER_AUDIT_LOG_ORIGIN: 1-100 printable characters, no spaces "
                            "or '+'")
        if self.audit_walk_interval_s < 0:
            problems.append("CHARTER_AUDIT_WALK_INTERVAL_S: 0 (off) or a number of seconds")
        if self.audit_retention_days < 0:
            problems.append("CHARTER_AUDIT_RETENTION_DAYS: 0 (keep) or a number of days")
        if self.audit_checkpoint_every < 1 or min(
                self.audit_checkpoint_interval_s, self.audit_checkpoint_idle_s,
                self.audit_checkpoint_poll_s) <= 0:
            problems.append("CHARTER_AUDIT_CHECKPOINT_*: must be positive")
        for key, url in self.witnesses:  # the keys are parsed by charter.audit.witnesses
            if key.count("+") < 2:
                problems.append(f"CHARTER_AUDIT_WITNESSES: {key[:40]!r} is not a witness key")
            if not url.startswith(("http://", "https://")) or " " in url:
                problems.append(f"CHARTER_AUDIT_WITNESSES: {key.split('+')[0]}: an http(s) "
                                "submission URL prefix must follow the key")
        if not 0 < self.audit_witness_timeout_s <= 60:
            problems.append("CHARTER_AUDIT_WITNESS_TIMEOUT_S: must be between 0 and 60 seconds")
        if self.otel_endpoint and not self.otel_endpoint.startswith(("http://", "https://")):
            problems.append("CHARTER_OTEL_ENDPOINT: an http(s) URL of the OTLP traces endpoint")
        if self.limits_unavailable not in ("refuse", "allow"):
            problems.append("CHARTER_LIMITS_UNAVAILABLE: must be refuse or allow")
        if self.limits_redis_url and not self.limits_redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            problems.append("CHARTER_LIMITS_REDIS_URL: a redis://, rediss:// or unix:// URL")
        if not 0 < self.limits_timeout_s <= 10:
            problems.append("CHARTER_LIMITS_TIMEOUT_S: must be between 0 and 10 seconds")
        if self.limits_stream_lease_s <= 0:
            problems.append("CHARTER_LIMITS_STREAM_LEASE_S: must be positive")
        if self.audit_siem_syslog and not self.audit_siem_syslog.startswith(
                ("tcp://", "tls://")):
            problems.append("CHARTER_AUDIT_SIEM_SYSLOG: tcp://host:port or tls://host:port")
        if self.audit_siem_otlp and not self.audit_siem_otlp.startswith(
                ("http://", "https://")):
            problems.append("CHARTER_AUDIT_SIEM_OTLP: an http(s) URL of the OTLP logs endpoint")
        if self.audit_siem_interval_s <= 0 or self.audit_siem_batch < 1 or \
                self.audit_siem_timeout_s <= 0:
            problems.append("CHARTER_AUDIT_SIEM_*: interval, batch and timeout must be positive")
        if self.task_backend not in ("inprocess", "celery"):
            problems.append("CHARTER_TASK_BACKEND: must be inprocess or celery")
        if self.task_backend == "celery" and not self.broker_url.startswith(
                ("redis://", "rediss://", "amqp://", "amqps://")):
            problems.append("CHARTER_BROKER_URL: a redis:// or amqp:// URL is required with "
                            "CHARTER_TASK_BACKEND=celery")
        if not 0 < self.batch_lane_s < self.task_visibility_timeout_s:
            problems.append("CHARTER_BATCH_LANE_S: must be above 0 and below "
                            "CHARTER_TASK_VISIBILITY_TIMEOUT_S")
        if not 0 < self.batch_node_share <= 1:
            problems.append("CHARTER_BATCH_NODE_SHARE: must be above 0 and at most 1")
        if self.batch_line_lease_s <= self.node_read_timeout_s + self.batch_slot_wait_s:
            problems.append("CHARTER_BATCH_LINE_LEASE_S: must exceed CHARTER_NODE_READ_TIMEOUT_S "
                            "+ CHARTER_BATCH_SLOT_WAIT_S (a line still running would be taken "
                            "again)")
        for name in ("task_inprocess_threads", "files_max_bytes", "batch_max_lines",
                     "batch_line_max_attempts", "file_retention_days", "batch_lanes"):
            if getattr(self, name) < 1:
                problems.append(f"CHARTER_{name.upper()}: must be positive")
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
    def role_map(self) -> dict[str, list[str]]:
        return json.loads(self.oidc_role_map) if self.oidc_role_map else {}

    @property
    def team_map(self) -> dict[str, str]:
        return json.loads(self.oidc_team_map) if self.oidc_team_map else {}

    @property
    def signing_key_paths(self) -> list[str]:
        return [p.strip() for p in self.audit_signing_keys.split(",") if p.strip()]

    @property
    def witnesses(self) -> list[tuple[str, str]]:
        """(witness key, submission URL prefix) of each configured witness."""
        out = []
        for entry in self.audit_witnesses.split(","):
            if entry.strip():
                key, _, url = entry.strip().partition(" ")
                out.append((key, url.strip()))
        return out

    @property
    def verifier_keys(self) -> list[str]:
        return [k.strip() for k in self.audit_verifier_keys.split(",") if k.strip()]

    @property
    def node_networks(self) -> list[str]:
        return [n.strip() for n in self.node_allowed_networks.split(",") if n.strip()]

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.oidc_algorithms.split(",") if a.strip()]

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

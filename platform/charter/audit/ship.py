"""The audit log to a SIEM, as it is written: RFC 5424 syslog over TCP or TLS, and
OpenTelemetry logs over OTLP/HTTP.

A periodic task (`charter.audit.ship`, every CHARTER_AUDIT_SIEM_INTERVAL_S) reads the
events committed after each destination's cursor (`audit_shipments`), sends them in
sequence order, and moves the cursor only once the destination confirmed them: OTLP by
its 2xx answer; syslog, which has no acknowledgement, by the receiver closing its side
after our end of stream (it read everything). A failed shipment leaves the cursor where
it was and says why (`last_error`, charter_audit_ship_failures_total, a log line); the
next run sends the same events again. So delivery is at least once and in order; a
receiver dedupes by the `seq` every message carries. The gateway never waits for any of
it: the shipper reads committed rows in its own thread or worker. One shipper at a time
per destination: the cursor's row is locked for the shipment (SKIP LOCKED elsewhere).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import select

from charter import scope
from charter.audit.chain import canonical_json, event_body
from charter.audit.models import AuditEvent, AuditShipment
from charter.db import utcnow
from charter.settings import Settings
from charter.uow import unit_of_work

log = structlog.get_logger("charter.audit.ship")
PEN = 32473  # the structured data's enterprise number (RFC 5612's documentation number)
FACILITY = 13  # log audit (RFC 5424, table 1)
SEVERITY = {"success": 6, "denied": 5, "failure": 4}  # informational, notice, warning
ALARMS = ("audit.integrity_alarm",)  # critical (2)


class ShipError(Exception):
    """A destination did not take (or confirm) a batch."""


@dataclass(frozen=True, slots=True)
class Shipped:
    destination: str
    sent: int
    cursor: int
    error: str | None = None


def destinations(settings: Settings) -> dict[str, str]:
    out = {}
    if settings.audit_siem_syslog:
        out["syslog"] = settings.audit_siem_syslog
    if settings.audit_siem_otlp:
        out["otlp"] = settings.audit_siem_otlp
    return out


def ship(settings: Settings) -> list[Shipped]:
    """One round: each configured destination gets the events after its cursor (at most
    CHARTER_AUDIT_SIEM_BATCH of them)."""
    return [_ship_one(settings, name, target)
            for name, target in destinations(settings).items()]


def _ship_one(settings: Settings, name: str, target: str) -> Shipped:
    rt = scope.current()
    with unit_of_work() as session:
        cursor = session.scalars(select(AuditShipment).where(
            AuditShipment.destination == name).with_for_update(skip_locked=True)).first()
        if cursor is None:
            if session.get(AuditShipment, name) is not None:
                return Shipped(name, 0, -1, "another shipper holds this destination")
            cursor = AuditShipment(destination=name, seq=0)
            session.add(cursor)
            session.flush()
        rows = session.scalars(select(AuditEvent).where(AuditEvent.seq > cursor.seq)
                               .order_by(AuditEvent.seq).limit(settings.audit_siem_batch)
                               ).all()
        if not rows:
            return Shipped(name, 0, cursor.seq)
        started = time.perf_counter()
        try:
            if name == "syslog":
                _send_syslog(settings, target, [syslog_message(settings, r) for r in rows])
            else:
                _send_otlp(settings, target, rows)
        except (ShipError, OSError, ssl.SSLError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            cursor.last_error = error
            cursor.updated_at = utcnow()
            rt.counter("charter_audit_ship_failures_total", "Audit shipments a SIEM "
                       "destination did not take (sent again next round)",
                       ("destination",)).labels(name).inc()
            log.warning("audit shipment failed; it is sent again next round",
                        destination=name, after_seq=cursor.seq, events=len(rows), error=error)
            return Shipped(name, 0, cursor.seq, error)
        cursor.seq = rows[-1].seq
        cursor.last_error = None
        cursor.updated_at = utcnow()
        rt.counter("charter_audit_shipped_events_total", "Audit events a SIEM destination "
                   "confirmed", ("destination",)).labels(name).inc(len(rows))
        rt.histogram("charter_audit_ship_seconds", "Time to send and confirm one batch",
                     ("destination",)).labels(name).observe(time.perf_counter() - started)
        return Shipped(name, len(rows), cursor.seq)


# --- RFC 5424 over TCP (RFC 6587 octet counting) ---------------------------------------------

def _sd_value(value: str) -> str:
    """A structured-data parameter value: `"`, `\\` and `]` escaped (RFC 5424, 6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(text: str, limit: int) -> str:
    """A header field: printable US-ASCII, no space, at most `limit` characters; `-` if
    nothing is left."""
    out = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return out or "-"


def syslog_message(settings: Settings, row: AuditEvent) -> bytes:
    """One event as an RFC 5424 message: facility log audit, severity by outcome, the
    event's own time, the log's origin as host name, its action as MSGID, structured data
    with the sequence number, hash, seal and who, and the event's canonical JSON (the
    bytes its hash covers) as a UTF-8 MSG."""
    severity = 2 if row.action in ALARMS else SEVERITY.get(row.outcome, 6)
    ts = row.ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    params = {"seq": str(row.seq), "hash": row.hash, "actor": row.actor,
              "outcome": row.outcome, "target": f"{row.target_type}:{row.target_id}"}
    if row.event_id:
        params["event_id"] = row.event_id
    pairs = " ".join(f'{k}="{_sd_value(v)}"' for k, v in params.items())
    sd = f"[charter@{PEN} {pairs}]"
    body = canonical_json(event_body(
        seq=row.seq, ts=row.ts, actor=row.actor, action=row.action,
        target_type=row.target_type, target_id=row.target_id, outcome=row.outcome,
        details=row.details, request_id=row.request_id, prev_hash=row.prev_hash))
    head = (f"<{FACILITY * 8 + severity}>1 {ts} {_printable(settings.audit_log_origin, 255)} "
            f"charter - {_printable(row.action, 32)} {sd} ").encode()
    return head + b"\xef\xbb\xbf" + body  # the BOM: the MSG is UTF-8 (RFC 5424, 6.4)


def _send_syslog(settings: Settings, target: str, messages: Sequence[bytes]) -> None:
    parts = urlsplit(target)
    if not parts.hostname or not parts.port:
        raise ShipError(f"not host:port: {target}")
    timeout = settings.audit_siem_timeout_s
    raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if parts.scheme == "tls":
            context = ssl.create_default_context(cafile=settings.audit_siem_ca_file or None)
            sock = context.wrap_socket(raw, server_hostname=parts.hostname)
        sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
        # No acknowledgement in syslog: the end of our stream, then the receiver's close,
        # says it read all of it (a receiver that died resets instead). Over TLS the
        # stream ends at the TCP level too (the TLS state is dropped: what comes back is
        # only waited for, not read).
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while sock.recv(4096):
            if time.monotonic() > deadline:
                raise ShipError("the receiver did not close after the batch")
    finally:
        sock.close()


# --- OTLP logs over HTTP ------------------------------------------------------------------------

def _send_otlp(settings: Settings, endpoint: str, rows: Sequence[AuditEvent]) -> None:
    import httpx
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    def attr(key: str, value: Any) -> Any:
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        return KeyValue(key=key, value=AnyValue(string_value=str(value)))

    records = []
    for row in rows:
        severity = 2 if row.action in ALARMS else SEVERITY.get(row.outcome, 6)
        body = canonical_json(event_body(
            seq=row.seq, ts=row.ts, actor=row.actor, action=row.action,
            target_type=row.target_type, target_id=row.target_id, outcome=row.outcome,
            details=row.details, request_id=row.request_id, prev_hash=row.prev_hash))
        nanos = int(row.ts.timestamp() * 1_000_000) * 1000
        records.append(LogRecord(
            time_unix_nano=nanos, observed_time_unix_nano=time.time_ns(),
            # syslog severity to OpenTelemetry's: 2 -> FATAL(21), 4 WARN(13), 5 INFO2(10),
            # 6 INFO(9)
            severity_number={2: 21, 4: 13, 5: 10}.get(severity, 9),  # type: ignore[arg-type]
            severity_text={2: "FATAL", 4: "WARN", 5: "INFO2"}.get(severity, "INFO"),
            body=AnyValue(string_value=body.decode()),
            attributes=[attr("charter.audit.seq", row.seq), attr("charter.audit.hash", row.hash),
                        attr("charter.audit.action", row.action),
                        attr("charter.audit.actor", row.actor),
                        attr("charter.audit.outcome", row.outcome),
                        attr("charter.audit.event_id", row.event_id or "")]))
    request = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=Resource(attributes=[attr("service.name", "charter"),
                                      attr("charter.audit.origin", settings.audit_log_origin)]),
        scope_logs=[ScopeLogs(log_records=records)])])
    try:
        r = httpx.post(endpoint, content=request.SerializeToString(),
                       headers={"Content-Type": "application/x-protobuf"},
                       timeout=settings.audit_siem_timeout_s)
    except httpx.HTTPError as exc:
        raise ShipError(str(exc)) from None
    if not 200 <= r.status_code < 300:
        raise ShipError(f"the collector answered {r.status_code}: {r.text[:200]}")


def shipment_state() -> list[dict[str, Any]]:
    """Each destination's cursor, for operators (`charter audit ship --status`)."""
    with unit_of_work() as session:
        return [{"destination": s.destination, "seq": s.seq,
                 "updated_at": s.updated_at.isoformat() if s.updated_at else None,
                 "last_error": s.last_error}
                for s in session.scalars(select(AuditShipment))]


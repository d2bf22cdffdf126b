"""Record-keeping export of the gateway's events for a period (EU AI Act Art. 12 logging).

One row per audit event of the dispatch path (`policy.decide` on a deployment,
`dispatch.outcome`, `dispatch.refused`), in seq order, read in keyset pages: nothing is
loaded whole. Each row carries the event's seq and hash so it can be checked against an
audit export. Only what the events record is mapped, plus the model version that the
serving name's deployment binds (serving names are unique and a deployment's version never
changes, and `deployment.create` records the binding).
"""

from __future__ import annotations

import csv
import heapq
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from charter.audit.models import AuditEvent
from charter.audit.service import EventFilter, iter_events, list_events

PAGE = 1000
ACTIONS = {"policy.decide": "decision", "dispatch.outcome": "outcome",
           "dispatch.refused": "refused"}
# The fixed column set, in order (docs/compliance.md maps each to its obligation).
COLUMNS = (
    "seq", "event_hash", "ts", "started_at", "record", "request_id", "caller", "team",
    "serving_name", "model", "model_version", "model_version_id", "source_revision",
    "weights_sha256", "node", "region", "data_class", "purpose", "decision_id", "decision",
    "policy_revision", "policy_engine", "violations", "outcome", "http_status",
    "tokens_in", "tokens_out", "latency_ms", "ttft_ms", "stream", "request_digest",
    "policy_input_digest", "error_code", "error_message", "batch_id", "batch_custom_id",
    "batch_line",
)
# Spreadsheet programs run a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Served:
    """What a serving name's deployment binds: the version and its pinned weights."""

    model: str
    label: str
    version_id: str
    source_revision: str | None
    weights: tuple[str, ...]


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _stream(action: str, since: datetime, until: datetime, after_seq: int,
            through_seq: int) -> Iterator[AuditEvent]:
    return iter_events(EventFilter(action=action, target_type="deployment", since=since,
                                   until=until, after_seq=after_seq, limit=PAGE),
                       through_seq=through_seq)


def dispatch_events(since: datetime, until: datetime, through_seq: int) -> Iterator[AuditEvent]:
    """The dispatch path's events with since <= ts < until and seq <= through_seq, by seq:
    one keyset stream per action (each on the (action, seq) index), merged."""
    first = list_events(EventFilter(since=since, until=until, limit=1))
    if not first:
        return
    start = first[0].seq - 1
    streams = [_stream(a, since, until, start, through_seq) for a in ACTIONS]
    for event in heapq.merge(*streams, key=lambda e: e.seq):
        if event.action == "policy.decide" and event.details.get("policy") != "dispatch":
            continue
        yield event


def record_of(e: AuditEvent, served: dict[str, Served]) -> dict[str, Any]:
    """One event as a row: every column present, None where the event records nothing."""
    d = e.details
    kind = ACTIONS[e.action]
    serving_name = d.get("serving_name") or e.target_id
    bound = served.get(serving_name)
    latency = d.get("latency_ms") if kind == "outcome" else None
    started = (e.ts - timedelta(milliseconds=latency)
               if isinstance(latency, int | float) else None)
    if kind == "decision":
        decision = ("error" if e.outcome == "failure"
                    else "allow" if d.get("allow") else "deny")
        error_code, error_message = d.get("error"), d.get("message")
    elif kind == "refused":
        decision, error_code, error_message = "refused", d.get("code"), d.get("message")
    else:
        decision, error_code, error_message = None, None, d.get("error") or None
    return {
        "seq": e.seq, "event_hash": e.hash, "ts": _iso(e.ts), "started_at": _iso(started),
        "record": kind, "request_id": e.request_id, "caller": e.actor, "team": d.get("team"),
        "serving_name": serving_name,
        "model": bound.model if bound else None,
        "model_version": bound.label if bound else None,
        "model_version_id": bound.version_id if bound else None,
        "source_revision": bound.source_revision if bound else None,
        "weights_sha256": list(bound.weights) if bound else None,
        "node": d.get("node"), "region": d.get("region"),
        "data_class": d.get("data_class"), "purpose": d.get("purpose"),
        "decision_id": d.get("decision_id"), "decision": decision,
        "policy_revision": d.get("policy_revision"), "policy_engine": d.get("engine"),
        "violations": list(d.get("violations") or []),
        "outcome": d.get("outcome"), "http_status": d.get("status"),
        "tokens_in": d.get("tokens_in"), "tokens_out": d.get("tokens_out"),
        "latency_ms": latency, "ttft_ms": d.get("ttft_ms"), "stream": d.get("stream"),
        "request_digest": d.get("request_digest"),
        "policy_input_digest": d.get("input_digest"),
        "error_code": error_code, "error_message": error_message,
        "batch_id": d.get("batch_id"), "batch_custom_id": d.get("custom_id"),
        "batch_line": d.get("line"),
    }


def csv_cell(value: Any) -> str:
    """A cell as text, defused: one that a spreadsheet would run gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = ";".join(str(v) for v in value)
    else:
        text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def as_csv(rows: Iterable[dict[str, Any]], *, rows_per_chunk: int = 200) -> Iterator[str]:
    """RFC 4180 CSV (CRLF line ends, every cell quoted: CR, LF and ESC stay inside quotes)."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        writer.writerow([csv_cell(row[c]) for c in COLUMNS])
        n += 1
        if n % rows_per_chunk == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def as_jsonl(rows: Iterable[dict[str, Any]], *, rows_per_chunk: int = 200) -> Iterator[str]:
    """One JSON object a line, keys in column order; ASCII only (every control character
    and non-ASCII character is a \\u escape)."""
    chunk: list[str] = []
    for row in rows:
        chunk.append(json.dumps({c: row[c] for c in COLUMNS}, separators=(",", ":"))
                     + "\n")
        if len(chunk) >= rows_per_chunk:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)

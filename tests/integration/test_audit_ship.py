"""The audit log shipped to a SIEM as it is written: RFC 5424 syslog to a real receiver
process (TCP and TLS) through an outage of it, and OTLP logs to a real HTTP collector;
nothing lost, nothing out of order per sequence number, the cursor moved only for what
the destination confirmed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from charter.audit import ship
from charter.audit.service import EventFilter, list_events
from tests.audit_support import append_many
from tests.processes import free_port

RECEIVER = Path(__file__).resolve().parents[1] / "siem_receiver.py"
LINE = re.compile(rb'^<(\d+)>1 (\S+) (\S+) charter - (\S+) \[charter@32473 ([^\]]*)\] '
                  rb'\xef\xbb\xbf(\{.*\})$')


class Receiver:
    def __init__(self, tmp: Path, port: int, *tls: str) -> None:
        self.out, self.port, self.tls = tmp / "received.log", port, tls
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Receiver:
        args = [sys.executable, str(RECEIVER), "--port", str(self.port), "--out",
                str(self.out)]
        if self.tls:
            args += ["--cert", self.tls[0], "--key", self.tls[1]]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def messages(self) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        """(PRI, structured data, event) of every line received."""
        out = []
        for line in self.out.read_bytes().splitlines() if self.out.exists() else []:
            m = LINE.match(line)
            assert m is not None, line[:200]
            sd = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(5).decode()))
            out.append((int(m.group(1)), sd, json.loads(m.group(6))))
        return out


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path, free_port())
    yield r
    r.kill()


def _seqs(messages: list[tuple[int, dict[str, str], dict[str, Any]]]) -> list[int]:
    return [int(sd["seq"]) for _, sd, _ in messages]


def test_syslog_through_an_outage_of_the_receiver_loses_nothing(configured, receiver) -> None:  # type: ignore[no-untyped-def]
    settings = dataclasses.replace(configured,
                                   audit_siem_syslog=f"tcp://127.0.0.1:{receiver.port}")
    append_many(5)
    # The receiver is not there yet: nothing moves, and it says why.
    [done] = ship.ship(settings)
    assert done.sent == 0 and done.cursor == 0 and "Connection refused" in (done.error or "")
    assert ship.shipment_state()[0]["last_error"] == done.error
    receiver.start()
    [done] = ship.ship(settings)
    assert (done.sent, done.cursor, done.error) == (5, 5, None)
    assert _seqs(receiver.messages()) == [1, 2, 3, 4, 5]
    # An outage: events written meanwhile wait; then the receiver is back on its port.
    receiver.kill()
    append_many(7, start=5)
    assert ship.ship(settings)[0].error is not None
    append_many(3, start=12)
    receiver.start()
    while ship.ship(settings)[0].sent:
        pass
    received = receiver.messages()
    by_seq = {int(sd["seq"]): event for _, sd, event in received}  # a receiver dedupes
    assert sorted(by_seq) == list(range(1, 16)) and _seqs(received) == sorted(_seqs(received))
    # Each message is the event itself: its canonical bytes hash to the chain's hash.
    stored = {e.seq: e for e in list_events(EventFilter(limit=100))}
    for pri, sd, event in received:
        row = stored[int(sd["seq"])]
        assert sd["hash"] == row.hash and event["seq"] == row.seq and event["actor"] == row.actor
        assert pri == 13 * 8 + 6  # log audit, informational (a success)
    assert ship.shipment_state()[0]["seq"] == 15 and ship.shipment_state()[0]["last_error"] is None


def _self_signed(tmp: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siem.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                __import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(tmp / "cert.pem"), str(tmp / "key.pem")


def test_syslog_over_tls_checks_the_receivers_certificate(configured, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    r = Receiver(tmp_path, free_port(), cert, key).start()
    try:
        append_many(4)
        settings = dataclasses.replace(configured,
                                       audit_siem_syslog=f"tls://127.0.0.1:{r.port}")
        [done] = ship.ship(settings)  # the system's CAs do not know this receiver
        assert done.sent == 0 and "CERTIFICATE_VERIFY_FAILED" in (done.error or "")
        [done] = ship.ship(dataclasses.replace(settings, audit_siem_ca_file=cert))
        assert (done.sent, done.cursor, done.error) == (4, 4, None)
        assert _seqs(r.messages()) == [1, 2, 3, 4]
    finally:
        r.kill()


def test_otlp_logs_move_the_cursor_only_when_the_collector_took_them(configured) -> None:  # type: ignore[no-untyped-def]
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceRequest,
    )

    answers, bodies = [503, 200], []

    class Collector(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(answers.pop(0) if answers else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = dataclasses.replace(
            configured, audit_siem_otlp=f"http://127.0.0.1:{server.server_address[1]}/v1/logs")
        append_many(3)
        [done] = ship.ship(settings)
        assert done.cursor == 0 and "503" in (done.error or "")
        [done] = ship.ship(settings)
        assert (done.sent, done.cursor) == (3, 3)
        request = ExportLogsServiceRequest.FromString(bodies[-1])
        records = request.resource_logs[0].scope_logs[0].log_records
        seqs = [next(a.value.int_value for a in r.attributes if a.key == "charter.audit.seq")
                for r in records]
        assert seqs == [1, 2, 3]
        assert json.loads(records[0].body.string_value)["seq"] == 1
        assert records[0].severity_text == "INFO"
        assert ship.ship(settings)[0].sent == 0  # nothing new: nothing sent
        assert len(bodies) == 2
    finally:
        server.shutdown()

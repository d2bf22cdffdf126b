"""Streams relayed by one event loop per worker (charter.relay), under the real gunicorn
worker of `charter serve` (charter.serving.KeepAliveThreadWorker), between real sockets:
a node that streams, dies, goes quiet or floods; a caller that reads, leaves or stalls;
a worker told to stop. How each stream ended is what its Pump was told."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charter.nodes.client import BodyDecoder, BodyError
from tests.processes import charter_serve, free_port, wait_for_port

APP = '''
import json, os, time
from charter.nodes.client import NodePool
from charter.nodes.ssrf import NodeUrlPolicy
from charter.relay import JOB_KEY, RELAY_KEY, Job, PumpFailed

POOL = NodePool(connect_timeout=2, read_timeout=float(os.environ["READ_TIMEOUT"]))
POLICY = NodeUrlPolicy("127.0.0.0/8")
LOG = os.environ["OUTCOMES"]

class Pump:
    def __init__(self, name):
        self.name, self.fed, self.first = name, 0, False
    def first_byte(self):
        self.first = True
    def feed(self, data):
        self.fed += len(data)
        if b"poison" in data:
            raise PumpFailed("cannot go on", "inspection failed: poison")
        if b"boom" in data:
            raise KeyError("boom")  # a bug in the pump
        return data.upper()
    def rest(self):
        return b""
    def error_event(self, message):
        return b"data: {\\"error\\": \\"" + message.encode() + b"\\"}\\n\\n"
    def finish(self, outcome, error):
        if self.name.startswith("lazy"):
            time.sleep(3)  # a slow outcome write: must not hold up the relay's loop
        with open(LOG, "a") as f:
            f.write(json.dumps({"name": self.name, "outcome": outcome, "error": error,
                                "fed": self.fed, "first": self.first}) + "\\n")

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/plain":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    name = path.strip("/")
    resp = POOL.request(POLICY.resolve(os.environ["NODE"]), "POST", "/" + name, b"{}", {})
    offered = environ.get(RELAY_KEY) is not None
    if offered:
        environ[JOB_KEY] = Job(resp.detach(), Pump(name), POOL.read_timeout)
        body = iter(())
    else:
        body = iter([resp.read()])
    start_response("200 OK", [("Content-Type", "text/event-stream"),
                              ("X-Relayed", str(offered))])
    return body
'''


class Node:
    """A node on a raw socket: each path streams its own way."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sent: dict[str, int] = {}
        self.accepted = 0
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                path = head.split(b" ", 2)[1].decode()
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                rest = head.split(b"\r\n\r\n", 1)[1]
                while len(rest) < length:
                    rest += conn.recv(65536)
                try:
                    keep = self._answer(conn, path.strip("/"))
                except OSError:
                    self.closed.set()
                    return
                if not keep:
                    return

    def _answer(self, conn: socket.socket, name: str) -> bool:
        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        if name == "ten":  # ten events, one chunk each, then the end; kept alive
            conn.sendall(chunked + chunk(b"data: 0\n\n"))  # the first with the head
            for i in range(1, 10):
                time.sleep(0.01)
                conn.sendall(chunk(b"data: %d\n\n" % i))
            conn.sendall(b"0\r\n\r\n")
            return True
        if name == "sized":
            body = b"data: sized\n\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return True
        if name == "dies":  # two events, then the connection breaks mid-chunk
            conn.sendall(chunked + chunk(b"data: 0\n\n") + b"20\r\ndata: 1")
            time.sleep(0.05)
            conn.shutdown(socket.SHUT_RDWR)
            return False
        if name == "quiet":  # one event, then nothing
            conn.sendall(chunked + chunk(b"data: 0\n\n"))
            time.sleep(30)
            return False
        if name in ("poison", "boom"):
            conn.sendall(chunked + chunk(b"data: ok\n\n"))
            time.sleep(0.02)
            conn.sendall(chunk(b"data: %s\n\n" % name.encode()) + b"0\r\n\r\n")
            return True
        if name in ("slow", "flood"):  # until the caller goes away (the relay closes us)
            piece = b"data: " + b"x" * (60_000 if name == "flood" else 10) + b"\n\n"
            conn.sendall(chunked)
            sent = 0
            try:
                while sent < (2000 if name == "flood" else 600):
                    conn.sendall(chunk(piece))
                    sent += 1
                    self.sent[name] = sent
                    time.sleep(0.05 if name == "slow" else 0)
            finally:
                self.sent[name] = sent
            conn.sendall(b"0\r\n\r\n")
            return True
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.stop()


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, outcomes: Path) -> None:
        self.proc, self.port, self.outcomes = proc, port, outcomes

    def ended(self, name: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outcomes.exists():
                for line in self.outcomes.read_text().splitlines():
                    row = json.loads(line)
                    if row["name"] == name:
                        return row
            time.sleep(0.05)
        raise AssertionError(f"no outcome for {name}")


def _serve(tmp_path: Path, node: Node, *, read_timeout: float = 5.0,
           graceful: int = 10, extra: tuple[str, ...] = ()) -> Served:
    (tmp_path / "relayapp.py").write_text(APP)
    port = free_port()
    outcomes = tmp_path / "outcomes.jsonl"
    env = {**os.environ, "NODE": f"http://127.0.0.1:{node.port}", "OUTCOMES": str(outcomes),
           "READ_TIMEOUT": str(read_timeout)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(tmp_path), "-b", f"127.0.0.1:{port}",
         "-w", "1", "--threads", "4", "-k", "charter.serving.KeepAliveThreadWorker",
         "--graceful-timeout", str(graceful), *extra, "relayapp:app"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port)
    return Served(proc, port, outcomes)


@pytest.fixture
def served(tmp_path: Path, node: Node) -> Iterator[Served]:
    s = _serve(tmp_path, node, read_timeout=1.0)
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def _ask(port: int, name: str, *, http: str = "1.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /{name} HTTP/{http}\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    return sock


def _until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """(head, body, whether the last chunk came)"""
    head, _, rest = raw.partition(b"\r\n\r\n")
    decoder = BodyDecoder("chunked")
    return head, decoder.feed(rest), decoder.done


def test_a_stream_is_relayed_whole_and_its_connection_closed(served: Served) -> None:
    with _ask(served.port, "ten") as sock:
        head, body, ended = _dechunk(_read_all(sock))
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"X-Relayed: True" in head and b"Connection: close" in head
    assert b"Transfer-Encoding: chunked" in head
    assert ended
    assert body == b"".join(b"DATA: %d\n\n" % i for i in range(10))
    row = served.ended("ten")
    assert (row["outcome"], row["error"], row["first"]) == ("completed", "", True)


def test_the_node_connection_goes_back_to_the_pool_and_serves_the_next(
        served: Served, node: Node) -> None:
    for _ in range(3):
        with _ask(served.port, "ten") as sock:
            assert _dechunk(_read_all(sock))[2]
    with _ask(served.port, "sized") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert (body, ended) == (b"DATA: SIZED\n\n", True)
    assert served.ended("sized")["outcome"] == "completed"
    assert node.accepted == 1  # one connection to the node, reused by every stream


def test_a_node_dying_mid_stream_ends_it_with_an_error_event(served: Served) -> None:
    with _ask(served.port, "dies") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert body.startswith(b"DATA: 0\n\n") and b'"error": "the model node failed' in body
    assert ended  # the caller's response ends properly, after the error event
    row = served.ended("dies")
    assert row["outcome"] == "aborted" and "IncompleteRead" in row["error"]


def test_a_quiet_node_is_aborted_after_the_read_timeout(served: Served) -> None:
    started = time.monotonic()
    with _ask(served.port, "quiet") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert 0.9 < time.monotonic() - started < 5
    assert body.startswith(b"DATA: 0") and b"error" in body and ended
    row = served.ended("quiet")
    assert row["outcome"] == "aborted" and row["error"].startswith("TimeoutError")


def test_a_pump_that_cannot_go_on_aborts_with_its_message(served: Served) -> None:
    with _ask(served.port, "poison") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert body == b'DATA: OK\n\ndata: {"error": "cannot go on"}\n\n' and ended
    row = served.ended("poison")
    assert (row["outcome"], row["error"]) == ("aborted", "inspection failed: poison")


def test_a_bug_in_a_stream_ends_that_stream_only(served: Served) -> None:
    with _ask(served.port, "boom") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert body == b'DATA: OK\n\ndata: {"error": "the stream failed in the gateway"}\n\n'
    assert ended
    row = served.ended("boom")
    assert row["outcome"] == "aborted" and row["error"].startswith("relay error: KeyError")
    with _ask(served.port, "ten") as sock:  # the loop goes on
        assert _dechunk(_read_all(sock))[2]


def test_a_caller_going_away_cancels_and_closes_the_node(served: Served, node: Node) -> None:
    sock = _ask(served.port, "slow")
    _until(sock, b"DATA: ")
    sock.close()
    row = served.ended("slow")
    assert (row["outcome"], row["error"]) == ("cancelled", "the client went away")
    assert node.closed.wait(5)  # the node saw its connection closed: generation stops
    assert node.sent["slow"] < 600


def test_a_caller_that_stops_reading_holds_the_node_back_then_is_cut_off(
        served: Served, node: Node) -> None:
    sock = _ask(served.port, "flood")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        row = served.ended("flood", timeout=15)
    finally:
        sock.close()
    assert row["outcome"] == "cancelled" and "took nothing" in row["error"]
    # Back-pressure: the node was read no further than the sockets' buffers (loopback's
    # grow to a few MB) and HIGH_WATER hold: 120 MB were on offer.
    assert row["fed"] < 12_000_000, row["fed"]


def test_other_requests_are_answered_while_streams_run(served: Served) -> None:
    streams = [_ask(served.port, "slow") for _ in range(8)]  # more than the 4 threads
    try:
        for s in streams:
            _until(s, b"200 OK")
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _until(sock, b"\r\n\r\nok").endswith(b"\r\n\r\nok")
    finally:
        for s in streams:
            s.close()


def test_outcomes_are_recorded_off_the_relays_loop(served: Served) -> None:
    """A stream whose outcome takes 3 s to record holds up no other stream. (Its answer is
    empty, Content-Length: 0: complete when handed over, it ends at once, not at the
    read timeout.)"""
    with _ask(served.port, "lazy") as sock:
        assert _read_all(sock).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    with _ask(served.port, "ten") as sock:
        _, body, ended = _dechunk(_read_all(sock))
    assert ended and body.endswith(b"DATA: 9\n\n")
    assert time.monotonic() - started < 2
    assert served.ended("ten")["outcome"] == "completed"
    assert served.ended("lazy")["outcome"] == "completed"  # recorded all the same


def test_a_worker_at_its_stream_limit_streams_the_next_the_old_way(tmp_path: Path,
                                                                   node: Node) -> None:
    """`worker_connections` streams open in the relay: the next is streamed on its
    request's thread, whole, and the relay takes streams again once one ends."""
    s = _serve(tmp_path, node, extra=("--worker-connections", "1"))
    try:
        slow = _ask(s.port, "slow")
        try:
            assert b"X-Relayed: True" in _until(slow, b"\r\n\r\n")
            with _ask(s.port, "ten") as sock:
                raw = _read_all(sock)
            assert b"X-Relayed: False" in raw
            assert raw.count(b"data: ") == 10
        finally:
            slow.close()
        assert s.ended("slow")["outcome"] == "cancelled"
        with _ask(s.port, "ten") as sock:
            assert b"X-Relayed: True" in _read_all(sock)
    finally:
        s.proc.terminate()
        s.proc.wait(timeout=30)


def test_http_1_0_callers_are_streamed_the_old_way(served: Served) -> None:
    with _ask(served.port, "sized", http="1.0") as sock:
        raw = _read_all(sock)
    assert b"X-Relayed: False" in raw and raw.endswith(b"data: sized\n\n")


def test_tls_callers_are_streamed_the_old_way(tmp_path: Path, node: Node) -> None:
    """gunicorn's own TLS: the relay does not take an SSL socket."""
    import ssl

    from tests.unit.test_ssrf import _tls_material

    ca_pem, cert_pem, key_pem = _tls_material()
    for name, pem in (("cert.pem", cert_pem), ("key.pem", key_pem), ("ca.pem", ca_pem)):
        (tmp_path / name).write_bytes(pem)
    s = _serve(tmp_path, node, extra=("--certfile", str(tmp_path / "cert.pem"),
                                      "--keyfile", str(tmp_path / "key.pem")))
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="node.test") as tls:
            tls.sendall(b"POST /sized HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            data = _until(tls, b"data: sized\n\n")
        assert b"X-Relayed: False" in data
    finally:
        s.proc.terminate()
        s.proc.wait(timeout=30)


def test_a_stopping_worker_lets_running_streams_finish(tmp_path: Path, node: Node) -> None:
    s = _serve(tmp_path, node, graceful=20)
    try:
        sock = _ask(s.port, "slow")  # 600 events, 50 ms apart: 30 s
        _until(sock, b"DATA: ")
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        _until(sock, b"DATA: ")  # still flowing after the stop began
        sock.close()
        assert s.ended("slow")["outcome"] == "cancelled"
        assert s.proc.wait(timeout=25) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_streams_past_the_grace_period_are_cut_off_and_recorded(tmp_path: Path,
                                                                node: Node) -> None:
    s = _serve(tmp_path, node, graceful=3)
    try:
        sock = _ask(s.port, "slow")
        _until(sock, b"DATA: ")
        s.proc.send_signal(signal.SIGTERM)
        row = s.ended("slow", timeout=10)
        assert (row["outcome"], row["error"]) == ("cancelled", "the server stopped before "
                                                               "the end")
        s.proc.wait(timeout=10)
        sock.close()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


# --- the body decoder ---------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       ext=st.booleans())
def test_chunked_bodies_decode_however_they_are_split(pieces: list[bytes], cuts: list[int],
                                                      ext: bool) -> None:
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=y" if ext else b"", p) for p in pieces)
    wire += b"0\r\nTrailer: t\r\n\r\n" if ext else b"0\r\n\r\n"
    decoder = BodyDecoder("chunked")
    out, last = b"", 0
    for cut in sorted({c for c in cuts if c < len(wire)}) + [len(wire)]:
        out += decoder.feed(wire[last:cut])
        last = cut
    assert out == b"".join(pieces) and decoder.done
    assert decoder.feed(b"junk after the end") == b""


def test_lengths_and_closes_and_bad_framing() -> None:
    sized = BodyDecoder(5)
    assert sized.feed(b"abc") == b"abc" and not sized.done and not sized.at_eof()
    assert sized.feed(b"defgh") == b"de" and sized.done
    assert BodyDecoder(0).done
    closing = BodyDecoder(None)
    assert closing.feed(b"anything") == b"anything" and closing.at_eof() and not closing.done
    with pytest.raises(BodyError, match="bad chunk size"):
        BodyDecoder("chunked").feed(b"zz\r\n")
    with pytest.raises(BodyError, match="longer than its size"):
        BodyDecoder("chunked").feed(b"2\r\nabc\r\n")
    with pytest.raises(BodyError, match="too long"):
        BodyDecoder("chunked").feed(b"1" * 5000)


# --- through the gateway, under `charter serve` ---------------------------------------------

def test_the_gateway_relays_streams_undercharter_serve(configured, make_person,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    """Official clients stream through `charter serve`: each stream is relayed (its answer
    says Connection: close), arrives whole, and its outcome is audited with its tokens."""
    import httpx
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    from charter.audit.service import EventFilter, list_events
    from tests.batch_support import make_world

    world = make_world(configured, make_person)
    proc, url = charter_serve(configured.database_url, tmp_path)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=world.key, max_retries=0)
        chunks = list(client.chat.completions.create(
            model="m", max_tokens=8, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "relayed"}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: relayed"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert {c.model for c in chunks} == {"m"}  # the serving name, as the caller asked
        tgi = InferenceClient(base_url=url + "/tgi/m", api_key=world.key)
        pieces = list(tgi.text_generation("tgi relayed", max_new_tokens=8, stream=True))
        assert "".join(pieces).startswith("echo: tgi relayed")  # (the stub's </s> too)
        with httpx.stream("POST", url + "/v1/chat/completions", headers=world.headers,
                          json={"model": "m", "stream": True, "max_tokens": 8,
                                "messages": [{"role": "user", "content": "raw"}]},
                          timeout=10) as resp:
            assert resp.headers["connection"] == "close"  # the relay's answer
            assert resp.headers["x-charter-decision-id"]
            body = resp.read()
        assert body.endswith(b"data: [DONE]\n\n")
        deadline = time.monotonic() + 10
        outcomes: list[Any] = []
        while time.monotonic() < deadline and len(outcomes) < 3:
            outcomes = [e for e in list_events(EventFilter(action="dispatch.outcome"))
                        if e.details.get("stream")]
            time.sleep(0.1)
        assert len(outcomes) == 3, outcomes
        assert {e.details["outcome"] for e in outcomes} == {"completed"}
        # Counted as on the threaded path: the node's usage where it reported it (the
        # OpenAI stream that asked for usage: 4), the TGI stream's events, an estimate.
        assert 4 in {e.details["tokens_out"] for e in outcomes}
        assert all(e.details["tokens_out"] > 0 for e in outcomes)
        assert all(e.details["ttft_ms"] is not None for e in outcomes)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        world.node.stop()


def test_a_stream_whose_decision_cannot_be_recorded_is_not_sent(configured, make_person,  # type: ignore[no-untyped-def]
                                                                pg_conn, tmp_path: Path) -> None:
    """Fail closed under the relay too: the audit log refuses the decision, so the stream
    is answered 503 `audit_unavailable` and nothing reaches the node."""
    import httpx

    from tests.audit_support import role_without_audit_insert
    from tests.batch_support import make_world

    world = make_world(configured, make_person)
    with role_without_audit_insert(pg_conn, configured.database_url) as (_, url):
        proc, base = charter_serve(url, tmp_path)
        try:
            for path, body in (
                    ("/v1/chat/completions", {"model": "m", "stream": True, "max_tokens": 4,
                                              "messages": [{"role": "user", "content": "x"}]}),
                    ("/tgi/m/generate_stream", {"inputs": "x",
                                                "parameters": {"max_new_tokens": 4}})):
                r = httpx.post(base + path, headers=world.headers, json=body, timeout=10)
                assert r.status_code == 503, r.text
                error = r.json()  # OpenAI's shape, or TGI's
                code = (error["error"]["code"] if isinstance(error["error"], dict)
                        else error["error_type"])
                assert code == "audit_unavailable", error
            assert world.node.hits == {}  # nothing reached the node
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            world.node.stop()

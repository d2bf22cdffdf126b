"""charter serve's gunicorn worker (charter.serving.KeepAliveThreadWorker) on a real socket:
kept-alive connections are served by the thread that answered them, without starving
other connections, and every gthread rule still holds."""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.serving import LINGER_S
from tests.processes import wait_for_port

APP = '''
import os, threading, time

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/slow":  # held until the test creates the file `release`
        deadline = time.monotonic() + 30
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.01)
    out = f"{threading.get_ident()} {len(body)}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(out)))])
    return [out]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gunicorn(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    (tmp_path / "wsgiapp.py").write_text(APP)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(tmp_path), "-b", f"127.0.0.1:{port}",
         "-w", "1", "--threads", "4", "-k", "charter.serving.KeepAliveThreadWorker",
         "--keep-alive", "5", *extra, "wsgiapp:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port)
    return proc, port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    proc, port = _gunicorn(tmp_path)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(conn: http.client.HTTPConnection, path: str = "/", body: bytes = b"x") -> str:
    conn.request("POST", path, body)
    resp = conn.getresponse()
    assert resp.status == 200
    return resp.read().decode()


def test_a_kept_alive_connection_stays_with_its_thread(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    answers = [_get(conn, body=b"a" * i) for i in range(1, 30)]
    # One thread answered every request of the connection, and read each body whole.
    assert len({a.split()[0] for a in answers}) == 1
    assert [int(a.split()[1]) for a in answers] == list(range(1, 30))


def test_a_quiet_connection_goes_back_to_the_selector_and_still_works(server: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    first = _get(conn)
    time.sleep(LINGER_S + 0.3)  # past the linger: gthread's selector holds it now
    assert _get(conn).split()[1] == first.split()[1]


def test_pipelined_requests_are_all_answered(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        one = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        sock.sendall(one * 3)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 200") < 3 and time.monotonic() < deadline:
            data += sock.recv(65536)
    assert data.count(b"HTTP/1.1 200") == 3


def test_more_kept_alive_connections_than_threads_are_all_served(server: int) -> None:
    """4 threads, at most 3 may linger: 12 busy kept-alive connections all get answers."""
    errors: list[BaseException] = []
    done = [0] * 12

    def client(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
            for _ in range(10):
                _get(conn)
                done[i] += 1
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and done == [10] * 12
    # Lingering threads never hold a connection's request back for long: without a free
    # thread a request would wait out every linger in turn (12 x 10 x 0.25 s).
    assert time.monotonic() - started < 20


def test_a_slow_request_does_not_block_another_connection(server: int,
                                                          tmp_path: Path) -> None:
    """While one connection's request is held in the app, another connection is served:
    the fast answer arrives while the slow request is still held (no clock involved; the
    latency itself is measured in bench/serving.py)."""
    slow = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    fast = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    _get(slow)
    _get(fast)
    answered: list[str] = []
    thread = threading.Thread(target=lambda: answered.append(_get(slow, "/slow")))
    thread.start()
    try:
        _get(fast)  # answered although /slow holds a thread and its connection
        assert thread.is_alive() and answered == []  # ... which it still does
    finally:
        (tmp_path / "release").touch()
    thread.join(timeout=30)
    assert len(answered) == 1


def test_serve_refuses_an_address_something_listens_on(tmp_path: Path) -> None:
    """Each worker's SO_REUSEPORT socket would share the port with another server; a
    second `charter serve` on a busy address fails instead, and says why."""
    from charter.serving import check_address_free

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert "in use" in (check_address_free(f"127.0.0.1:{port}") or "")
        proc = subprocess.run(
            [sys.executable, "-m", "charter.cli", "serve", "--bind", f"127.0.0.1:{port}"],
            env={"PATH": "/usr/bin:/bin", "CHARTER_SECRET_KEY": "k" * 40,
                 "CHARTER_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"},
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "address_in_use" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    # More than one worker and no limits' Redis: said before anything else (docs).
    assert "each worker keeps its own counts" in proc.stdout + proc.stderr
    assert check_address_free(f"127.0.0.1:{port}") is None  # free again once closed
    assert check_address_free("unix:/tmp/x.sock") is None


def test_kept_alive_tls_connections_and_pipelining(tmp_path: Path) -> None:
    """Over TLS, bytes already decrypted sit in the SSL object, not on the socket: the
    waiting thread must see them (a pipelined request is not left waiting)."""
    import ssl

    from tests.unit.test_ssrf import _tls_material

    ca_pem, cert_pem, key_pem = _tls_material()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    proc, port = _gunicorn(tmp_path, "--certfile", str(tmp_path / "cert.pem"),
                           "--keyfile", str(tmp_path / "key.pem"))
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="node.test") as tls:
            # Requests of exactly 8192 bytes, the size gunicorn reads at a time: after the
            # first of a pair (one TLS record), the second is all in the SSL object.
            head = b"POST / HTTP/1.1\r\nHost: node.test\r\nContent-Length: %d\r\n\r\n"
            size = 8192 - len(head % 8000)
            one = head % size + b"b" * size
            assert len(one) == 8192
            answer = re.compile(rb"HTTP/1.1 200 OK\r\n.*?\r\n\r\n(\d+) (\d{4})", re.S)
            answers = b""
            for burst in (1, 2, 1, 2, 3, 1):
                started = time.monotonic()
                tls.sendall(one * burst)
                want = len(answer.findall(answers)) + burst
                while len(answer.findall(answers)) < want:
                    answers += tls.recv(65536)
                assert time.monotonic() - started < 0.2  # answered, not left to a timeout
        bodies = answer.findall(answers)
        assert len(bodies) == 10 and len({thread for thread, _ in bodies}) == 1
        assert {length for _, length in bodies} == {str(size).encode()}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

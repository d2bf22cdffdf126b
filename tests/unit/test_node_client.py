"""The gateway's node connections: pinned, reused only when safe, honest about failures."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from charter.nodes.client import NodeCallError, NodePool
from charter.nodes.ssrf import NodeUrlPolicy
from tests.unit import test_ssrf
from tests.unit.test_ssrf import _redirect_to_metadata, _Server

Handler = Callable[[socket.socket, bytes], bool]  # answers one request; False: close after


class RawNode:
    """A TCP server speaking just enough HTTP/1.1 to script a node's behaviour."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                self.requests.append(head + b"\r\n\r\n" + body)
                if not self.handler(conn, body):
                    return

    def close(self) -> None:
        self.sock.close()


def _answer(conn: socket.socket, _body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 11\r\n\r\n{\"ok\":true}")
    return True


def _answer_then_close(conn: socket.socket, body: bytes) -> bool:
    _answer(conn, body)
    return False  # like a node whose keep-alive timer fired right after answering


def _stream_then_die(conn: socket.socket, _body: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for i in range(3):
        data = b"data: {\"i\": %d}\n\n" % i
        conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
    conn.shutdown(socket.SHUT_RDWR)  # gone mid-stream, no final chunk
    return False


@pytest.fixture
def node_factory() -> Iterator[Callable[[Handler], RawNode]]:
    nodes: list[RawNode] = []

    def make(handler: Handler) -> RawNode:
        nodes.append(RawNode(handler))
        return nodes[-1]

    yield make
    for n in nodes:
        n.close()


@pytest.fixture
def pool() -> Iterator[NodePool]:
    p = NodePool(connect_timeout=2.0, read_timeout=5.0)
    yield p
    p.close()


POLICY = NodeUrlPolicy(["127.0.0.0/8"])
dns = test_ssrf.dns  # the fake resolver for made-up names
tls_node = test_ssrf.tls_node  # a TLS server whose certificate names node.test only
JSON = {"Content-Type": "application/json"}


def test_connections_are_reused_after_a_complete_answer(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(_answer)
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}/base/")
    for _ in range(5):
        resp = pool.request(target, "POST", "/generate", b'{"inputs":"x"}', JSON)
        assert (resp.status, resp.read()) == (200, b'{"ok":true}')
    assert node.connections == 1
    first = node.requests[0]
    assert first.startswith(b"POST /base/generate HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{node.port}".encode() in first
    assert first.endswith(b'{"inputs":"x"}')


def test_a_connection_the_node_closed_is_replaced_transparently(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(_answer_then_close)
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    for _ in range(3):
        resp = pool.request(target, "POST", "/generate", b"{}", JSON)
        assert resp.read() == b'{"ok":true}'
    assert node.connections == 3 and len(node.requests) == 3  # each request sent once


def test_an_unread_stream_is_not_reused_and_closing_it_reaches_the_node(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    closed = threading.Event()

    def endless(conn: socket.socket, _body: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.settimeout(5)
        if conn.recv(1) == b"":
            closed.set()  # what a node sees when the caller gave up: stop generating
        return False

    node = node_factory(endless)
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    resp = pool.request(target, "POST", "/generate_stream", b"{}", JSON)
    assert next(resp.iter_raw()) == b"hello"
    resp.close()
    assert closed.wait(5)
    assert pool._take(("http", "127.0.0.1", node.port, None)) is None


def test_a_node_dying_mid_stream_raises_after_the_bytes_it_sent(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(_stream_then_die)
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    resp = pool.request(target, "POST", "/generate_stream", b"{}", JSON)
    got: list[bytes] = []
    with pytest.raises(NodeCallError) as info:
        for chunk in resp.iter_raw():
            got.append(chunk)
    assert b"".join(got) == b"".join(b'data: {"i": %d}\n\n' % i for i in range(3))
    assert "IncompleteRead" in str(info.value)


def test_an_unreachable_node_is_a_node_call_error(pool) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(NodeCallError) as info:
            pool.request(POLICY.resolve(f"http://127.0.0.1:{port}"), "POST", "/", b"{}", JSON)
    assert "ConnectionRefused" in str(info.value)


def test_a_redirect_is_answered_not_followed(pool) -> None:  # type: ignore[no-untyped-def]
    server = _Server(_redirect_to_metadata)
    try:
        target = POLICY.resolve(f"http://127.0.0.1:{server.port}")
        resp = pool.request(target, "GET", "/health", b"", {})
        assert resp.status == 302
        assert resp.headers["Location"].startswith("http://169.254.169.254/")
        resp.close(reuse=False)
        assert [path for path, _ in server.requests] == ["/health"]  # nothing else fetched
    finally:
        server.close()


def test_tls_goes_to_the_checked_ip_and_verifies_the_node_name(dns, tls_node) -> None:  # type: ignore[no-untyped-def]
    server, client_ctx, seen_sni = tls_node
    dns["node.test"] = ["127.0.0.1"]
    target = POLICY.resolve(f"https://node.test:{server.port}")
    pool = NodePool(connect_timeout=2.0, read_timeout=5.0, context=client_ctx)
    resp = pool.request(target, "GET", "/health", b"", {})
    assert (resp.status, resp.read()) == (200, b"ok")
    assert seen_sni == ["node.test"]
    assert server.requests == [("/health", f"node.test:{server.port}")]
    pool.close()


def test_tls_refuses_a_certificate_for_another_name(dns, tls_node) -> None:  # type: ignore[no-untyped-def]
    server, client_ctx, _ = tls_node
    dns["other.test"] = ["127.0.0.1"]  # same address, but the certificate names node.test
    pool = NodePool(connect_timeout=2.0, read_timeout=5.0, context=client_ctx)
    with pytest.raises(NodeCallError) as info:
        pool.request(POLICY.resolve(f"https://other.test:{server.port}"), "GET", "/health",
                     b"", {})
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert server.requests == []


# --- the client's own HTTP/1.1 parsing ------------------------------------------------------

def _scripted(answer: bytes, *, keep: bool = True) -> Handler:
    def handler(conn: socket.socket, _body: bytes) -> bool:
        conn.sendall(answer)
        return keep
    return handler


def test_interim_answers_are_skipped_and_headers_read_in_any_case(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(_scripted(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Prompt-Tokens: 4\r\nX-Multi: a\r\nx-multi: b\r\n"
        b"Content-Length: 2\r\n\r\nok"))
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    for _ in range(2):  # and the connection is reused after it
        resp = pool.request(target, "POST", "/generate", b"{}", JSON)
        assert resp.status == 200
        assert resp.headers.get("x-prompt-tokens") == resp.headers["X-PROMPT-TOKENS"] == "4"
        assert resp.headers.get("x-multi") == "a, b" and "link" not in resp.headers
        assert resp.read() == b"ok"
    assert node.connections == 1


def test_bodies_to_the_close_and_http_1_0_answers_are_not_reused(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    for answer in (b"HTTP/1.1 200 OK\r\n\r\nall of it", b"HTTP/1.0 200 OK\r\n\r\nall of it",
                   b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\n"
                   b"all of it"):
        node = node_factory(_scripted(answer, keep=False))
        target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
        for _ in range(2):
            assert pool.request(target, "POST", "/g", b"{}", JSON).read() == b"all of it"
        assert node.connections == 2, answer


@pytest.mark.parametrize(("answer", "message"), [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "a malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "a bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, "too large"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "IncompleteRead"),
])
def test_what_is_not_http_is_a_node_call_error(node_factory, pool, answer: bytes,  # type: ignore[no-untyped-def]
                                               message: str) -> None:
    node = node_factory(_scripted(answer, keep=False))
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    with pytest.raises(NodeCallError, match=message):
        pool.request(target, "POST", "/g", b"{}", JSON).read()
    assert pool._take(("http", "127.0.0.1", node.port, None)) is None  # never reused


def test_a_header_value_cannot_add_lines_to_the_request(node_factory, pool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(_answer)
    target = POLICY.resolve(f"http://127.0.0.1:{node.port}")
    with pytest.raises(NodeCallError, match="line break"):
        pool.request(target, "POST", "/g", b"{}", {"X-Request-Id": "a\r\nX-Evil: 1"})
    assert node.requests == []

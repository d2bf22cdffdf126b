"""Gateway calls to inference nodes: HTTP/1.1 on pooled sockets pinned to the checked address.

The gateway's hot path, so a small client of its own: httpx's pool cost about 1 ms of CPU a
request here (its bookkeeping polls every pooled socket), http.client about 0.35 ms (most
of it parsing the answer's headers with the email package); this one writes the request in
one send and parses the head itself. Each connection goes to exactly the IP that
`NodeUrlPolicy.resolve` checked, with the node's own name kept for `Host` and, over https,
for SNI and certificate verification. Redirects are never followed (the caller sees the 3xx
status and treats the node as failed), no proxy or netrc from the environment is consulted,
and a connection is reused only after its previous answer was read to the end. The body's
framing (chunked, a length, or to the close) is removed by one BodyDecoder, for whole
answers, streams read here, and streams the relay reads (`detach`).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping

from charter.nodes.ssrf import ResolvedTarget

_Key = tuple[str, str, int, str | None]  # scheme, ip, port, TLS name
MAX_HEAD = 65536  # an answer's status line and headers
READ_SIZE = 65536


class NodeCallError(Exception):
    """Connecting, sending or reading failed (the node is unreachable or broke off)."""


class _StaleConnection(Exception):
    """The connection broke before any answer: safe to send again on a fresh one."""


class Headers:
    """An answer's headers: looked up by name in any case, kept in the node's order."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._by_name: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            self._by_name[key] = (f"{self._by_name[key]}, {value}" if key in self._by_name
                                  else value)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._by_name.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


class _Connection:
    """One socket to one node address, and the bytes read past the last answer's head."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.buf = b""

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def recv(self) -> bytes:
        assert self.sock is not None
        return self.sock.recv(READ_SIZE)

    def read_head(self) -> tuple[int, Headers, bool]:
        """The status, the headers and whether the node will close after this answer;
        raises _StaleConnection when the connection ended before any byte of it."""
        while True:
            data = self.buf
            while (end := data.find(b"\r\n\r\n")) < 0:
                if len(data) > MAX_HEAD:
                    raise NodeCallError("the node's answer head is too large")
                try:
                    more = self.recv()
                except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                    if not data:
                        raise _StaleConnection() from exc
                    raise
                if not more:
                    if not data:
                        raise _StaleConnection() from ConnectionResetError(
                            "the node closed the connection before answering")
                    raise NodeCallError("the node closed the connection in its answer's head")
                data += more
            head, self.buf = data[:end], data[end + 4:]
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise NodeCallError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the next
            items = []
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise NodeCallError(f"a malformed header line: {line[:60]!r}")
                items.append((name, value.strip()))
            headers = Headers(items)
            connection = (headers.get("connection") or "").lower()
            closes = "close" in connection or (parts[0] == "HTTP/1.0"
                                               and "keep-alive" not in connection)
            return status, headers, closes


def _framing(status: int, headers: Headers) -> str | int | None:
    if status in (204, 304):
        return 0
    if "chunked" in (headers.get("transfer-encoding") or "").lower():
        return "chunked"
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise NodeCallError(f"a bad Content-Length: {length[:30]!r}")
        return int(length)
    return None  # to the close


class NodeResponse:
    """A node's answer; `close()` hands the connection back when it can be reused."""

    def __init__(self, pool: NodePool, key: _Key, conn: _Connection, status: int,
                 headers: Headers, closes: bool) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self.status = status
        self.headers = headers
        framing = _framing(status, headers)
        self._decoder = BodyDecoder(framing)
        self._closes = closes or framing is None
        self._done = False

    def _chunks(self) -> Iterator[bytes]:
        """The body as it arrives, framing removed; NodeCallError if it breaks off."""
        decoder, conn = self._decoder, self._conn
        try:
            ahead, conn.buf = conn.buf, b""
            while True:
                data = ahead or conn.recv()
                ahead = b""
                if not data:
                    if decoder.at_eof():
                        return
                    raise NodeCallError("IncompleteRead: the node closed the connection "
                                        "before the end of its answer")
                out = decoder.feed(data)
                if out:
                    yield out
                if decoder.done:
                    return
        except (OSError, BodyError) as exc:
            self.close(reuse=False)
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        except NodeCallError:
            self.close(reuse=False)
            raise

    def read(self) -> bytes:
        data = b"".join(self._chunks())
        self.close()
        return data

    def iter_raw(self) -> Iterator[bytes]:
        """The body as it arrives (chunked framing removed), without buffering."""
        yield from self._chunks()

    def detach(self) -> Detached:
        """Hand the body over to a reader of the socket itself (charter.relay): the bytes
        read past the head come along, and the socket turns non-blocking."""
        sock = self._conn.sock
        assert sock is not None
        sock.setblocking(False)
        ahead, self._conn.buf = self._conn.buf, b""
        return Detached(self, sock, ahead, self._decoder)

    def close(self, *, reuse: bool = True) -> None:
        """Reuse the connection only after a complete, keep-alive answer; otherwise close
        it, which also tells the node to stop generating."""
        if self._done:
            return
        self._done = True
        if reuse and self._decoder.done and not self._closes and not self._conn.buf:
            self._pool.put(self._key, self._conn)
        else:
            self._conn.close()


class NodePool:
    """Idle keep-alive connections per (scheme, IP, port, TLS name), most recent first."""

    def __init__(self, *, connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext | None = None, max_idle_per_node: int = 256):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.context = context or ssl.create_default_context()
        self.max_idle_per_node = max_idle_per_node
        self._idle: dict[_Key, list[_Connection]] = defaultdict(list)
        self._lock = threading.Lock()

    def request(self, target: ResolvedTarget, method: str, path: str, body: bytes,
                headers: Mapping[str, str]) -> NodeResponse:
        """Send and read the status line and headers; raises NodeCallError."""
        scheme = target.validated.scheme
        tls_name = None if scheme == "http" else (target.sni_hostname or target.ip)
        key: _Key = (scheme, target.ip, target.validated.port, tls_name)
        lines = [f"{method} {target.validated.path.rstrip('/')}{path} HTTP/1.1",
                 f"Host: {target.host_header}", f"Content-Length: {len(body)}"]
        for name, value in headers.items():
            low = name.lower()
            if low in ("host", "content-length", "transfer-encoding", "connection"):
                continue
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise NodeCallError(f"a header with a line break: {name}")
            lines.append(f"{name}: {value}")
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        conn = self._take(key)
        if conn is not None:
            try:
                return self._send(key, conn, message)
            except _StaleConnection:
                pass  # the node closed an idle connection: one more try, on a fresh one
        try:
            return self._send(key, self._new(key), message)
        except _StaleConnection as exc:
            cause = exc.__cause__
            raise NodeCallError(f"{type(cause).__name__}: {cause}") from cause

    def _send(self, key: _Key, conn: _Connection, message: bytes) -> NodeResponse:
        try:
            assert conn.sock is not None
            try:
                conn.sock.sendall(message)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                raise _StaleConnection() from exc
            status, headers, closes = conn.read_head()
        except _StaleConnection:
            conn.close()  # nothing of an answer arrived
            raise
        except (OSError, NodeCallError) as exc:
            conn.close()
            if isinstance(exc, NodeCallError):
                raise
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        return NodeResponse(self, key, conn, status, headers, closes)

    def _new(self, key: _Key) -> _Connection:
        scheme, ip, port, tls_name = key
        try:
            sock = socket.create_connection((ip, port), self.connect_timeout)
        except OSError as exc:
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.read_timeout)
            if scheme == "https":
                # The certificate must name the node's host (or its IP for IP-literal URLs).
                sock = self.context.wrap_socket(sock, server_hostname=tls_name)
        except OSError as exc:
            sock.close()
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(sock)

    def _take(self, key: _Key) -> _Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()  # closed by the node, or it sent bytes nobody asked for

    def put(self, key: _Key, conn: _Connection) -> None:
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self.max_idle_per_node:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _readable(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable was closed (or is out of step)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class BodyError(Exception):
    """A node's body framing that cannot be read (a malformed chunk size line)."""


class BodyDecoder:
    """A response body's framing, removed as bytes arrive (sans I/O, for the stream relay):
    `Transfer-Encoding: chunked`, a `Content-Length`, or (neither) the body runs to the
    connection's close. `feed` returns the body bytes in `data`; `done` is set at the body's
    end (a chunked body's last chunk and trailers, the length reached); `at_eof` says
    whether the connection's close ends the body cleanly."""

    MAX_LINE = 4096  # a chunk size line, or a trailer line

    def __init__(self, framing: str | int | None) -> None:
        self._chunked = framing == "chunked"
        self._left: int | None = framing if isinstance(framing, int) else None
        self._close = framing is None
        self._buf = b""
        self._chunk_left = 0  # bytes of the current chunk's data still to come
        self._state = "size"  # size | data | crlf | trailer (chunked only)
        self.done = self._left == 0

    def at_eof(self) -> bool:
        return self.done or self._close

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if self._close:
            return data
        if not self._chunked:
            assert self._left is not None
            part = data[:self._left]
            self._left -= len(part)
            self.done = self._left == 0
            return part
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        pos = 0
        while pos < len(buf) and not self.done:
            if self._state == "data":
                part = buf[pos:pos + self._chunk_left]
                out.append(part)
                pos += len(part)
                self._chunk_left -= len(part)
                if self._chunk_left == 0:
                    self._state = "crlf"
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > self.MAX_LINE:
                    raise BodyError("a chunk line is too long")
                break
            line = buf[pos:end].rstrip(b"\r")
            pos = end + 1
            if self._state == "crlf":
                if line:
                    raise BodyError("a chunk's data is longer than its size")
                self._state = "size"
            elif self._state == "size":
                size = line.split(b";", 1)[0].strip()
                try:
                    self._chunk_left = int(size, 16)
                except ValueError:
                    raise BodyError(f"a bad chunk size line: {line[:40]!r}") from None
                if self._chunk_left < 0:
                    raise BodyError("a negative chunk size")
                self._state = "trailer" if self._chunk_left == 0 else "data"
            elif not line:  # the blank line after the last chunk's trailers
                self.done = True
        self._buf = buf[pos:] if pos < len(buf) and not self.done else b""
        return b"".join(out)


class Detached:
    """A node's streamed answer taken over by the stream relay: the socket (non-blocking
    from here on), the body bytes already read past the head, and the body's decoder.
    `release(reusable)` ends it: a body read to its end on a keep-alive connection goes
    back to the pool, anything else is closed (which tells the node to stop generating)."""

    def __init__(self, response: NodeResponse, sock: socket.socket, head: bytes,
                 decoder: BodyDecoder) -> None:
        self._response = response
        self.sock = sock
        self.head = head
        self.decoder = decoder

    def release(self, *, reusable: bool) -> None:
        if self._response._done:
            return
        if reusable and self.decoder.done:
            self.sock.settimeout(self._response._pool.read_timeout)
        self._response.close(reuse=reusable)

"""Gateway calls to inference nodes: HTTP/1.1 on pooled sockets pinned to the checked address.

The gateway's hot path. httpx's pool cost about 1 ms of CPU a request here (its bookkeeping
polls every pooled socket); http.client on a reused socket costs a tenth of that. Each
connection goes to exactly the IP that `NodeUrlPolicy.resolve` checked, with the node's own
name kept for `Host` and, over https, for SNI and certificate verification. Redirects are
never followed (the caller sees the 3xx status and treats the node as failed), no proxy or
netrc from the environment is consulted, and a connection is reused only after its previous
response was read to the end.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping

from charter.nodes.ssrf import ResolvedTarget

_Key = tuple[str, str, int, str | None]  # scheme, ip, port, TLS name


class NodeCallError(Exception):
    """Connecting, sending or reading failed (the node is unreachable or broke off)."""


class _StaleConnection(Exception):
    """The connection broke before any answer: safe to send again on a fresh one."""


class _Connection(http.client.HTTPConnection):
    def __init__(self, ip: str, port: int, *, connect_timeout: float, read_timeout: float):
        super().__init__(ip, port, timeout=read_timeout)
        self.connect_timeout = connect_timeout

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        self.sock = sock


class _TlsConnection(_Connection):
    def __init__(self, ip: str, port: int, *, connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext, server_hostname: str):
        super().__init__(ip, port, connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.context = context
        self.server_hostname = server_hostname

    def connect(self) -> None:
        super().connect()
        # The certificate must name the node's host (or its IP for IP-literal URLs).
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.server_hostname)


class NodeResponse:
    """A node's answer; `close()` hands the connection back when it can be reused."""

    def __init__(self, pool: NodePool, key: _Key, conn: _Connection,
                 resp: http.client.HTTPResponse):
        self._pool, self._key, self._conn, self._resp = pool, key, conn, resp
        self.status = resp.status
        self.headers = resp.headers
        self._done = False

    def read(self) -> bytes:
        try:
            data = self._resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close(reuse=False)
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        self.close()
        return data

    def iter_raw(self, size: int = 65536) -> Iterator[bytes]:
        """The body as it arrives (chunked framing removed), without buffering."""
        try:
            while True:
                data = self._resp.read1(size)
                if not data:
                    break
                yield data
        except (OSError, http.client.HTTPException) as exc:
            self.close(reuse=False)
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc

    def detach(self) -> Detached:
        """Hand the body over to a reader of the socket itself (charter.relay): the bytes
        http.client read ahead come along, and the socket turns non-blocking."""
        fp = self._resp.fp
        # An answer that closes its connection took the socket from http.client's
        # connection (`will_close`): its file still holds it.
        sock = self._conn.sock or fp.raw._sock  # type: ignore[attr-defined]  # noqa: SLF001
        sock.setblocking(False)
        # With the socket non-blocking, peek returns what is buffered (or what one read
        # finds) without waiting; reading exactly that takes it from the buffer alone.
        try:
            ahead = fp.peek() if fp is not None else b""
        except ssl.SSLWantReadError:  # TLS: nothing decrypted yet
            ahead = b""
        if ahead:
            fp.read(len(ahead))
        return Detached(self, sock, ahead, _framing(self._resp))

    def close(self, *, reuse: bool = True) -> None:
        """Reuse the connection only after a complete, keep-alive response; otherwise
        close it, which also tells the node to stop generating."""
        if self._done:
            return
        self._done = True
        if reuse and self._resp.isclosed() and not self._resp.will_close:
            self._pool.put(self._key, self._conn)
        else:
            self._resp.close()
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
        merged = {k: v for k, v in headers.items() if k.lower() != "host"}
        merged["Host"] = target.host_header
        url = target.validated.path.rstrip("/") + path
        conn = self._take(key)
        if conn is not None:
            try:
                return self._send(key, conn, method, url, body, merged)
            except _StaleConnection:
                pass  # the node closed an idle connection: one more try, on a fresh one
        try:
            return self._send(key, self._new(key), method, url, body, merged)
        except _StaleConnection as exc:
            cause = exc.__cause__
            raise NodeCallError(f"{type(cause).__name__}: {cause}") from cause

    def _send(self, key: _Key, conn: _Connection, method: str, url: str, body: bytes,
              headers: dict[str, str]) -> NodeResponse:
        try:
            conn.request(method, url, body=body, headers=headers)
            resp = conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected,
                http.client.BadStatusLine) as exc:
            conn.close()  # nothing of an answer arrived
            raise _StaleConnection() from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise NodeCallError(f"{type(exc).__name__}: {exc}") from exc
        return NodeResponse(self, key, conn, resp)

    def _new(self, key: _Key) -> _Connection:
        scheme, ip, port, tls_name = key
        if scheme == "https":
            assert tls_name is not None
            return _TlsConnection(ip, port, connect_timeout=self.connect_timeout,
                                  read_timeout=self.read_timeout, context=self.context,
                                  server_hostname=tls_name)
        return _Connection(ip, port, connect_timeout=self.connect_timeout,
                           read_timeout=self.read_timeout)

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
    """A node's streamed answer taken over from http.client by the stream relay: the socket
    (non-blocking from here on), the body bytes already read ahead and the body's framing.
    `release(reusable)` ends it: a body read to its end on a keep-alive connection goes back
    to the pool, anything else is closed (which tells the node to stop generating)."""

    def __init__(self, response: NodeResponse, sock: socket.socket, head: bytes,
                 framing: str | int | None) -> None:
        self._response = response
        self.sock = sock
        self.head = head
        self.decoder = BodyDecoder(framing)

    def release(self, *, reusable: bool) -> None:
        r = self._response
        if r._done:
            return
        if reusable and self.decoder.done and not r._resp.will_close:
            r._done = True
            self.sock.settimeout(r._pool.read_timeout)
            r._resp.close()  # http.client's side of it: the answer was read (by the relay)
            r._pool.put(r._key, r._conn)
            return
        r.close(reuse=False)


def _framing(resp: http.client.HTTPResponse) -> str | int | None:
    if resp.chunked:
        return "chunked"
    return resp.length  # None: the body runs to the close

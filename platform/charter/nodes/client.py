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

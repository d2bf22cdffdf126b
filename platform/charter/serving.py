"""The gunicorn worker that `charter serve` runs: gthread, with kept-alive connections
served by the thread that answered them.

gunicorn's gthread worker hands every kept-alive connection back to its main thread after
each response: the thread pool's done-callback writes to a pipe, the main thread wakes,
registers the socket with its selector, wakes again when the next request arrives, takes
the socket out and submits it to the pool again. That is two thread hand-offs and about
ten system calls per request, and at c=1 a few hundred microseconds of latency.

Here the thread that wrote a response waits on the same socket, up to LINGER_S, for the
connection's next request and serves it at once, while enough of the pool stays free for
new connections (at most LINGER_SHARE of the threads linger). A connection that stays quiet
goes back to gunicorn's selector as before, so idle keep-alive connections still cost no
thread, and every limit of gthread (keepalive timeout, worker_connections, graceful
stop, max_requests) applies unchanged: each request is still served by
ThreadWorker.handle.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.workers.gthread import ThreadWorker

from charter.relay import JOB_KEY, RELAY_KEY, Job, Relay

LINGER_S = 0.25  # how long a thread waits for a kept-alive connection's next request
LINGER_SHARE = 0.75  # the most of the pool that may wait so
HEADER_FIELD_LIMIT = 65536  # gunicorn's own cap on one header line (its default: 8190)


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn answers for a request it could not parse (a header line over
    HEADER_FIELD_LIMIT, a malformed request line): the same status, as JSON with OpenAI's
    error keys (`message`, `type`, `param`, `code`) and Charter's (`details`,
    `request_id`), never gunicorn's HTML page. The route is unknown, so one shape for all."""
    code = {400: "bad_request", 403: "forbidden", 414: "uri_too_long",
            431: "header_too_large", 501: "not_implemented"}.get(status_int, "bad_request")
    body = json.dumps({"error": {"message": mesg or reason, "type": "invalid_request_error",
                                 "param": None, "code": code, "details": {},
                                 "request_id": ""}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_workers() -> str:
    """Before gunicorn forks: every worker's metric values go to files in one fresh
    directory (prometheus-client's multiprocess mode), which each scrape of /metrics
    reads whole, so any worker answers with the sum of all of them. Without it a scrape
    would see the one worker that answered it. Returns the directory (removed at exit)."""
    import atexit
    import os
    import shutil
    import tempfile

    from prometheus_client import values

    path = tempfile.mkdtemp(prefix="charter-metrics-")
    os.environ[MULTIPROC_ENV] = path
    # What the import would have chosen with the variable set:
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    atexit.register(shutil.rmtree, path, True)
    return path


def forget_worker_metrics(_server: Any, worker: Any) -> None:
    """gunicorn's child_exit: a dead worker's live gauges stop counting (its counters and
    histograms stay in the sums, as Prometheus expects of a counter)."""
    import os

    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# Every gunicorn error page of this process, through gunicorn's one writer of them.
gunicorn_util.write_error = write_json_error


class _HandedOver:
    """What gunicorn holds of a connection whose socket the relay took: closing it does
    nothing (gunicorn's graceful close shuts down, then closes)."""

    def setblocking(self, _flag: bool) -> None:
        pass

    def shutdown(self, _how: int) -> None:
        raise OSError("handed over to the stream relay")

    def close(self) -> None:
        pass


class KeepAliveThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn is untyped
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lingering = 0
        self._linger_lock = threading.Lock()
        self._linger_max = max(0, int(self.cfg.threads * LINGER_SHARE))
        self.relay: Relay | None = None
        self._local = threading.local()

    # --- streams: relayed by one event loop per worker (charter.relay) ----------------------

    def load_wsgi(self) -> None:
        super().load_wsgi()  # in the worker process, after the fork
        self.relay = Relay(max_streams=self.cfg.worker_connections)
        app: Any = self.wsgi  # type: ignore[has-type]  # set by gunicorn's load_wsgi
        self.application = app  # the application itself (its runtime: cli._flush_on_exit)
        self.wsgi = self._offering_relay(app)

    def _offering_relay(self, app: Any) -> Any:
        def offering(environ: dict[str, Any], start_response: Any) -> Any:
            relay, sock = self.relay, environ.get("gunicorn.socket")
            if (relay is not None and relay.has_room() and sock is not None
                    and not isinstance(sock, ssl.SSLSocket)
                    and environ.get("SERVER_PROTOCOL") == "HTTP/1.1"):
                environ[RELAY_KEY] = relay
            body = app(environ, start_response)
            job = environ.pop(JOB_KEY, None)
            if job is None:
                return body
            return self._hand_over(job, sock, start_response, body)
        return offering

    def _hand_over(self, job: Job, sock: Any, start_response: Any, body: Any) -> list[bytes]:
        """The application left its stream to the relay: write the response's head here
        (gunicorn's own, with `Connection: close`), then give the relay the caller's socket
        and the node's. `handle` then takes the socket out of gunicorn's hands."""
        resp = start_response.__self__  # gunicorn's Response of this request
        try:
            resp.force_close()
            resp.send_headers()  # chunked: HTTP/1.1 without a length
            if not resp.chunked:
                raise RuntimeError("a relayed stream's response must be chunked")
            resp.chunked = False  # the relay writes the chunks and the last one
        except BaseException:
            job.upstream.release(reusable=False)
            job.pump.finish("cancelled", "the client went away before the first byte")
            raise
        finally:
            if hasattr(body, "close"):
                body.close()  # the application's teardown; its body is empty
        assert self.relay is not None
        self._local.handed_over = True
        self.relay.start(job, sock)
        return []

    def handle_exit(self, sig: Any, frame: Any) -> None:
        self._stopping_at = time.monotonic()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        super().run()  # returns once gunicorn's own connections ended (or its grace ran out)
        if self.relay is not None:
            # Relayed streams get what is left of the same grace period (the arbiter kills
            # the worker when it is over), less a second to record the ones cut off.
            stopping_at = getattr(self, "_stopping_at", time.monotonic())
            left = stopping_at + self.cfg.graceful_timeout - 1 - time.monotonic()
            self.relay.drain(max(0.0, left), notify=self.notify)

    def handle(self, conn: Any) -> Any:
        keep = super().handle(conn)
        while keep is True and self.alive and self._next_request_arrives(conn):
            keep = super().handle(conn)
        if getattr(self._local, "handed_over", False):
            # The relay owns the socket now: gunicorn closes a stand-in (its graceful close
            # would shut the caller's connection down under the stream).
            self._local.handed_over = False
            conn.sock = _HandedOver()
            return False
        return keep

    def _next_request_arrives(self, conn: Any) -> bool:
        """Wait on this thread for the connection's next request, if the pool can spare it."""
        if conn.is_http2:
            return False
        if conn.parser.unreader.buf.getvalue():
            return True  # read ahead already: gthread would resubmit it at once
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            return True  # decrypted, not yet read: the socket itself would not show it
        with self._linger_lock:
            if self._lingering >= self._linger_max:
                return False
            self._lingering += 1
        try:
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            return bool(poller.poll(LINGER_S * 1000))
        except (OSError, ValueError):
            return False  # the socket went away: gthread closes it
        finally:
            with self._linger_lock:
                self._lingering -= 1


def check_address_free(bind: str) -> str | None:
    """Why `bind` (host:port) cannot be served, or None.

    Each worker of `charter serve` listens on its own SO_REUSEPORT socket (the kernel then
    spreads connections over the workers). Such sockets would also share the port with a
    second `charter serve` started by mistake, which would take half the traffic instead
    of failing: a plain bind, without SO_REUSEPORT, fails while anything listens there.
    """
    if bind.startswith(("unix:", "fd://")):
        return None
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        return None  # gunicorn reports a malformed address itself
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - what gunicorn binds for ":port"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{bind}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR, as gunicorn sets it: connections of a previous run in TIME_WAIT
        # do not count, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"{bind}: {exc.strerror or exc}"
    return None

"""Streams relayed without a thread per stream: one event loop per worker process.

A streamed answer used to hold one of the worker's threads for its whole length: the thread
read the node's socket, filtered each event and wrote it to the caller, and with hundreds of
streams every token event woke a thread of its own (a context switch and a fight for the
interpreter's lock per event). Here the request's thread does what must happen before the
first byte (the caller authenticated, the decision committed, the node's answer begun), then
hands both sockets to the worker's relay: one thread that waits on all of them at once
(`selectors`), reads what a node sent, removes its framing, passes it through the stream's
`Pump` (the dispatch filter: serving name, usage, redaction) and writes it to the caller as
HTTP/1.1 chunks, with back-pressure (a caller that stops reading stops the node's reads).

How a stream ends is decided here, as the threaded path decides it:
- completed: the node's body ended cleanly;
- aborted: the node failed or broke off, went quiet past the read timeout, or the pump could
  not go on (inspection failed); the caller gets the pump's error event, then the end;
- cancelled: the caller went away (its socket closed or stopped reading past the timeout),
  or the worker was stopping and its grace period ran out; the node's connection is closed,
  which tells it to stop generating.
`Pump.finish` (the outcome's audit event, usage) then runs on a small pool of threads, off
the loop. A node connection whose body was read to its end goes back to the pool.

The gunicorn worker (charter.serving) offers the relay to the application in the WSGI
environ (RELAY_KEY) and takes over the caller's socket when the application leaves a job
there (JOB_KEY); anywhere else (the test client, HTTP/1.0 callers, TLS or HTTP/2 to the
caller) the application streams the old way, from a generator.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import structlog

from charter.nodes.client import BodyError, Detached

log = structlog.get_logger("charter.relay")

RELAY_KEY = "charter.relay"  # environ: the worker's Relay, when it can take the stream
JOB_KEY = "charter.relay.job"  # environ: the application's Job, for the worker to start

READ_SIZE = 65536
HIGH_WATER = 256 * 1024  # unsent bytes to a caller past which the node is not read
FINISH_THREADS = 4
TIMEOUT_CHECK_S = 0.25  # how often the loop looks for quiet nodes and stalled callers


class Pump(Protocol):
    """What a stream's bytes go through (the dispatch filter)."""

    def feed(self, data: bytes) -> bytes: ...

    def rest(self) -> bytes: ...

    def error_event(self, message: str) -> bytes: ...

    def first_byte(self) -> None: ...

    def finish(self, outcome: str, error: str) -> None: ...


class PumpFailed(Exception):
    """Raised by a Pump that cannot go on (an answer that must be redacted, and inspection
    failed): the stream is aborted with the message as the caller's error event."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(error)
        self.message = message


@dataclass
class Job:
    """One stream to relay: the node's detached answer and what its bytes go through."""

    upstream: Detached
    pump: Pump
    read_timeout_s: float


class _Flow:
    """One stream in the loop."""

    def __init__(self, job: Job, client: socket.socket, now: float) -> None:
        self.job = job
        self.up = job.upstream.sock
        self.client = client
        self.out = bytearray()
        self.reading = True  # the node's socket is registered for reading
        self.ending = False  # everything is queued: close once it is written
        self.outcome, self.error = "completed", ""
        self.last_up = now  # the node's last bytes
        self.stalled_since: float | None = None  # when the caller stopped taking bytes
        self.started = False
        self.up_watched = False  # registered: the node's socket for reading
        self.client_events = 0  # registered: the caller's socket for these events


class Relay:
    """The worker's event loop for streams; `start` from any thread."""

    def __init__(self, *, max_streams: int = 10_000) -> None:
        self.max_streams = max_streams
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._incoming: list[tuple[Job, socket.socket]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._flows: set[_Flow] = set()
        self._count = 0  # flows in the loop or on their way to it
        self._stopping = False
        self._stop_all = False
        self._next_check = 0.0
        self._finishers = ThreadPoolExecutor(FINISH_THREADS, "charter-relay-finish")
        self._thread = threading.Thread(target=self._run, name="charter-relay", daemon=True)
        self._thread.start()

    # --- from other threads ------------------------------------------------------------------

    def has_room(self) -> bool:
        return not self._stopping and self._count < self.max_streams

    def start(self, job: Job, client: socket.socket) -> None:
        """Relay `job` to `client` (the caller's socket, taken from gunicorn), whose
        response head was already written."""
        client.setblocking(False)
        with self._lock:
            self._count += 1
            self._incoming.append((job, client))
        self._wake()

    def drain(self, timeout_s: float, notify: Callable[[], None] | None = None) -> int:
        """Stop taking streams and wait up to `timeout_s` for those running to end; those
        left are cancelled. Returns how many were cancelled."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        while self._count and time.monotonic() < deadline:
            if notify is not None:
                notify()  # gunicorn's heartbeat: the arbiter must not kill a draining worker
            time.sleep(0.1)
        left = self._count
        if left:
            log.warning("streams cut off at shutdown", streams=left)
            self._stop_all = True
            self._wake()
            self._thread.join(5)
        self._finishers.shutdown(wait=True)
        return left

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                ready = self._sel.select(timeout=0.5)
                now = time.monotonic()
                for key, mask in ready:
                    if key.data is None:
                        self._take_incoming(now)
                        continue
                    flow, side = key.data
                    if flow not in self._flows:
                        continue
                    try:
                        if side == "up":
                            self._read_node(flow, now)
                        else:
                            if mask & selectors.EVENT_WRITE:
                                self._write(flow, now)
                            if mask & selectors.EVENT_READ and flow in self._flows:
                                self._caller_spoke(flow)
                    except Exception as exc:  # noqa: BLE001 - a bug ends its stream only
                        log.exception("a relayed stream failed")
                        self._fail(flow, f"relay error: {type(exc).__name__}: {exc}",
                                   message="the stream failed in the gateway")
                if now >= self._next_check:  # timeouts are seconds: not every turn
                    self._next_check = now + TIMEOUT_CHECK_S
                    self._check_timeouts(now)
                if self._stop_all:
                    for flow in list(self._flows):
                        self._end(flow, "cancelled", "the server stopped before the end")
                    return
            except Exception:  # noqa: BLE001 - the loop must outlive any one stream's bug
                log.exception("the stream relay's loop failed; going on")

    def _take_incoming(self, now: float) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for job, client in incoming:
            flow = _Flow(job, client, now)
            self._flows.add(flow)
            try:
                self._sel.register(flow.up, selectors.EVENT_READ, (flow, "up"))
                flow.up_watched = True
                # The caller's side: readable means it went away (or sent what it may not).
                self._sel.register(client, selectors.EVENT_READ, (flow, "client"))
                flow.client_events = selectors.EVENT_READ
            except (OSError, ValueError) as exc:
                self._end(flow, "aborted", f"could not watch the sockets: {exc}")
                continue
            if job.upstream.head:  # what the node client had read ahead
                self._body(flow, job.upstream.head, now)
            elif job.upstream.decoder.done:  # an empty body: nothing will come to read
                self._queue_end(flow)
            if flow in self._flows and isinstance(flow.up, ssl.SSLSocket) and flow.up.pending():
                self._read_node(flow, now)

    def _read_node(self, flow: _Flow, now: float) -> None:
        while flow in self._flows and flow.reading:
            try:
                data = flow.up.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self._fail(flow, f"{type(exc).__name__}: {exc}")
                return
            if not data:
                if flow.job.upstream.decoder.at_eof():
                    self._queue_end(flow)
                else:
                    self._fail(flow, "IncompleteRead: the node closed the connection "
                                     "before the end of its answer")
                return
            self._body(flow, data, now)
            if len(flow.out) > HIGH_WATER:
                return  # the caller is behind: _watch stopped watching the node
            if not (isinstance(flow.up, ssl.SSLSocket) and flow.up.pending()) and \
                    len(data) < READ_SIZE:
                return

    def _body(self, flow: _Flow, data: bytes, now: float) -> None:
        flow.last_up = now
        decoder = flow.job.upstream.decoder
        try:
            body = decoder.feed(data)
        except BodyError as exc:
            self._fail(flow, f"BodyError: {exc}")
            return
        if body:
            if not flow.started:
                flow.started = True
                flow.job.pump.first_byte()
            try:
                out = flow.job.pump.feed(body)
            except PumpFailed as exc:
                self._fail(flow, str(exc), message=exc.message)
                return
            if out:
                self._send(flow, out, now)
        if decoder.done and flow in self._flows:
            self._queue_end(flow)

    def _queue_end(self, flow: _Flow) -> None:
        """The node's answer ended: what the pump held back, the last chunk, then close."""
        try:
            rest = flow.job.pump.rest()
        except PumpFailed as exc:
            self._fail(flow, str(exc), message=exc.message)
            return
        if rest:
            self._send(flow, rest, time.monotonic())
        self._close_node(flow, reusable=True)
        self._finish_writing(flow)

    def _fail(self, flow: _Flow, error: str, *, message: str = "") -> None:
        """The node failed (or the pump could not go on): an error event, then the end."""
        if flow not in self._flows or flow.ending:
            if flow in self._flows:  # failing while its end was being written: close it
                self._end(flow, "aborted", error)
            return
        flow.outcome, flow.error = "aborted", error
        self._close_node(flow, reusable=False)
        try:
            event = flow.job.pump.error_event(message or "the model node failed mid-stream")
        except Exception:  # noqa: BLE001 - the caller gets the end without the event
            log.exception("a relayed stream's error event could not be made")
            event = b""
        if event:
            self._send(flow, event, time.monotonic())
        self._finish_writing(flow)

    def _close_node(self, flow: _Flow, *, reusable: bool) -> None:
        flow.reading = False
        if flow.up_watched:
            flow.up_watched = False
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(flow.up)
        flow.job.upstream.release(reusable=reusable)

    def _finish_writing(self, flow: _Flow) -> None:
        if flow not in self._flows:
            return
        flow.ending = True
        flow.out += b"0\r\n\r\n"
        self._write(flow, time.monotonic())

    def _send(self, flow: _Flow, data: bytes, now: float) -> None:
        if flow not in self._flows:
            return
        flow.out += b"%x\r\n" % len(data)
        flow.out += data
        flow.out += b"\r\n"
        self._write(flow, now)

    def _write(self, flow: _Flow, now: float) -> None:
        while flow.out:
            try:
                sent = flow.client.send(flow.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._end(flow, "cancelled", f"the client went away: {exc}")
                return
            del flow.out[:sent]
        if not flow.out:
            flow.stalled_since = None
            if flow.ending:
                self._end(flow, flow.outcome, flow.error)
                return
        elif flow.stalled_since is None:
            flow.stalled_since = now
        self._watch(flow)

    def _watch(self, flow: _Flow) -> None:
        """Register for what the flow waits on: the caller's socket for writing while bytes
        are queued; the node's for reading while fewer than HIGH_WATER bytes are."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if flow.out else 0)
        if flow.client_events != events:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(flow.client, events, (flow, "client"))
                flow.client_events = events
        if not flow.reading or flow.ending:
            return
        paused = len(flow.out) > HIGH_WATER
        if paused and flow.up_watched:
            self._sel.unregister(flow.up)
            flow.up_watched = False
        elif not paused and not flow.up_watched:
            self._sel.register(flow.up, selectors.EVENT_READ, (flow, "up"))
            flow.up_watched = True

    def _caller_spoke(self, flow: _Flow) -> None:
        try:
            data = flow.client.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(flow, "cancelled", f"the client went away: {exc}")
            return
        if not data:
            self._end(flow, "cancelled", "the client went away")
        # Anything else (a pipelined request) is dropped: the answer said Connection: close.

    def _check_timeouts(self, now: float) -> None:
        for flow in list(self._flows):
            timeout = flow.job.read_timeout_s
            if flow.reading and now - flow.last_up > timeout:
                self._fail(flow, f"TimeoutError: the node sent nothing for {timeout:g} s")
            elif flow.stalled_since is not None and now - flow.stalled_since > timeout:
                self._end(flow, "cancelled", f"the client took nothing for {timeout:g} s")

    def _end(self, flow: _Flow, outcome: str, error: str) -> None:
        """Take the flow out of the loop, close both sockets and record how it ended."""
        if flow not in self._flows:
            return
        self._flows.discard(flow)
        for sock in (flow.client, flow.up):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        self._close_node(flow, reusable=False)  # no-op when already released
        with contextlib.suppress(OSError):  # written to the end: a clean close
            flow.client.shutdown(socket.SHUT_WR if outcome != "cancelled" else socket.SHUT_RDWR)
        flow.client.close()
        try:
            self._finishers.submit(self._finished, flow.job.pump, outcome, error)
        except RuntimeError:  # the pool is shut down: record it here
            self._finished(flow.job.pump, outcome, error)

    def _finished(self, pump: Pump, outcome: str, error: str) -> None:
        try:
            pump.finish(outcome, error)
        except Exception:  # noqa: BLE001 - one stream's record must not stop the others
            log.exception("recording a relayed stream's outcome failed")
        finally:
            with self._lock:
                self._count -= 1


"""Benchmark: the governed gateway (`charter serve`) vs a fast TGI stub upstream, side by side."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from results import emit, figure

MODEL_ID = "bench/fast-tgi"
MODEL_SHA = "0123456789abcdef0123456789abcdef01234567"  # what the stub's /info reports
SECRET = "bench-secret-key-that-is-long-enough-0000"  # noqa: S105 - a throwaway database
ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve()
BODY = b'{"inputs":"Hello, world","parameters":{"max_new_tokens":8}}'
# Issue 26's goals, everything on: added latency at c=1, CPU per request, streams.
GOAL_P50_MS, GOAL_P99_MS, GOAL_CPU_MS, GOAL_STREAMS = 1.0, 3.0, 3.0, 200
GOAL_PEER_RATIO = 10.0  # Charter's throughput over LiteLLM's proxy, same upstream
GOAL_PEER_CPU = 0.08  # Charter's CPU per request over LiteLLM's
GOAL_TTFT_RATIO, GOAL_STREAM_CPU_RATIO = 3.0, 2.0  # streams: against going direct
TICK = os.sysconf("SC_CLK_TCK")


# --- the fast upstream: TGI's protocol on a raw asyncio server ------------------------------

def _http(status: int, body: bytes, ctype: str = "application/json", extra: str = "") -> bytes:
    reason = {200: "OK", 404: "Not Found"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


GEN_TEXT = " the quick brown fox jumps over the lazy"
PROMPT_TOKENS = 4  # what the stub says every TGI prompt was (OpenAI's: 5)
CANNED = {
    (b"GET", b"/health"): _http(200, b""),
    (b"GET", b"/info"): _http(200, json.dumps({
        "model_id": MODEL_ID, "model_sha": MODEL_SHA, "model_dtype": "bfloat16",
        "model_pipeline_tag": "text-generation", "max_concurrent_requests": 512,
        "max_best_of": 1, "max_stop_sequences": 4, "max_input_tokens": 4096,
        "max_total_tokens": 8192, "validation_workers": 1, "max_client_batch_size": 4,
        "router": "text-generation-router", "version": "2.4.1", "sha": None,
        "docker_label": None}).encode()),
    (b"POST", b"/generate"): _http(200, json.dumps({
        "generated_text": GEN_TEXT, "details": {
            "finish_reason": "length", "generated_tokens": 8, "seed": None,
            "prefill": [], "tokens": []}}).encode(),
        extra=f"x-prompt-tokens: {PROMPT_TOKENS}\r\nx-generated-tokens: 8\r\n"),
    (b"POST", b"/v1/chat/completions"): _http(200, json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL_ID,
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": GEN_TEXT}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}}).encode()),
}
NOT_FOUND = _http(404, b'{"error":"not found","error_type":"not_found"}')
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


def _token_chunk(i: int, n: int) -> bytes:
    last = i == n - 1
    event = {"index": i + 1, "token": {"id": 100 + i, "text": f" t{i}", "logprob": -0.5,
                                       "special": False},
             "generated_text": GEN_TEXT if last else None,
             "details": {"finish_reason": "length", "generated_tokens": n, "seed": None,
                         "input_length": PROMPT_TOKENS}
             if last else None}
    return _chunked(b"data:" + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _chat_chunk(i: int, n: int) -> bytes:
    """One event of an OpenAI chat stream: a token, the last with its finish reason."""
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
             "model": MODEL_ID, "choices": [{"index": 0, "delta": {"content": f" t{i}"},
                                             "finish_reason": "length" if i == n - 1 else None}]}
    return _chunked(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _chat_usage(n: int) -> bytes:
    """An OpenAI stream's usage chunk (sent when `stream_options.include_usage`)."""
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
             "model": MODEL_ID, "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}
    return _chunked(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class TgiStub(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies, canned answers; streams with a delay."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            method, target = lines[0].split(b" ")[:2]
            assert self.transport is not None
            if method == b"POST" and target == b"/generate_stream":
                params = json.loads(body or b"{}").get("parameters") or {}
                self.busy = True
                asyncio.ensure_future(self._stream(int(params.get("max_new_tokens") or 20)))
            elif target == b"/v1/chat/completions" and b'"stream"' in body and (
                    asked := json.loads(body)).get("stream") is True:
                usage = (asked.get("stream_options") or {}).get("include_usage") is True
                self.busy = True
                asyncio.ensure_future(self._stream(int(asked.get("max_tokens") or 20),
                                                   chat=True, usage=usage))
            else:
                self.transport.write(CANNED.get((method, target), NOT_FOUND))

    async def _stream(self, n: int, *, chat: bool = False, usage: bool = False) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(STREAM_HEAD)
        for i in range(n):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if transport.is_closing():
                return
            transport.write(_chat_chunk(i, n) if chat else _token_chunk(i, n))
        if chat:
            transport.write((_chat_usage(n) if usage else b"") + _chunked(b"data: [DONE]\n\n"))
        transport.write(b"0\r\n\r\n")
        self.busy = False
        self.data_received(b"")


async def _serve_upstream(delay_s: float, port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TgiStub(delay_s), "127.0.0.1", port,
                                      backlog=2048, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    await server.serve_forever()


# --- load generators (child processes) ------------------------------------------------------

def _latency_client(spec: dict[str, Any]) -> dict[str, Any]:
    """c=1 keep-alive POSTs; targets interleaved in blocks so drift hits each equally."""
    targets = spec["targets"]
    conns = {t["name"]: http.client.HTTPConnection("127.0.0.1", t["port"], timeout=30)
             for t in targets}
    headers = {t["name"]: {"Content-Type": "application/json",
                           "Authorization": f"Bearer {t.get('key', spec['key'])}"}
               for t in targets}
    bodies = {t["name"]: t.get("body", BODY.decode()).encode() for t in targets}
    out: dict[str, list[float]] = {t["name"]: [] for t in targets}
    errors: dict[str, int] = {t["name"]: 0 for t in targets}

    def one(t: dict[str, Any]) -> float:
        conn = conns[t["name"]]
        started = time.perf_counter_ns()
        conn.request("POST", t["path"], bodies[t["name"]], headers[t["name"]])
        resp = conn.getresponse()
        resp.read()
        elapsed = (time.perf_counter_ns() - started) / 1e6
        if resp.status != 200:
            errors[t["name"]] += 1
        return elapsed

    for t in targets:
        for _ in range(spec["warmup"]):
            one(t)
    block, deadline = spec["block"], time.monotonic() + spec["budget_s"]
    for _ in range(spec["n"] // block):
        for t in targets:
            out[t["name"]].extend(one(t) for _ in range(block))
        if time.monotonic() > deadline:  # a slow path gets fewer samples, not a longer run
            break
    return {"ms": out, "errors": errors}


async def _one_stream(port: int, path: str, key: str, body: bytes) -> dict[str, Any]:
    started = time.perf_counter()
    ttft: float | None = None
    tokens, failed, status, kind = 0, False, 0, ""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                     + body)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True

        def seen(data: bytes) -> None:
            nonlocal ttft, tokens, failed, kind
            if status != 200 or b'"error_type"' in data:
                found = re.search(rb'"(?:error_type|code)": ?"([a-z_]+)"', data)
                kind = kind or (found.group(1).decode() if found else "")
            if ttft is None and b"data:" in data:
                ttft = (time.perf_counter() - started) * 1000
            tokens += data.count(b"data:")
            failed = failed or b'"error_type"' in data

        if chunked:
            while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
                seen((await reader.readexactly(size + 2))[:-2])
        else:
            while data := await reader.read(65536):
                seen(data)
    finally:
        writer.close()
    return {"status": status, "ttft": ttft, "tokens": tokens, "failed": failed, "kind": kind,
            "total": (time.perf_counter() - started) * 1000}


async def _streams(spec: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"inputs": "Once upon a time",
                       "parameters": {"max_new_tokens": spec["tokens"]}}).encode()

    async def guarded() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(
                _one_stream(spec["port"], spec["path"], spec["key"], body), spec["timeout"])
        except (TimeoutError, OSError, ValueError, IndexError,
                asyncio.IncompleteReadError) as exc:
            return {"status": 0, "ttft": None, "tokens": 0, "failed": True,
                    "error": type(exc).__name__, "total": None}

    results = await asyncio.gather(*(guarded() for _ in range(spec["streams"])))
    errors = [r for r in results if r["status"] != 200 or r["failed"]
              or r["tokens"] != spec["tokens"]]
    ok = [r for r in results if r not in errors]
    return {"errors": len(errors), "ttft": [r["ttft"] for r in ok],
            "total": [r["total"] for r in ok],
            "error_kinds": sorted({r.get("error") or f"HTTP {r['status']} {r['kind']}".strip()
                                   for r in errors})[:5]}


def _load_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Fallback when wrk is missing: threads of keep-alive clients for a fixed time."""
    stop = time.monotonic() + spec["duration"]
    counts = [0] * spec["conc"]
    bad = [0] * spec["conc"]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {spec['key']}"}
    body = spec["body"].encode() if spec.get("body") else BODY  # the lua's, without wrk

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", spec["path"], body, headers)
            resp = conn.getresponse()
            resp.read()
            counts[i] += 1
            bad[i] += resp.status != 200

    threads = [threading.Thread(target=run, args=(i,)) for i in range(spec["conc"])]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {"requests": sum(counts), "rps": sum(counts) / elapsed, "non2xx": sum(bad),
            "socket_errors": 0}


def _child(role: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE), "--role", role, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- CPU accounting from /proc ---------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK if fields else 0.0


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _children(pid: int) -> list[int]:
    return [p for p in _pids() if (f := _stat(p)) is not None and int(f[1]) == pid]


def _pg_backends(dbname: str) -> list[int]:
    out = []
    for pid in _pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"postgres: ") and f" {dbname} ".encode() in cmd:
            out.append(pid)
    return out


def _machine_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait


class CpuMeter:
    """User+sys CPU seconds of process groups over an interval, and what others used."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def __enter__(self) -> CpuMeter:
        self.before = {g: {p: _cpu_s(p) for p in f()} for g, f in self.groups.items()}
        self.busy0, self.kids0 = _machine_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        self.used: dict[str, float] = {}
        for g, f in self.groups.items():
            pids = set(f()) | set(self.before[g])
            self.used[g] = sum(max(0.0, _cpu_s(p) - self.before[g].get(p, 0.0)) for p in pids)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.used["load generator"] = (kids.ru_utime + kids.ru_stime
                                       - self.kids0.ru_utime - self.kids0.ru_stime)
        busy = _machine_busy_s() - self.busy0
        self.used["others"] = max(0.0, busy - sum(self.used.values()))


class RssPeak:
    """Each worker's resident memory before the streams and at their peak (sampled every
    50 ms): (before, peak) MB summed over the workers."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> RssPeak:
        self.before = sum(_rss_mb(p) for p in self.pids)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, sum(_rss_mb(p) for p in self.pids))

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        return {"before": self.before, "peak": max(self.peak, self.before),
                "workers": len(self.pids)}


# --- setup: database, governed registry entries, processes ------------------------------------

def _create_database(name: str) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    from charter import migrate

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    migrate.upgrade(rendered)
    return rendered


_RUNTIMES: list[Any] = []  # the benchmark process's own Runtime, bound while it seeds


def _bind_runtime(settings: Any) -> Any:
    """This process's Runtime (for seeding and the in-process profile), bound here."""
    from charter import scope
    from charter.boot import build_runtime

    if not _RUNTIMES:
        runtime = build_runtime(settings)
        scope.bind(runtime)
        _RUNTIMES.append(runtime)
    return _RUNTIMES[0]


def _drop_database(name: str) -> None:
    import psycopg

    while _RUNTIMES:
        _RUNTIMES.pop().close()
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Seeded:
    """What `seeded()` set up: the stub's port, the database's URL and settings, the key."""

    def __init__(self, up_port: int, url: str, settings: Any, key: str) -> None:
        self.up_port, self.url, self.settings, self.key = up_port, url, settings, key


@contextlib.contextmanager
def seeded(name: str, *, delay_ms: float, **settings: Any) -> Iterator[Seeded]:
    """The stub upstream (`delay_ms` a token) in a process of its own and a database
    `name` seeded for it (`_seed`), with Settings for it (`settings` added); both gone at
    the end. For the benchmarks that run Charter against this one's stub."""
    from charter.settings import Settings

    upstream = subprocess.Popen([sys.executable, str(HERE), "--role", "upstream", "--spec",
                                 json.dumps({"delay_ms": delay_ms})],
                                stdout=subprocess.PIPE, text=True)
    created = False
    try:
        assert upstream.stdout is not None
        up_port = json.loads(upstream.stdout.readline())["port"]
        url = _create_database(name)
        created = True
        made = Settings.from_env({}, database_url=url, secret_key=SECRET,
                                 node_allowed_networks="127.0.0.0/8", log_level="WARNING",
                                 **settings)
        yield Seeded(up_port, url, made, _seed(made, f"http://127.0.0.1:{up_port}"))
    finally:
        upstream.terminate()
        if created:
            _drop_database(name)


def _seed(settings: Any, upstream_url: str) -> str:
    """An approved version matching the stub, a team, a service-account key, an attested
    node and the deployment `bench`, all through the real services. Returns the API key."""
    from charter.actor import SYSTEM
    from charter.db import utcnow
    from charter.identity.service import actor_of, create_api_key, create_user
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.schemas import (
        ApprovalConditions,
        FileSpec,
        ModelCreate,
        Transition,
        VersionSpec,
    )

    _bind_runtime(settings)
    steward, approver, operator = (
        actor_of(create_user(SYSTEM, username=f"bench-{role}", roles=[role]))
        for role in ("steward", "approver", "operator"))
    model = registry.create_model(steward, ModelCreate(name="bench-model", publisher="TinyLlama",
                                                       source_repo=MODEL_ID))
    version = registry.create_version(steward, model.id, VersionSpec(
        label="1", source_revision=MODEL_SHA, weight_format="safetensors",
        files=[FileSpec(path="model.safetensors", size=1, sha256="b" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["d"], storage_region="eu-central", hosting_regions=["eu-central"]))
    registry.submit_version(steward, version.id, Transition())
    registry.approve_version(approver, version.id, ApprovalConditions.model_validate_json(
        json.dumps({"allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
                    "allowed_purposes": ["assistant"],
                    "expires_at": (utcnow() + timedelta(days=30)).isoformat()})))
    team = create_team(SYSTEM, name="bench", description="", requests_per_day=10**9,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal")
    bot = create_service_account(SYSTEM, team.id, username="bench-bot")
    key = create_api_key(SYSTEM, bot.id, name="bench").token
    node = nodes.register_node(operator, settings, name="fast", base_url=upstream_url,
                               region="eu-central", engine="tgi", labels={}, capacity=512)
    probed = nodes.probe_node(settings, node.id)
    if probed.attestation != "attested":
        raise SystemExit(f"the stub node was not attested: {probed.quarantine_reason}")
    nodes.create_deployment(operator, serving_name="bench", version_id=version.id,
                            node_ids=[node.id])
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, path: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{path}: the process exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(path)


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --- throughput with wrk ----------------------------------------------------------------------

WRK_LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def _throughput(tool: dict[str, Any], port: int, path: str, conc: int,
                duration: float, lua: str | None = None) -> dict[str, Any]:
    if tool["wrk"] is None:
        if lua is not None:
            raise RuntimeError("the LiteLLM comparison needs wrk (apt-get install wrk)")
        return _child("load", {"port": port, "path": path, "key": tool["key"], "conc": conc,
                               "duration": duration, "body": tool.get("body")},
                      timeout=duration + 60)
    out = subprocess.run(
        [tool["wrk"], "-t", "1", "-c", str(conc), "-d", f"{duration:g}s", "--timeout", "10s",
         "-s", lua or tool["lua"], f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": requests, "rps": rps, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0}


# --- profile 1: stage timing in-process (the real code path, wrapped from outside) ------------

class StageTimer:
    """Exclusive wall and CPU per wrapped function; SQL, COMMIT and pre-ping per stage."""

    REST = "the request's door (id, auth, headers, metrics), parse (the rest)"

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.stack: list[tuple[str, list[float]]] = []
        self.undo: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else self.REST

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        if not hasattr(owner, attr):  # the code changed: say so rather than fail
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        self.stats[name]["calls"] += 0
        orig = getattr(owner, attr)
        self.undo.append((owner, attr, owner.__dict__.get(attr, orig)
                          if isinstance(owner, type) else orig))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            self.stack.append((name, [0.0, 0.0]))
            try:
                return orig(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w0, time.thread_time() - c0
                _, child = self.stack.pop()
                self.stats[name]["wall"] += dw - child[0]
                self.stats[name]["cpu"] += dc - child[1]
                self.stats[name]["calls"] += 1
                if self.stack:
                    self.stack[-1][1][0] += dw
                    self.stack[-1][1][1] += dc

        setattr(owner, attr, wrapper)

    def tally(self, owner: Any, attr: str, kind: str) -> None:
        """Count and time `attr` inside whatever stage is running (not a stage itself)."""
        if not hasattr(owner, attr):
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        orig = getattr(owner, attr)
        self.undo.append((owner, attr, owner.__dict__.get(attr, orig)
                          if isinstance(owner, type) else orig))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            w0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                s = self.stats[self.current()]
                s[f"{kind}_ms"] += (time.perf_counter() - w0) * 1000
                s[f"{kind}_n"] += 1

        setattr(owner, attr, wrapper)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self.undo):
            setattr(owner, attr, orig)

    def reset(self) -> None:
        for stats in self.stats.values():
            stats.clear()


def _stage_profile(settings: Any, key: str, n: int) -> dict[str, Any]:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    import charter.app
    import charter.dispatch.gateway as gateway
    import charter.dispatch.service as dispatch
    import charter.identity.authn as authn
    import charter.policy.service as policy
    from charter.audit.writer import GroupWriter
    from charter.nodes.client import NodePool, NodeResponse
    from charter.nodes.ssrf import NodeUrlPolicy

    runtime = _bind_runtime(settings)
    app = charter.app.create_app(runtime)
    client = app.test_client()
    timer = StageTimer()
    engine = runtime.database.engine
    sql_started: dict[int, float] = {}

    def before(conn: Any, *_a: Any) -> None:
        sql_started[id(conn)] = time.perf_counter()

    def after(conn: Any, *_a: Any) -> None:
        s = timer.stats[timer.current()]
        s["sql_ms"] += (time.perf_counter() - sql_started.pop(id(conn), time.perf_counter())) * 1e3
        s["sql_n"] += 1

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    timer.wrap(authn, "authenticate_api_key", "authenticate: API key -> actor")
    timer.wrap(dispatch, "caller_context", "caller_context: teams, entitlements")
    timer.wrap(dispatch, "admit", "admit: route, policy input, entry")
    timer.wrap(dispatch, "_load_route", "route lookup (read-cache miss)")
    timer.wrap(runtime.policies.engine, "evaluate", "policy: regorus evaluate")
    timer.wrap(policy, "evaluate", "policy: verdict cache, decision event")
    timer.wrap(GroupWriter, "commit", "group commit: decision (+ queued outcome)")
    timer.wrap(NodeUrlPolicy, "resolve", "proxy: SSRF re-check of the node URL")
    timer.wrap(NodePool, "request", "node call: send + read")
    timer.wrap(NodeResponse, "read", "node call: send + read")
    timer.wrap(gateway, "_forward", "proxy: digest, build request, response")
    timer.wrap(gateway, "_finish_whole", "proxy: digest, build request, response")
    timer.wrap(dispatch, "record_outcome", "outcome: event queued")
    timer.tally(Session, "commit", "commit")
    timer.tally(engine.dialect, "do_ping", "ping")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        for _ in range(30):
            client.post("/tgi/bench/generate", data=BODY, headers=headers)
        timer.reset()
        totals, cpus = [], []
        for _ in range(n):
            w0, c0 = time.perf_counter(), time.thread_time()
            r = client.post("/tgi/bench/generate", data=BODY, headers=headers)
            totals.append((time.perf_counter() - w0) * 1000)
            cpus.append((time.thread_time() - c0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"in-process request failed: {r.status_code} {r.text[:300]}")
    finally:
        timer.restore()
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    stages = {name: {k: v / n for k, v in s.items()} for name, s in timer.stats.items()}
    floors = _round_trip_floors(settings)
    rest = stages.setdefault(StageTimer.REST, defaultdict(float))
    rest["wall"] = sum(totals) / n * 1e-3 - sum(s.get("wall", 0) for s in stages.values())
    rest["cpu"] = sum(cpus) / n * 1e-3 - sum(s.get("cpu", 0) for s in stages.values()
                                             if s is not rest)
    return {"stages": stages, "mean_ms": statistics.fmean(totals), "floors": floors,
            "missing": timer.missing,
            "p50_ms": statistics.median(totals), "cpu_ms": statistics.fmean(cpus)}


def _round_trip_floors(settings: Any, n: int = 300) -> dict[str, tuple[float, float]]:
    """(wall ms, CPU ms) of one raw psycopg round trip and of one empty unit of work."""
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from charter.uow import unit_of_work

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        for _ in range(20):
            fn()
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            fn()
        return (time.perf_counter() - w0) * 1000 / n, (time.thread_time() - c0) * 1000 / n

    def empty_uow() -> None:
        with unit_of_work() as session:
            session.execute(text("SELECT 1")).scalar()

    raw_url = make_url(settings.database_url).set(drivername="postgresql")
    with psycopg.connect(raw_url.render_as_string(hide_password=False),
                         autocommit=True) as conn:
        raw = timed(lambda: conn.execute("SELECT 1").fetchone())
    return {"raw psycopg round trip (SELECT 1, autocommit)": raw,
            "unit_of_work() with one SELECT 1 (ping+BEGIN+SELECT+COMMIT)": timed(empty_uow)}


# --- profile 2: py-spy samples of the real gunicorn workers under load ------------------------

MARKERS = [  # (function, file fragment, stage): the innermost match in a stack wins
    ("authenticate_api_key", "charter/identity/service.py", "authenticate"),
    ("caller_context", "charter/identity/teams.py", "caller_context"),
    ("evaluate", "charter/policy/engine.py", "policy evaluate (regorus)"),
    ("evaluate", "charter/policy/service.py", "policy: verdict cache, event"),
    ("_write", "charter/audit/writer.py", "group commit (audit + usage)"),
    ("commit", "charter/audit/writer.py", "group commit: waiting"),
    ("record_outcome", "charter/dispatch/service.py", "outcome queued"),
    ("resolve", "charter/nodes/ssrf.py", "SSRF re-check"),
    ("request", "charter/nodes/client.py", "node call"),
    ("read", "charter/nodes/client.py", "node call"),
    ("admit", "charter/dispatch/service.py", "admit: route, entry"),
    ("_forward", "charter/dispatch/gateway.py", "proxy glue"),
    ("_finish_whole", "charter/dispatch/gateway.py", "proxy glue"),
    ("_tgi", "charter/dispatch/gateway.py", "gateway parse"),
    ("authenticate", "charter/web.py", "request door (id, auth, headers, metrics)"),
    ("__call__", "charter/dispatch/wsgi.py", "request door (id, auth, headers, metrics)"),
    ("wsgi_app", "flask/app.py", "Flask/werkzeug (not a dispatch route)"),
    ("handle_request", "gunicorn/workers/gthread.py", "gunicorn request I/O"),
    ("handle", "gunicorn/workers/gthread.py", "gunicorn request I/O"),
]
LIBS = [("sqlalchemy", "SQLAlchemy"), ("psycopg", "psycopg"), ("httpx", "httpx/httpcore/h11"),
        ("httpcore", "httpx/httpcore/h11"), ("h11", "httpx/httpcore/h11"),
        ("werkzeug", "werkzeug"), ("flask", "Flask"), ("gunicorn", "gunicorn"),
        ("structlog", "logging"), ("logging", "logging"), ("prometheus_client", "prometheus"),
        ("charter/", "charter code"), ("json", "json"), ("ssl", "socket/select"),
        ("socket", "socket/select"), ("selectors", "socket/select"),
        ("concurrent/futures", "thread pool"), ("threading", "thread pool")]


def _frame(raw: str) -> tuple[str, str]:
    func, _, where = raw.partition(" (")
    return func, where


def _classify(frames: list[str]) -> tuple[str, str]:
    stage = "other (gunicorn main loop, GC, ...)"
    for raw in reversed(frames):
        func, where = _frame(raw)
        name = func.rpartition(".")[2]  # py-spy names a method by its qualname (Class.fn)
        hit = next((s for f, frag, s in MARKERS if f == name and frag in where), None)
        if hit:
            stage = hit
            break
    _, leaf = _frame(frames[-1]) if frames else ("", "")
    lib = next((name for frag, name in LIBS if frag in leaf), "stdlib/other")
    return stage, lib


def _pyspy_profile(pyspy: str, master: int, port: int, tool: dict[str, Any],
                   duration: float, meter_groups: dict[str, Callable[[], list[int]]],
                   tmp: Path) -> dict[str, Any]:
    workers = _children(master)
    outs = [tmp / f"pyspy-{pid}.txt" for pid in workers]
    spies = [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration",
                               str(int(duration)), "--rate", "200", "--nonblocking",
                               "--format", "raw", "--output", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for pid, out in zip(workers, outs, strict=True)]
    time.sleep(1.0)  # let py-spy attach
    with CpuMeter(meter_groups) as meter:
        result = _throughput(tool, port, "/tgi/bench/generate", 32, duration - 2)
    for spy in spies:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=30)
    by_stage: dict[str, int] = defaultdict(int)
    by_lib: dict[str, int] = defaultdict(int)
    cross: dict[tuple[str, str], int] = defaultdict(int)
    total = 0
    for out in outs:
        if not out.exists():
            continue
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            stage, lib = _classify(stack.split(";"))
            by_stage[stage] += int(count)
            by_lib[lib] += int(count)
            cross[(stage, lib)] += int(count)
            total += int(count)
    errors = [s.stderr.read().decode()[-300:] for s in spies if s.returncode and s.stderr]
    cpu_ms = meter.used["charter"] * 1000 / max(1, result["requests"])
    return {"total": total, "by_stage": dict(by_stage), "by_lib": dict(by_lib),
            "cross": cross, "cpu_ms": cpu_ms, "rps": result["rps"], "errors": errors}


# --- the run ---------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} CPUs (nproc), {model}, Python {sys.version.split()[0]}"


def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    from charter.settings import Settings

    console = Console(width=max(Console().width, 140))
    load_before = os.getloadavg()
    name = f"charter_bench_gw_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    upstream = charter_proc = None
    created = False
    try:
        t0 = time.monotonic()
        upstream = subprocess.Popen(
            [sys.executable, str(HERE), "--role", "upstream", "--spec",
             json.dumps({"delay_ms": args.token_delay_ms})], stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None
        up_port = json.loads(upstream.stdout.readline())["port"]
        database_url = _create_database(name)
        created = True
        settings = Settings.from_env({}, database_url=database_url, secret_key=SECRET,
                                     node_allowed_networks="127.0.0.0/8", log_level="WARNING")
        key = _seed(settings, f"http://127.0.0.1:{up_port}")
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        env.update(CHARTER_DATABASE_URL=database_url, CHARTER_SECRET_KEY=SECRET,
                   CHARTER_NODE_ALLOWED_NETWORKS="127.0.0.0/8", CHARTER_LOG_LEVEL="WARNING")
        witness = None
        if args.witness:  # a sealed, signed, witnessed log with a short checkpoint cadence
            witness, audit_env = _start_witness(tmp, args.checkpoint_interval)
            env.update(audit_env)
        charter_proc = subprocess.Popen(
            [str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}", "--workers",
             str(args.workers), "--threads", str(args.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_http(port, "/healthz", charter_proc)
        master = charter_proc.pid
        console.print(f"[dim]set up in {time.monotonic() - t0:.1f}s: stub on :{up_port}, "
                      f"charter on :{port} (pid {master}), database {name}[/dim]")

        groups: dict[str, Callable[[], list[int]]] = {
            "charter": lambda: [master, *_children(master)],
            "upstream": lambda: [upstream.pid],  # type: ignore[union-attr]
            "postgres": lambda: _pg_backends(name),
            "this process": lambda: [os.getpid()],
        }
        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=BODY.decode(), key=key))
        wrk = shutil.which("wrk")
        tool = {"wrk": wrk, "lua": str(lua), "key": key}
        direct = {"name": "direct", "port": up_port, "path": "/generate"}
        gated = {"name": "charter", "port": port, "path": "/tgi/bench/generate"}

        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            lat = _child("latency", {"targets": [direct, gated], "key": key, "n": args.requests,
                                     "warmup": 50, "block": 50, "budget_s": 15},
                         timeout=120)
            one: dict[str, Any] = {"lat": lat}
            for target in (direct, gated):
                with CpuMeter(groups) as meter:
                    one[target["name"]] = _throughput(tool, target["port"], target["path"],
                                                      32, args.duration)
                one[target["name"]]["cpu"] = dict(meter.used)
                one[target["name"]]["seconds"] = meter.seconds
            for target in (direct, gated):
                spec = {"port": target["port"], "path": target["path"].replace(
                    "generate", "generate_stream"), "key": key, "streams": args.streams,
                    "tokens": args.tokens, "timeout": 60}
                with CpuMeter(groups) as meter:
                    with RssPeak(_children(master) if target is gated else []) as peak:
                        one[f"{target['name']}_streams"] = _child("streams", spec, timeout=120)
                one[f"{target['name']}_streams"]["cpu"] = dict(meter.used)
                one[f"{target['name']}_streams"]["rss"] = peak.result()
            rounds.append(one)
            d_ms, c_ms = lat["ms"]["direct"], lat["ms"]["charter"]
            console.print(
                f"[dim]round {r + 1}: c=1 p50 {statistics.median(d_ms):.3f} / "
                f"{statistics.median(c_ms):.3f} ms, p99 {_pct(d_ms, .99):.3f} / "
                f"{_pct(c_ms, .99):.3f} ms; c=32 {one['direct']['rps']:,.0f} / "
                f"{one['charter']['rps']:,.0f} req/s; streams errors "
                f"{one['charter_streams']['errors']}; others used "
                f"{one['charter']['cpu']['others'] / one['charter']['seconds']:.2f} cores[/dim]")

        lag = _witness_lag(database_url, args.checkpoint_interval) if witness else None
        if lag is not None:
            console.print(
                f"commit-to-witnessed-checkpoint lag over {lag['events']:,} events "
                f"(checkpoint every {args.checkpoint_interval:g} s when events were written, "
                f"{lag['checkpoints']} checkpoints, {lag['cosigned']} cosigned): p50 "
                f"{lag['p50']:.2f} s, p99 {lag['p99']:.2f} s, max {lag['max']:.2f} s; "
                f"{lag['unwitnessed']} events not witnessed (goal: p99 <= 5 s)")
        with CpuMeter(groups) as meter:
            profile = _stage_profile(settings, key, args.profile_requests)
        profile["others"] = meter.used["others"] / meter.seconds
        spy = None
        if args.py_spy:
            spy = _pyspy_profile(args.py_spy, master, port, tool, args.duration + 3, groups, tmp)
        peer = (_peer_rounds(args, tool, groups, key, up_port, port, tmp)
                if args.litellm else None)
        rss = [_rss_mb(pid) for pid in _children(master)]
        profile["worker_rss_mb"] = statistics.median(rss) if rss else 0.0
        report(console, args, rounds, profile, spy, wrk, load_before, peer)
    finally:
        _stop(charter_proc)
        _stop(upstream)
        if args.witness:
            _stop(witness)
        if created:
            _drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)


# --- witnessing: how long an event waits for a witnessed checkpoint -------------------------

WITNESS_ORIGIN = "bench.charter/audit"


def _start_witness(tmp: Path, interval: float) -> tuple[subprocess.Popen[Any], dict[str, str]]:
    """A `charter witness serve` of its own, and the settings of a log that seals its
    events, signs checkpoints every `interval` seconds (when events were written) and
    submits each to that witness."""
    from charter.audit.keys import generate_key, load_signers
    from charter.audit.seal import make_seal_keys, write_new
    from charter.settings import Settings

    generate_key(tmp / "log.pem")
    keys = make_seal_keys(900)
    write_new(tmp / "seal.json", keys.sealing)
    made = subprocess.run([str(BIN / "charter"), "witness", "keygen", "--name", "bench/w1",
                           str(tmp / "witness.pem")], capture_output=True, text=True,
                          check=True)
    witness_key = made.stdout.rsplit(" ", 1)[1].strip()
    verifier = load_signers(Settings.from_env({}, audit_signing_keys=str(tmp / "log.pem"),
                                              audit_log_origin=WITNESS_ORIGIN))[0].verifier
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "charter"), "witness", "serve", "--name", "bench/w1", "--key",
         str(tmp / "witness.pem"), "--state", str(tmp / "witness.db"), "--log",
         f"{WITNESS_ORIGIN}={verifier}", "--bind", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_http(port, "/healthz", proc)
    return proc, {
        "CHARTER_AUDIT_SIGNING_KEYS": str(tmp / "log.pem"),
        "CHARTER_AUDIT_LOG_ORIGIN": WITNESS_ORIGIN,
        "CHARTER_AUDIT_SEAL_KEY": str(tmp / "seal.json"),
        "CHARTER_AUDIT_WITNESSES": f"{witness_key} http://127.0.0.1:{port}",
        "CHARTER_AUDIT_CHECKPOINT_INTERVAL_S": str(interval),
        "CHARTER_AUDIT_CHECKPOINT_POLL_S": str(min(1.0, interval / 4)),
    }


def _witness_lag(database_url: str, interval: float) -> dict[str, Any]:
    """For every event: the time from its commit (its `ts`) to the first cosignature of a
    checkpoint whose tree holds it. Waits one cadence for the last checkpoint first."""
    import bisect

    import psycopg

    time.sleep(interval + 2)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        cps = conn.execute(
            "SELECT c.size, min(s.cosigned_at) FROM audit_checkpoints c JOIN "
            "audit_cosignatures s ON s.checkpoint_id = c.id GROUP BY c.size ORDER BY c.size"
        ).fetchall()
        checkpoints = conn.execute("SELECT count(*) FROM audit_checkpoints").fetchone()[0]
        events = conn.execute("SELECT seq, ts FROM audit_events ORDER BY seq").fetchall()
    sizes = [size for size, _ in cps]
    earliest: list[Any] = [None] * len(cps)  # the first witnessing at this size or above
    for i in range(len(cps) - 1, -1, -1):
        at = cps[i][1]
        earliest[i] = at if i == len(cps) - 1 or at < earliest[i + 1] else earliest[i + 1]
    lags, unwitnessed = [], 0
    for seq, ts in events:
        i = bisect.bisect_left(sizes, seq)
        if i == len(sizes):
            unwitnessed += 1
            continue
        lags.append((earliest[i] - ts).total_seconds())
    lags.sort()
    return {"events": len(lags), "checkpoints": checkpoints, "cosigned": len(cps),
            "p50": _pct(lags, .5) if lags else 0.0, "p99": _pct(lags, .99) if lags else 0.0,
            "max": lags[-1] if lags else 0.0, "unwitnessed": unwitnessed}


# --- the peer: LiteLLM's proxy on the same upstream (OpenAI chat route) ------------------------

LITELLM_KEY = "sk-bench-litellm-master"  # noqa: S105 - a throwaway proxy on loopback
CHAT_PATH = "/v1/chat/completions"


def _chat_body(model: str) -> str:
    return json.dumps({"model": model, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Hello, world"}]})


def _start_litellm(exe: str, up_port: int, workers: int, tmp: Path) -> tuple[Any, int]:
    port = _free_port()
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: bench\n    litellm_params:\n"
        f"      model: openai/{MODEL_ID}\n      api_base: http://127.0.0.1:{up_port}/v1\n"
        "      api_key: unused\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n  telemetry: false\n")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen([exe, "--config", str(config), "--host", "127.0.0.1", "--port",
                             str(port), "--num_workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_http(port, "/health/liveliness", proc, timeout=120)
    return proc, port


def _peer_rounds(args: argparse.Namespace, tool: dict[str, Any], groups: dict[str, Any],
                 key: str, up_port: int, port: int, tmp: Path) -> list[dict[str, Any]]:
    proc, ll_port = _start_litellm(args.litellm, up_port, args.workers, tmp)
    try:
        groups["litellm"] = lambda: [proc.pid, *_descendants(proc.pid)]
        targets = [
            {"name": "direct", "port": up_port, "path": CHAT_PATH, "body": _chat_body(MODEL_ID),
             "key": "unused", "group": "upstream"},
            {"name": "charter", "port": port, "path": CHAT_PATH, "body": _chat_body("bench"),
             "key": key, "group": "charter"},
            {"name": "litellm", "port": ll_port, "path": CHAT_PATH,
             "body": _chat_body("bench"), "key": LITELLM_KEY, "group": "litellm"},
        ]
        for t in targets:
            lua = tmp / f"chat-{t['name']}.lua"
            lua.write_text(WRK_LUA.format(body=t["body"], key=t["key"]))
            t["lua"] = str(lua)
        rounds = []
        for _ in range(args.rounds):
            lat = _child("latency", {"targets": targets, "key": key, "n": args.requests,
                                     "warmup": 50, "block": 50, "budget_s": 30}, timeout=180)
            one: dict[str, Any] = {"lat": lat}
            for t in targets:
                with CpuMeter(groups) as meter:
                    one[t["name"]] = _throughput(tool, t["port"], t["path"], 32, args.duration,
                                                 lua=t["lua"])
                one[t["name"]]["cpu"] = dict(meter.used)
                one[t["name"]]["seconds"] = meter.seconds
            rounds.append(one)
        return rounds
    finally:
        groups.pop("litellm", None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def report_peer(console: Any, args: argparse.Namespace, rounds: list[dict[str, Any]]
                ) -> tuple[float, float, float]:
    """The OpenAI chat route: direct, Charter and LiteLLM side by side; (Charter's throughput,
    LiteLLM's, Charter's CPU per request over LiteLLM's)."""
    from rich.table import Table

    med = statistics.median
    t = Table(title=f"POST {CHAT_PATH}: direct, Charter and LiteLLM's proxy on the same stub "
                    f"(median of {args.rounds} rounds, {args.workers} workers each)")
    for col in ("path", "p50 ms c=1", "p99 ms c=1", "req/s c=32", "server CPU ms/req",
                "non-2xx/err"):
        t.add_column(col, justify="left" if col == "path" else "right")
    rows = (("direct", "direct to the stub", "upstream"), ("charter", "through Charter", "charter"),
            ("litellm", "through LiteLLM (master key, no DB)", "litellm"))
    rps = {name: med(r[name]["rps"] for r in rounds) for name, _, _ in rows}
    cpu = {name: med(r[name]["cpu"][group] * 1000 / max(1, r[name]["requests"]) for r in rounds)
           for name, _, group in rows}
    for name, label, _ in rows:
        bad = sum(r[name]["non2xx"] + r[name]["socket_errors"] + r["lat"]["errors"][name]
                  for r in rounds)
        t.add_row(label, f"{med(med(r['lat']['ms'][name]) for r in rounds):.3f}",
                  f"{med(_pct(r['lat']['ms'][name], .99) for r in rounds):.3f}",
                  f"{rps[name]:,.0f}", f"{cpu[name]:.3f}", str(bad))
    t.add_section()
    ratio = rps["charter"] / max(1e-9, rps["litellm"])
    t.add_row("Charter / LiteLLM", "", "", f"{ratio:.1f}x",
              f"{cpu['charter'] / max(1e-9, cpu['litellm']):.2f}x", "")
    console.print(t)
    console.print("  Charter's row has everything on (API key, dispatch policy, decision event "
                  "committed before dispatch, outcome event, usage); LiteLLM's proxy runs with a "
                  "master key and no database, i.e. less work.")
    return rps["charter"], rps["litellm"], cpu["charter"] / max(1e-9, cpu["litellm"])


def report(console: Any, args: argparse.Namespace, rounds: list[dict[str, Any]],
           profile: dict[str, Any], spy: dict[str, Any] | None, wrk: str | None,
           load_before: tuple[float, float, float],
           peer: list[dict[str, Any]] | None = None) -> None:
    from rich.table import Table

    med = statistics.median

    def lat(path: str, q: float) -> float:
        return med(med(r["lat"]["ms"][path]) if q == .5 else _pct(r["lat"]["ms"][path], q)
                   for r in rounds)

    def per_req(path: str, group: str) -> float:
        return med(r[path]["cpu"][group] * 1000 / max(1, r[path]["requests"]) for r in rounds)

    def rps(path: str) -> float:
        return med(r[path]["rps"] for r in rounds)

    added50 = med(med(r["lat"]["ms"]["charter"]) - med(r["lat"]["ms"]["direct"]) for r in rounds)
    added99 = med(_pct(r["lat"]["ms"]["charter"], .99) - _pct(r["lat"]["ms"]["direct"], .99)
                  for r in rounds)
    gen = "wrk -t1 -c32" if wrk else "Python threads (wrk not found)"
    console.print(f"[bold]Machine:[/bold] {_machine()}; load average before "
                  f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    console.print(f"Upstream: raw asyncio HTTP/1.1 stub (one process, keep-alive, canned TGI "
                  f"answers). Charter: `charter serve --workers {args.workers} --threads "
                  f"{args.threads}` (gunicorn, charter.serving.KeepAliveThreadWorker). "
                  f"Load: c=1 latency from a Python http.client process, c=32 throughput "
                  f"from {gen}, streams from an asyncio client process. {args.rounds} "
                  f"rounds, medians; every process shares the same {os.cpu_count()} cores.")

    t = Table(title=f"POST /generate: direct vs through Charter (median of {args.rounds} rounds)")
    for col in ("path", "p50 ms c=1", "p99 ms c=1", "req/s c=32", "server CPU ms/req",
                "PostgreSQL CPU ms/req", "load-gen CPU ms/req", "others (cores)", "non-2xx/err"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for path, label, group in (("direct", "direct to the stub", "upstream"),
                               ("charter", "through Charter /tgi/bench/generate", "charter")):
        bad = sum(r[path]["non2xx"] + r[path]["socket_errors"] for r in rounds) + sum(
            r["lat"]["errors"][path] for r in rounds)
        t.add_row(label, f"{lat(path, .5):.3f}", f"{lat(path, .99):.3f}", f"{rps(path):,.0f}",
                  f"{per_req(path, group):.3f}", f"{per_req(path, 'postgres'):.3f}",
                  f"{per_req(path, 'load generator'):.3f}",
                  f"{med(r[path]['cpu']['others'] / r[path]['seconds'] for r in rounds):.2f}",
                  str(bad))
    t.add_section()
    t.add_row("Charter vs direct", f"+{added50:.3f}", f"+{added99:.3f}",
              f"{rps('direct') / rps('charter'):.1f}x fewer",
              f"{per_req('charter', 'charter') / max(1e-9, per_req('direct', 'upstream')):.0f}x",
              "", "", "", "")
    console.print(t)
    console.print("  'server CPU' is the stub's process for the direct row and Charter's gunicorn "
                  "master + workers for the Charter row (user+sys from /proc, / requests "
                  "completed); 'others' is CPU used by processes outside this benchmark during "
                  "the c=32 runs (interference), in cores.")
    peer_rps = report_peer(console, args, peer) if peer else None
    peer_ok = (peer_rps[0] >= GOAL_PEER_RATIO * peer_rps[1]) if peer_rps else None
    peer_cpu_ok = (peer_rps[2] <= GOAL_PEER_CPU) if peer_rps else None
    if peer is None:
        console.print("  LiteLLM's proxy was not run (install it in a separate environment, "
                      "`python -m venv /tmp/ll && /tmp/ll/bin/pip install 'litellm[proxy]'`, and "
                      "pass --litellm /tmp/ll/bin/litellm). DESIGN.md's yardstick: +20.5 ms p50, "
                      "~20 ms CPU/req, ~90 req/s.")

    s = Table(title=f"{args.streams} concurrent streams, {args.tokens} tokens each, "
                    f"{args.token_delay_ms:g} ms per token upstream (median of rounds)")
    for col in ("path", "errors (all rounds)", "TTFT p50 ms", "TTFT p99 ms", "stream p50 ms",
                "stream p99 ms", "server CPU ms/stream"):
        s.add_column(col, justify="left" if col == "path" else "right")
    for path, label, group in (("direct_streams", "direct to the stub", "upstream"),
                               ("charter_streams", "through Charter", "charter")):
        errs = sum(r[path]["errors"] for r in rounds)
        kinds = sorted({k for r in rounds for k in r[path]["error_kinds"]})

        def q(field: str, p: float, path: str = path) -> str:
            vals = [_pct(r[path][field], p) for r in rounds if r[path][field]]
            return f"{med(vals):.1f}" if vals else "-"

        s.add_row(label, f"{errs}" + (f" ({', '.join(kinds)})" if kinds else ""),
                  q("ttft", .5), q("ttft", .99), q("total", .5), q("total", .99),
                  f"{med(r[path]['cpu'][group] * 1000 / args.streams for r in rounds):.2f}")
    console.print(s)
    rss = [r["charter_streams"].get("rss") for r in rounds if r["charter_streams"].get("rss")]
    stream_kb = med(max(0.0, x["peak"] - x["before"]) * 1024 / args.streams for x in rss) \
        if rss else float("nan")
    if rss:
        console.print(f"  Memory: the {rss[0]['workers']} workers held "
                      f"{med(x['before'] for x in rss):.0f} MB before the streams and "
                      f"{med(x['peak'] for x in rss):.0f} MB at their peak: about "
                      f"{stream_kb:.0f} KB a stream while it is open.")
    setup_cpu = med(r["charter_streams"]["cpu"]["charter"] for r in rounds)
    console.print(f"  Charter used {setup_cpu:.1f} s of CPU per round of {args.streams} streams "
                  f"on {os.cpu_count()} shared cores: TTFT is mostly queueing for CPU. A "
                  f"stream holds one of the {args.workers} x {args.threads} threads only until "
                  "its first byte; its worker's relay (charter/relay.py) carries it from there.")

    charter_cpu = per_req("charter", "charter")
    stream_errors = sum(r["charter_streams"]["errors"] for r in rounds)
    def ttft(path: str) -> float:
        vals = [_pct(r[path]["ttft"], .5) for r in rounds if r[path]["ttft"]]
        return med(vals) if vals else float("nan")

    ttft_ratio = ttft("charter_streams") / max(1e-9, ttft("direct_streams"))
    stream_cpu_ratio = (med(r["charter_streams"]["cpu"]["charter"] for r in rounds)
                        / max(1e-9, med(r["direct_streams"]["cpu"]["upstream"]
                                        for r in rounds)))

    figures = [
        figure("added latency p50 at c=1", added50, "ms", baseline="direct",
               baseline_value=lat("direct", .5), goal=f"<= {GOAL_P50_MS:g} ms",
               met=added50 <= GOAL_P50_MS),
        figure("added latency p99 at c=1", added99, "ms", baseline="direct",
               baseline_value=lat("direct", .99), goal=f"<= {GOAL_P99_MS:g} ms",
               met=added99 <= GOAL_P99_MS),
        figure("requests/s at c=32 through Charter", rps("charter"), "/s",
               baseline="direct", baseline_value=rps("direct")),
        figure("Charter CPU per request (c=32)", charter_cpu, "ms",
               goal=f"<= {GOAL_CPU_MS:g} ms", met=charter_cpu <= GOAL_CPU_MS),
        figure(f"{args.streams} concurrent streams: errors", stream_errors, "",
               goal="0", met=stream_errors == 0),
        figure(f"{args.streams} concurrent streams: TTFT p50", ttft("charter_streams"), "ms",
               baseline="direct", baseline_value=ttft("direct_streams")),
        figure("RSS per API worker after the run", profile.get("worker_rss_mb", 0.0), "MB"),
        figure("load average (1 min) before the run", load_before[0], "",
               note="c=1 goals ask for a quiet machine"),
        figure(f"memory a stream while open ({args.streams} at once)", stream_kb, "KB"),
    ]
    if peer_rps:
        figures.append(figure("requests/s at c=32, Charter vs LiteLLM", peer_rps[0], "/s",
                              baseline="LiteLLM proxy", baseline_value=peer_rps[1],
                              goal=f">= {GOAL_PEER_RATIO:g}x", met=peer_ok))
        figures.append(figure("CPU per request, Charter over LiteLLM", peer_rps[2], "x",
                              goal=f"<= {GOAL_PEER_CPU:g}x", met=peer_cpu_ok))
    figures += [
        figure(f"{args.streams} streams: TTFT p50 over direct", ttft_ratio, "x",
               goal=f"<= {GOAL_TTFT_RATIO:g}x", met=ttft_ratio <= GOAL_TTFT_RATIO),
        figure(f"{args.streams} streams: server CPU over direct", stream_cpu_ratio, "x",
               goal=f"<= {GOAL_STREAM_CPU_RATIO:g}x",
               met=stream_cpu_ratio <= GOAL_STREAM_CPU_RATIO)]
    emit(f"gateway_{args.streams}_streams", figures, workers=args.workers,
         threads=args.threads, rounds=args.rounds)
    g = Table(title="Goals")
    for col in ("goal", "measured", "met"):
        g.add_column(col, justify="left" if col == "goal" else "right")
    for goal, value, ok in (
        (f"added p50 at c=1 <= {GOAL_P50_MS:g} ms", f"+{added50:.3f} ms", added50 <= GOAL_P50_MS),
        (f"added p99 at c=1 <= {GOAL_P99_MS:g} ms", f"+{added99:.3f} ms", added99 <= GOAL_P99_MS),
        (f"Charter CPU per request <= {GOAL_CPU_MS:g} ms (c=32)", f"{charter_cpu:.3f} ms",
         charter_cpu <= GOAL_CPU_MS),
        (f"{args.streams} concurrent streams, 0 errors",
         f"{stream_errors} errors in {args.rounds} x {args.streams}",
         stream_errors == 0 and args.streams >= GOAL_STREAMS),
        (f">= {GOAL_PEER_RATIO:g}x LiteLLM's throughput (c=32, same stub)",
         f"{peer_rps[0] / max(1e-9, peer_rps[1]):.1f}x" if peer_rps else "not run", peer_ok),
        (f"CPU per request <= {GOAL_PEER_CPU:g}x LiteLLM's",
         f"{peer_rps[2]:.2f}x" if peer_rps else "not run", peer_cpu_ok),
        (f"{args.streams} streams: TTFT p50 <= {GOAL_TTFT_RATIO:g}x direct",
         f"{ttft_ratio:.1f}x", ttft_ratio <= GOAL_TTFT_RATIO),
        (f"{args.streams} streams: server CPU <= {GOAL_STREAM_CPU_RATIO:g}x direct",
         f"{stream_cpu_ratio:.1f}x", stream_cpu_ratio <= GOAL_STREAM_CPU_RATIO),
        ("RSS per API worker after the run (reported)",
         f"{profile.get('worker_rss_mb', 0.0):.0f} MB", None),
        ("load average before the run (c=1 goals: a quiet machine)",
         f"{load_before[0]:.2f}", None),
        (f"memory a stream while open, {args.streams} at once (reported)",
         f"{stream_kb:.0f} KB", None),
    ):
        mark = ("[dim]-[/dim]" if ok is None else "[green]yes[/green]" if ok
                else "[red]NO[/red]")
        g.add_row(goal, value, mark)
    console.print(g)

    p = Table(title=f"Where a request's time goes: the real Flask app in-process, c=1, "
                    f"{args.profile_requests} requests (exclusive time per stage)")
    for col in ("stage", "calls/req", "wall ms/req", "CPU ms/req", "SQL stmts", "SQL ms",
                "COMMITs", "COMMIT ms", "pre-pings", "ping ms"):
        p.add_column(col, justify="left" if col == "stage" else "right")
    stages = sorted(profile["stages"].items(), key=lambda kv: -kv[1].get("wall", 0))
    for stage, v in stages:
        calls = "" if stage == StageTimer.REST else f"{v.get('calls', 0):.1f}"
        p.add_row(stage, calls, f"{v.get('wall', 0) * 1000:.3f}", f"{v.get('cpu', 0) * 1000:.3f}",
                  f"{v.get('sql_n', 0):.1f}", f"{v.get('sql_ms', 0):.3f}",
                  f"{v.get('commit_n', 0):.1f}", f"{v.get('commit_ms', 0):.3f}",
                  f"{v.get('ping_n', 0):.1f}", f"{v.get('ping_ms', 0):.3f}")
    p.add_section()
    tot = {k: sum(v.get(k, 0) for _, v in stages) for k in
           ("sql_n", "sql_ms", "commit_n", "commit_ms", "ping_n", "ping_ms")}
    p.add_row("total (mean; p50 " + f"{profile['p50_ms']:.3f} ms)", "",
              f"{profile['mean_ms']:.3f}",
              f"{profile['cpu_ms']:.3f}", f"{tot['sql_n']:.1f}", f"{tot['sql_ms']:.3f}",
              f"{tot['commit_n']:.1f}", f"{tot['commit_ms']:.3f}", f"{tot['ping_n']:.1f}",
              f"{tot['ping_ms']:.3f}")
    console.print(p)
    if profile["missing"]:
        console.print(f"  [yellow]Not found in this code (not timed): "
                      f"{', '.join(profile['missing'])}[/yellow]")
    trips = tot["sql_n"] + 2 * tot["commit_n"] + tot["ping_n"]
    floors = "; ".join(f"{k}: {w:.3f} ms wall, {c:.3f} ms CPU"
                       for k, (w, c) in profile["floors"].items())
    console.print(f"  SQLAlchemy round trips per request ≈ {trips:.0f} (statements + BEGIN/COMMIT "
                  f"per transaction + pool pre-pings); the group commit's own psycopg "
                  f"connection adds 1 round trip per transaction (charter_audit_append, the "
                  f"commit included), shared by the requests of a batch (not in the SQL "
                  f"columns). Floors on this machine: {floors}.")
    console.print(f"  Same path through gunicorn at c=1: p50 {lat('charter', .5):.3f} ms "
                  f"(stub alone {lat('direct', .5):.3f} ms) vs in-process p50 "
                  f"{profile['p50_ms']:.3f} ms. Processes outside this benchmark used "
                  f"{profile['others']:.2f} cores during the in-process profile.")
    console.print("  Through the werkzeug test client (no gunicorn, no client socket); the "
                  "stub's time is inside 'node call'. SQL/COMMIT/ping columns are part of the "
                  "stage's wall time; CPU is this thread's only (PostgreSQL's is not in it).")

    if spy is None:
        console.print("[dim]py-spy profile skipped (pass --py-spy PATH; install with "
                      "`pip install --target /tmp/pyspy py-spy`).[/dim]")
        return
    if not spy["total"]:
        console.print(f"[red]py-spy collected no samples[/red] {spy['errors']}")
        return
    sp = Table(title=f"py-spy on the gunicorn workers at c=32 ({spy['rps']:,.0f} req/s, "
                     f"{spy['cpu_ms']:.2f} ms CPU/req; on-CPU samples by stage)")
    for col in ("stage", "share", "≈ CPU ms/req", "top libraries inside (share of stage)"):
        sp.add_column(col, justify="left" if col in ("stage", "top libraries inside (share "
                                                     "of stage)") else "right")
    for stage, count in sorted(spy["by_stage"].items(), key=lambda kv: -kv[1]):
        libs = sorted(((lib, c) for (st, lib), c in spy["cross"].items() if st == stage),
                      key=lambda kv: -kv[1])[:3]
        sp.add_row(stage, f"{count / spy['total']:.1%}",
                   f"{count / spy['total'] * spy['cpu_ms']:.3f}",
                   ", ".join(f"{lib} {c / count:.0%}" for lib, c in libs))
    console.print(sp)
    libs_line = ", ".join(f"{lib} {c / spy['total']:.1%}" for lib, c in
                          sorted(spy["by_lib"].items(), key=lambda kv: -kv[1]))
    console.print(f"  By library of the innermost frame: {libs_line}")
    console.print("  py-spy counts threads the kernel reports running or runnable: with the "
                  "cores oversubscribed, threads just woken by a PostgreSQL reply and waiting "
                  "for a CPU count too, so frames next to I/O (psycopg) are over-represented.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="c=1 requests per path and round")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per c=32 run")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--token-delay-ms", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=(os.cpu_count() or 1) + 1,
                    help="worker processes of Charter and of LiteLLM (`charter serve`'s default)")
    ap.add_argument("--threads", type=int, default=256, help="as `charter serve` defaults")
    ap.add_argument("--profile-requests", type=int, default=300)
    installed = os.environ.get("CHARTER_BENCH_LITELLM")  # scripts/bench-tools' (make bench)
    ap.add_argument("--litellm", default=installed if installed and os.access(installed, os.X_OK)
                    else shutil.which("litellm"),
                    help="LiteLLM proxy executable (its own environment) to compare with")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"),
                    help="py-spy binary for the worker profile (default: on PATH)")
    ap.add_argument("--witness", action="store_true",
                    help="seal, sign and witness the log (a `charter witness serve` of its "
                    "own) and report the commit-to-witnessed-checkpoint lag")
    ap.add_argument("--checkpoint-interval", type=float, default=2.0,
                    help="with --witness: CHARTER_AUDIT_CHECKPOINT_INTERVAL_S")
    ap.add_argument("--failover", type=float, default=0.0, metavar="SECONDS",
                    help="instead: the two-node run, SECONDS long (one node killed and "
                    "started again every few seconds; errors and throughput)")
    ap.add_argument("--kill-every", type=float, default=3.0,
                    help="with --failover: seconds between kills of the eu-central node")
    ap.add_argument("--limits", action="store_true",
                    help="instead: what limits cost, one key under every limit kind against "
                    "one under none, on the same workers (bench/limits.py)")
    ap.add_argument("--inspection", action="store_true",
                    help="instead: what content inspection costs, one key whose requests "
                    "are inspected against one whose are not, 1 KB and 16 KB prompts, on "
                    "the same workers (bench/inspection.py)")
    ap.add_argument("--redis", default=os.environ.get("CHARTER_BENCH_REDIS",
                                                      "redis://127.0.0.1:6379/14"),
                    help="with --limits: the limits' Redis")
    ap.add_argument("--time-limit", type=int, default=600, help="abort after this many seconds")
    ap.add_argument("--role", choices=("upstream", "latency", "streams", "load"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    spec = json.loads(args.spec)
    if args.role == "upstream":
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            asyncio.run(_serve_upstream(spec["delay_ms"] / 1000, spec.get("port", 0)))
        return
    if args.role:
        result = {"latency": _latency_client, "load": _load_client,
                  "streams": lambda s: asyncio.run(_streams(s))}[args.role](spec)
        print(json.dumps(result))
        return

    def too_long(*_: object) -> None:
        raise TimeoutError(f"the benchmark ran past {args.time_limit}s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(args.time_limit)
    if args.limits:
        from limits import run_limits

        run_limits(args)
        return
    if args.inspection:
        from inspection import run_inspection

        run_inspection(args)
        return
    if args.failover:
        from failover import run_failover

        run_failover(args)
        return
    run(args)


if __name__ == "__main__":
    main()

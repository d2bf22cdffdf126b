"""Benchmark: what one gateway request costs Charter, counted by callgrind (instructions)
and by the clock (CPU ms), for this checkout and another side by side.

On a shared 2-core machine the CPU time of the same request moves by 10-40% from minute to
minute (bench/gateway.py's rounds show it), too much to tell a 5% change. Instructions
do not move: callgrind counts those Charter's process executes (every thread), whatever
else the machine does. The request is the one bench/gateway.py sends
(`POST /tgi/bench/generate`, API key, the dispatch policy, the decision committed before
the node is called, the outcome queued), in-process through Flask's test client, against
the same fast stub and the same seeded database for both checkouts; PostgreSQL's own work
is in neither figure. Instructions per request = (count at N2 - count at N1) / (N2 - N1),
so start-up and warm-up cancel out.

    python bench/request_cost.py --baseline /path/to/another/worktree

The baseline checkout runs on its own virtual environment in `.venv` where it has one, else
on this checkout's with its own code first on the path (enough for a worktree of another
commit with the same dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import emit, figure
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
BODY = b'{"inputs":"Hello, world","parameters":{"max_new_tokens":8}}'

# The measured program: the checkout's own app over the seeded database. It knows both
# wirings: create_app(runtime) (charter.boot) and, before it, create_app(settings).
CHILD = r'''
import json, sys, time
spec = json.loads(sys.argv[1])
from charter.settings import Settings
extra = {"audit_seal_key": spec["seal_key"]} if spec.get("seal_key") else {}
if spec.get("limits_redis_url"):
    extra["limits_redis_url"] = spec["limits_redis_url"]
settings = Settings.from_env({}, database_url=spec["url"], secret_key=spec["secret"],
                             node_allowed_networks="127.0.0.0/8", log_level="WARNING",
                             **extra)
from charter.app import create_app
try:
    from charter import scope
    from charter.boot import build_runtime
except ImportError:
    from charter import db
    from charter.policy import service as policy
    db.configure(settings)
    policy.configure(settings)
    app = create_app(settings)
else:
    runtime = build_runtime(settings)
    scope.bind(runtime)
    app = create_app(runtime)
client = app.test_client()
headers = {"Authorization": "Bearer " + spec["key"], "Content-Type": "application/json"}
body = spec["body"].encode()
for _ in range(spec["warmup"]):
    assert client.post("/tgi/bench/generate", data=body, headers=headers).status_code == 200
t0 = time.thread_time()
for _ in range(spec["n"]):
    assert client.post("/tgi/bench/generate", data=body, headers=headers).status_code == 200
print(json.dumps({"cpu_ms": (time.thread_time() - t0) * 1000 / max(1, spec["n"])}))
'''


def _python(checkout: Path) -> str:
    own = checkout / ".venv" / "bin" / "python"
    return str(own if own.exists() else ROOT / ".venv" / "bin" / "python")


def _env(checkout: Path) -> dict[str, str]:
    """The child's environment: a checkout without a virtual environment of its own runs
    on this one's, its own code first on the path (a worktree of another commit with the
    same dependencies needs no second install)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    if not (checkout / ".venv").exists():
        env["PYTHONPATH"] = str(checkout / "platform")
    return env


def _instructions(checkout: Path, spec: dict[str, object], out: Path) -> int:
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
         _python(checkout), "-c", CHILD, json.dumps(spec)],
        check=True, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**_env(checkout),
             "PYTHONMALLOC": "malloc"})
    total = 0
    for path in out.parent.glob(out.name + "*"):  # one file a thread with --separate-threads
        found = re.search(r"^summary: (\d+)", path.read_text(errors="replace"), re.M)
        if found:
            total += int(found.group(1))
    return total


def _cpu_ms(checkout: Path, spec: dict[str, object]) -> float:
    done = subprocess.run([_python(checkout), "-c", CHILD, json.dumps(spec)], check=True,
                          cwd=checkout, capture_output=True, text=True, env=_env(checkout))
    return float(json.loads(done.stdout.strip().splitlines()[-1])["cpu_ms"])


def _limited_key(settings: object, redis_url: str) -> str:
    """A second team, its key under every limit kind (never reached in a run)."""
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key, set_api_key_limits
    from charter.identity.teams import create_service_account, create_team

    big = 10**12
    team = create_team(SYSTEM, name="bench-limited", description="", requests_per_day=10**9,
                       entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                       default_data_class="internal",
                       limits={"requests_per_minute": 10**9, "tokens_per_minute": big,
                               "tokens_per_day": big, "tokens_per_month": big,
                               "concurrent_streams": 10_000})
    bot = create_service_account(SYSTEM, team.id, username="bench-limited-bot")
    issued = create_api_key(SYSTEM, bot.id, name="bench-limited")
    set_api_key_limits(SYSTEM, issued.key.id, {"requests_per_minute": 10**9,
                                               "tokens_per_day": big})
    return issued.token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path,
                    help="another checkout (e.g. a git worktree of the previous commit)")
    ap.add_argument("--sealing", action="store_true",
                    help="instead: this checkout with event seals against without them")
    ap.add_argument("--limits", metavar="REDIS_URL",
                    help="instead: this checkout with a team and a key under all five "
                    "limits (high enough never to refuse), their state in this Redis, "
                    "against a team without limits")
    ap.add_argument("--n1", type=int, default=20)
    ap.add_argument("--n2", type=int, default=120)
    ap.add_argument("--cpu-requests", type=int, default=1000)
    ap.add_argument("--cpu-rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    import gateway as gw  # the stub, the database and the seeding of bench/gateway.py


    console = Console()
    if args.sealing or args.limits:
        sides = {"this checkout": ROOT, "baseline": ROOT}  # on vs off, same code
    elif args.baseline is None:
        raise SystemExit("give --baseline DIR, --sealing or --limits REDIS_URL")
    else:
        sides = {"this checkout": ROOT, "baseline": args.baseline.resolve()}
    name = f"charter_bench_cost_{os.getpid()}"
    with gw.seeded(name, delay_ms=10) as world:
        settings = world.settings
        base = {"url": world.url, "secret": gw.SECRET, "key": world.key,
                "body": BODY.decode(), "warmup": 20}
        results: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            specs = {side: dict(base) for side in sides}
            if args.sealing:
                from charter.audit.seal import make_seal_keys, write_new

                write_new(Path(tmp) / "seal.json", make_seal_keys().sealing)
                specs["this checkout"]["seal_key"] = str(Path(tmp) / "seal.json")
            if args.limits:
                specs["this checkout"].update(key=_limited_key(settings, args.limits),
                                              limits_redis_url=args.limits)
            for side, checkout in sides.items():
                counts = [_instructions(checkout, {**specs[side], "n": n},
                                        Path(tmp) / f"cg-{side[:4]}-{n}.out")
                          for n in (args.n1, args.n2)]
                results[side] = {"instructions": (counts[1] - counts[0]) / (args.n2 - args.n1)}
            cpu: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.cpu_rounds):  # alternated, so that load drifts hit both
                for side, checkout in sides.items():
                    cpu[side].append(_cpu_ms(checkout, {**specs[side],
                                                        "n": args.cpu_requests}))
            for side in sides:
                results[side]["cpu_ms"] = statistics.median(cpu[side])
                results[side]["cpu_spread"] = max(cpu[side]) - min(cpu[side])
    table = Table(title="one gateway request, in-process (Flask test client), Charter's own work")
    for col in ("checkout", "instructions / request", "ratio", "CPU ms / request (median)",
                "CPU ratio"):
        table.add_column(col, justify="right")
    ref = results["baseline"]
    for side, r in results.items():
        table.add_row(side, f"{r['instructions']:,.0f}",
                      f"{r['instructions'] / ref['instructions']:.3f}",
                      f"{r['cpu_ms']:.3f} (spread {r['cpu_spread']:.3f})",
                      f"{r['cpu_ms'] / ref['cpu_ms']:.3f}")
    console.print(table)
    said = ("the same, unsealed" if args.sealing else "the same, a team without limits"
            if args.limits else sides["baseline"])
    console.print(f"baseline: {said}; "
                  "load average after: "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"{time.strftime('%Y-%m-%d %H:%M')}")
    mine = results["this checkout"]
    emit("request_cost", [
        figure("instructions per gateway request", mine["instructions"], "instr",
               baseline="baseline checkout", baseline_value=ref["instructions"]),
        figure("CPU per gateway request (in-process)", mine["cpu_ms"], "ms",
               baseline="baseline checkout", baseline_value=ref["cpu_ms"])])


if __name__ == "__main__":
    main()

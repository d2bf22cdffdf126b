"""The performance report: every benchmark in one run, each figure beside its baseline from the
same run, and the machine it ran on, as a Markdown table (`make bench`).

    python bench/report.py [--quick] [--out docs/performance-report.md] [--only NAME ...]

Each benchmark runs as its own process (its medians over its own rounds) and hands its key
figures back through bench/results.py. --quick shrinks every run (a smoke test of the
harness, not figures to quote). The detail tables stay in each benchmark's own output,
saved beside the report as <out>.d/<name>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable

# name: (script, full arguments, quick arguments)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "audit_append": ("audit_append.py", [], ["--events", "2000", "--rounds", "2"]),
    "audit_head": ("audit_head.py", ["--seconds", "5"], ["--seconds", "1.5"]),
    "scaleout": ("scaleout.py", ["--duration", "5"], ["--duration", "2"]),
    "policy": ("policy.py", [], ["--inprocess", "500", "--remote", "200"]),
    "verify": ("verify.py", [], ["--events", "5000", "--rounds", "2"]),
    "gateway_200": ("gateway.py", ["--streams", "200"],
                    ["--rounds", "1", "--requests", "100", "--duration", "1.5",
                     "--streams", "50", "--profile-requests", "50"]),
    # 1,000 streams at once on `charter serve`'s default 256 threads a worker: the relay
    # holds streams without threads (issue 26).
    "gateway_1000": ("gateway.py", ["--streams", "1000", "--rounds", "1", "--litellm", ""],
                     ["--rounds", "1", "--requests", "50", "--duration", "1", "--streams",
                      "300", "--profile-requests", "20", "--litellm", ""]),
    "batch": ("batch.py", [], ["--lines", "300", "--rounds", "1"]),
    "serving": ("serving.py", [], ["--rounds", "1", "--requests", "100"]),
    "limits": ("gateway.py", ["--limits", "--rounds", "6", "--duration", "5"],
               ["--limits", "--rounds", "2", "--duration", "2", "--requests", "100"]),
    "inspection": ("gateway.py", ["--inspection", "--rounds", "4", "--duration", "4"],
                   ["--inspection", "--rounds", "2", "--duration", "2", "--requests", "60"]),
    "usage": ("usage.py", ["--requests", "1000"], ["--requests", "200"]),
    "container": ("container.py", ["--duration", "8"], ["--duration", "4"]),
}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    try:
        pg = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc",
                             "SHOW server_version"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pg = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "postgresql": pg or "unknown",
            "kernel": platform.release()}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "-"
    if unit == "/s" or abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip() if unit not in ("", "/s") else (
        text + ("/s" if unit == "/s" else ""))


def table(results: dict[str, Any]) -> list[str]:
    lines = ["| benchmark | figure | value | baseline (same run) | ratio | goal | met |",
             "|---|---|---|---|---|---|---|"]
    for bench, data in results.items():
        for f in data.get("figures", []):
            base = (f"{f['baseline']}: {fmt(f['baseline_value'], f['unit'])}"
                    if f.get("baseline") else "")
            ratio = f"{f['ratio']:.2f}x" if f.get("ratio") else ""
            met = {True: "yes", False: "**no**", None: ""}[f.get("met")]
            name = f"{f['figure']} ({f['note']})" if f.get("note") else f["figure"]
            lines.append(f"| {bench} | {name} | {fmt(f['value'], f['unit'])} | {base} "
                         f"| {ratio} | {f.get('goal', '')} | {met} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small runs: check the harness")
    ap.add_argument("--out", type=Path, help="write the Markdown report here too")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    args = ap.parse_args()
    names = args.only or list(BENCHES)
    results: dict[str, Any] = {}
    runs: list[str] = []
    detail = args.out.with_suffix(".d") if args.out else Path(tempfile.mkdtemp())
    detail.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    for name in names:
        script, full, quick = BENCHES[name]
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out_json = Path(tmp.name)
        env = {**os.environ, "CHARTER_BENCH_JSON": str(out_json)}
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        cmd = [PY, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        with (detail / f"{name}.txt").open("w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=3600)
        took = time.monotonic() - t0
        got = json.loads(out_json.read_text()) if out_json.stat().st_size else {}
        out_json.unlink()
        for bench, data in got.items():
            results[name if len(got) == 1 else bench] = data
        status = "ok" if proc.returncode == 0 and got else f"FAILED (exit {proc.returncode})"
        runs.append(f"| {name} | {took:.0f} s | {load:.2f} -> {os.getloadavg()[0]:.2f} | "
                    f"{status} |")
        print(f"   {status} in {took:.0f} s", flush=True)
    m = machine()
    kind = "quick harness check, not figures to quote" if args.quick else "full run"
    report = [
        f"# Performance report ({kind})",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC by `python bench/report.py"
        f"{' --quick' if args.quick else ''}`. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, PostgreSQL "
        f"{m['postgresql']} on the same machine. Every process (load generators, stubs, "
        "PostgreSQL, Charter) shares those cores: compare ratios, not absolute figures.",
        "",
        *table(results),
        "",
        "| run | took | load average before -> after | status |",
        "|---|---|---|---|",
        *runs,
        "",
        f"Each benchmark's own tables (rounds, CPU per process, profiles): `{detail}/`.",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

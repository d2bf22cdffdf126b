"""Key figures of a benchmark as JSON, for bench/report.py: each benchmark calls `emit` once at
its end. Nothing is written unless CHARTER_BENCH_JSON names a file (the report sets it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def figure(name: str, value: float, unit: str, *, baseline: str = "",
           baseline_value: float | None = None, goal: str = "", met: bool | None = None,
           note: str = "") -> dict[str, Any]:
    """One line of the report: a figure beside the baseline it was measured with."""
    ratio = (value / baseline_value) if baseline_value else None
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "goal": goal, "met": met,
            "note": note}


def emit(bench: str, figures: list[dict[str, Any]], **context: Any) -> None:
    path = os.environ.get("CHARTER_BENCH_JSON")
    if not path:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.exists() and target.stat().st_size else {}
    data[bench] = {"figures": figures, "context": context}
    target.write_text(json.dumps(data, indent=1))

"""Evaluation results as evidence: lm-eval-harness's results JSON and OpenCompass's summary,
read into tasks, metrics and values. Pure functions: no database, no Flask.

lm-eval-harness (`lm_eval --output_path`, `results_<date>.json`): `results` maps each task
(and group) to `"<metric>,<filter>": value` and `"<metric>_stderr,<filter>": stderr`
entries; `versions`, `n-shot`, `higher_is_better` and `n-samples` are per task;
`config.model_args` names the model (`pretrained=`, `model=`, `path=`, `peft=`) and its
`revision=`; `model_name` is the harness's own reading of it; `date` is when it started
(seconds since the epoch); `task_hashes` fingerprint the documents and prompts it used.

OpenCompass (`outputs/.../summary/summary_<time>.csv`): a header `dataset,version,metric,
mode` and one column per model (its abbreviation), a row per dataset and metric; `-` where
a model has no figure.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FORMATS = ("lm-eval", "opencompass")
NAME_KEYS = ("pretrained", "model", "path", "peft", "delta", "model_name")


class MalformedResults(ValueError):
    """Not a results file of the format it claims (or of either)."""


@dataclass(frozen=True, slots=True)
class Metric:
    task: str
    metric: str
    value: float
    filter: str = "none"
    stderr: float | None = None
    n_shot: int | None = None
    higher_is_better: bool | None = None
    task_version: str | None = None
    samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "filter": self.filter,
                "value": self.value, "stderr": self.stderr, "n_shot": self.n_shot,
                "higher_is_better": self.higher_is_better, "task_version": self.task_version,
                "samples": self.samples}


@dataclass(frozen=True, slots=True)
class Results:
    format: str
    names: tuple[str, ...]  # what the file calls the model it evaluated
    revision: str | None  # the revision it names, where it does
    evaluated_at: datetime | None
    metrics: tuple[Metric, ...]
    task_hashes: dict[str, str] = field(default_factory=dict)
    harness_version: str | None = None


def detect(content: str) -> str:
    """lm-eval for a JSON object, opencompass for a CSV with its header."""
    head = content.lstrip()[:1]
    if head == "{":
        return "lm-eval"
    if content.lstrip().lower().startswith("dataset,"):
        return "opencompass"
    raise MalformedResults("neither lm-eval-harness's results JSON nor an OpenCompass "
                           "summary CSV (`dataset,version,metric,mode,...`)")


def parse(content: str, fmt: str | None = None, *, column: str | None = None) -> Results:
    """The results in `content`. OpenCompass: `column` picks the model's column (every
    column is a model; the only one where there is one)."""
    fmt = fmt or detect(content)
    if fmt == "lm-eval":
        return _lm_eval(content)
    if fmt == "opencompass":
        return _opencompass(content, column)
    raise MalformedResults(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _lm_eval(content: str) -> Results:
    try:
        doc = json.loads(content)
    except ValueError as exc:
        raise MalformedResults(f"not JSON: {exc}") from None
    except RecursionError:
        raise MalformedResults("not JSON this parser can read: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise MalformedResults("lm-eval-harness's results JSON has an object `results`")
    per_task: dict[str, dict[str, Any]] = {
        k: _object(doc.get(k)) for k in ("versions", "n-shot", "higher_is_better", "n-samples")}
    metrics: list[Metric] = []
    for task, entries in doc["results"].items():
        if not isinstance(entries, dict):
            raise MalformedResults(f"`results.{task}` is not an object")
        better = per_task["higher_is_better"].get(task)
        samples = per_task["n-samples"].get(task)
        shots = per_task["n-shot"].get(task)
        version = per_task["versions"].get(task)
        for key, raw in entries.items():
            if "," not in key or key.split(",", 1)[0].endswith("_stderr"):
                continue  # `alias`, `name`, or a stderr (read beside its metric)
            name, filter_ = key.split(",", 1)
            value = _number(raw)
            if value is None:
                continue  # "N/A" and the like
            metrics.append(Metric(
                task=str(task), metric=name, filter=filter_, value=value,
                stderr=_number(entries.get(f"{name}_stderr,{filter_}")),
                n_shot=shots if isinstance(shots, int) and not isinstance(shots, bool)
                else None,
                higher_is_better=better.get(name) if isinstance(better, dict)
                and isinstance(better.get(name), bool) else None,
                task_version=None if version is None else str(version),
                samples=samples.get("effective") if isinstance(samples, dict)
                and isinstance(samples.get("effective"), int) else None))
    if not metrics:
        raise MalformedResults("`results` holds no numeric metric")
    args = _model_args(_object(doc.get("config")).get("model_args"))
    names = [args[k] for k in NAME_KEYS if args.get(k)]
    if isinstance(doc.get("model_name"), str) and doc["model_name"]:
        names.append(doc["model_name"])
    started = _number(doc.get("date"))
    hashes = _object(doc.get("task_hashes"))
    return Results(
        format="lm-eval", names=tuple(dict.fromkeys(names)),
        revision=args.get("revision") or None,
        evaluated_at=datetime.fromtimestamp(started, UTC) if started else None,
        metrics=tuple(metrics),
        task_hashes={str(k): str(v) for k, v in hashes.items() if isinstance(v, str)},
        harness_version=doc.get("lm_eval_version") if isinstance(
            doc.get("lm_eval_version"), str) else None)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _model_args(raw: Any) -> dict[str, str]:
    """`pretrained=org/name,revision=abc` (or the same as an object) as a dict."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items() if v is not None}
    if not isinstance(raw, str):
        return {}
    out = {}
    for part in raw.split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _opencompass(content: str, column: str | None) -> Results:
    try:
        rows = list(csv.reader(io.StringIO(content)))
    except csv.Error as exc:
        raise MalformedResults(f"not CSV this parser can read: {exc}") from None
    if not rows or [c.strip().lower() for c in rows[0][:4]] != [
            "dataset", "version", "metric", "mode"]:
        raise MalformedResults("an OpenCompass summary starts `dataset,version,metric,mode`")
    models = [c.strip() for c in rows[0][4:]]
    if not models:
        raise MalformedResults("the OpenCompass summary has no model column")
    if column is None and len(models) > 1:
        raise MalformedResults(f"the summary holds {len(models)} models "
                               f"({', '.join(models)}): name the one to attach")
    name = column if column is not None else models[0]
    if name not in models:
        raise MalformedResults(f"the summary has no column {name!r} "
                               f"(it has {', '.join(models)})")
    at = 4 + models.index(name)
    metrics = []
    for row in rows[1:]:
        if len(row) <= at or not row[0].strip() or row[0].startswith("-"):
            continue  # blank lines and section rules (`--------- 考试 Exam ---------`)
        try:
            value = float(row[at])
        except ValueError:
            continue  # `-`: no figure for this model
        if not math.isfinite(value):
            continue
        metrics.append(Metric(task=row[0].strip(), metric=row[2].strip() or "score",
                              filter=row[3].strip() or "none", value=value,
                              task_version=row[1].strip() or None))
    if not metrics:
        raise MalformedResults(f"the column {name!r} holds no numeric figure")
    # A column is a model's `abbr` from OpenCompass's config, by its convention the model's
    # name and the backend that ran it (`qwen2-0.5b-hf`, `...-vllm`): both are names of it.
    bare = re.sub(r"[-_](hf|vllm|lmdeploy|turbomind|api)$", "", name, flags=re.IGNORECASE)
    return Results(format="opencompass", names=tuple(dict.fromkeys((name, bare))),
                   revision=None, evaluated_at=None, metrics=tuple(metrics))


def matches(names: tuple[str, ...], known: list[str]) -> bool:
    """Whether a name the file gives is one the version goes by: its model's name, its
    repository, or a local path ending in the repository's last part."""
    wanted = {k.casefold() for k in known if k}
    wanted |= {k.rstrip("/").rsplit("/", 1)[-1].casefold() for k in known if k}
    for name in names:
        bare = name.rstrip("/")
        if bare.casefold() in wanted or (
                "/" in bare and bare.rsplit("/", 1)[-1].casefold() in wanted
                and bare.startswith(("/", ".", "~"))):
            return True
    return False

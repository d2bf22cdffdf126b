"""`charter models evaluate`: lm-eval-harness run through Charter's own gateway, its results
attached to the version as evidence.

The evaluation is a workload like any other: lm-eval-harness's `local-completions` model
sends every prompt to the gateway's `/v1/completions` with the caller's API key, so each
request is decided by the dispatch policy, sent only to attested nodes, limited, metered
and audited. The results file is then attached to the version (charter.registry), named
after the serving name it ran under. The key is never written into the results: lm-eval
records its model arguments, and the `header` that carries the key is removed first.

lm-eval-harness is an optional extra (`pip install 'charter[eval]'`); nothing is
downloaded: tasks come from lm-eval's own registry or a local folder of task YAML files
(`--include-path`), datasets from local files, the tokenizer from
CHARTER_TOKENIZERS_DIR (or `--tokenizer`), and the Hugging Face libraries run offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from charter.actor import Actor
from charter.errors import CharterError, ValidationFailedError
from charter.metering.tokens import tokenizer_folder
from charter.nodes import service as nodes
from charter.registry import service as registry
from charter.registry.models import Evaluation
from charter.registry.schemas import EvaluationIn


@dataclass(frozen=True)
class EvaluateOptions:
    tasks: tuple[str, ...]
    gateway: str  # Charter's base URL, e.g. http://127.0.0.1:8000
    api_key: str
    serving_name: str | None = None  # default: the version's active deployment
    tokenizer: str | None = None  # default: CHARTER_TOKENIZERS_DIR/<model>/<label>
    include_path: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None


def serving_name_of(version_id: str) -> str:
    """The serving name of the version's active deployment (the one if there is one)."""
    names = sorted(d.serving_name for d in nodes.list_deployments()
                   if d.version_id == version_id and d.active)
    if len(names) != 1:
        raise ValidationFailedError(
            "name the serving name to evaluate through (--serving-name): the version has "
            f"{len(names)} active deployments", code="serving_name_required",
            details={"deployments": names})
    return names[0]


def run_lm_eval(opts: EvaluateOptions, serving_name: str, tokenizer: str) -> dict[str, Any]:
    """lm-eval-harness's results document for the tasks, every request through the gateway."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CharterError("lm-eval-harness is not installed: pip install 'charter[eval]'",
                           code="lm_eval_missing", status=503) from None
    base = opts.gateway.rstrip("/")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": serving_name, "base_url": f"{base}/v1/completions",
                    "tokenizer": tokenizer, "tokenizer_backend": "huggingface",
                    "tokenized_requests": False, "num_concurrent": 1, "max_retries": 1,
                    "header": {"Authorization": f"Bearer {opts.api_key}"}},
        tasks=list(opts.tasks), limit=opts.limit, num_fewshot=opts.num_fewshot,
        task_manager=TaskManager(include_path=opts.include_path),
        log_samples=False)
    if not results:
        raise CharterError("lm-eval-harness returned no results", code="lm_eval_failed")
    return _without_secrets(results)


def _without_secrets(results: dict[str, Any]) -> dict[str, Any]:
    """The results as lm-eval reports them, without the header that carries the key."""
    config = results.get("config")
    if isinstance(config, dict) and isinstance(config.get("model_args"), dict):
        config["model_args"] = {k: v for k, v in config["model_args"].items()
                                if k != "header"}
    return results


def evaluate(actor: Actor, version_id: str, opts: EvaluateOptions) -> Evaluation:
    """Run the evaluation through the gateway and attach its results to the version."""
    version = registry.get_version(version_id)
    serving_name = opts.serving_name or serving_name_of(version_id)
    tokenizer = opts.tokenizer or _tokenizer_dir(version.model_name, version.label)
    results = run_lm_eval(opts, serving_name, tokenizer)
    content = json.dumps(results, indent=2, default=str, ensure_ascii=False)
    return registry.attach_evaluation(
        actor, version_id, EvaluationIn(content=content, format="lm-eval",
                                        file_name=f"lm-eval-{'+'.join(opts.tasks)}.json"),
        served_as=(serving_name,))


def _tokenizer_dir(model_name: str, label: str) -> str:
    from charter import scope

    root = scope.current().settings.tokenizers_dir
    folder = tokenizer_folder(root, model_name, label)
    if folder is None:
        raise ValidationFailedError(
            "lm-eval-harness needs the version's tokenizer: place it under "
            "CHARTER_TOKENIZERS_DIR/<model name>/<version label>/ or pass --tokenizer",
            code="tokenizer_missing", details={"tokenizers_dir": root or None})
    return str(folder)

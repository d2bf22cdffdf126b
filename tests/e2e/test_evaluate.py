"""`charter models evaluate`: lm-eval-harness runs on the tiny model through Charter's own
gateway, as a governed workload, and its results are attached as evaluation evidence.

A real run: the `charter` command in its own process, lm-eval-harness's
`local-completions` model sending every prompt to `charter serve`'s `/v1/completions`
with a team's key, a task defined from a small local data file (no hub, no download),
the dev node answering; then the results attached to the version.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.audit.service import EventFilter, list_events
from charter.registry import service as registry
from tests.e2e.sites import Site, governed_site
from tests.e2e.test_gateway import BIN

pytest.importorskip("lm_eval")  # the `eval` extra; CI installs it with `dev`

QUESTIONS = [("What does the audit log keep?", "every decision"),
             ("Who approves a version?", "an approver"),
             ("Where do models run?", "on attested nodes"),
             ("What pins a version?", "its digests")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def site(model_dir, configured, make_person, tmp_path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    with governed_site(model_dir, configured, make_person, tmp_path) as found:
        yield found


def _task(folder: Path) -> Path:
    """A generate-until task over a local JSON-lines file, as lm-eval-harness reads YAML."""
    folder.mkdir()
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in QUESTIONS))
    (folder / "charter_qa.yaml").write_text(f"""task: charter_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def test_an_evaluation_runs_through_the_gateway_and_is_attached(site, make_person,  # type: ignore[no-untyped-def]
                                                               tmp_path) -> None:
    steward = make_person("steward")
    before = len(list_events(EventFilter(action="dispatch.outcome", limit=1000)))
    done = subprocess.run(
        [str(BIN / "charter"), "models", "evaluate", site.version_id, "--tasks", "charter_qa",
         "--as", steward.actor.username, "--gateway", site.charter,
         "--include-path", str(_task(tmp_path / "tasks"))],
        env={**site.env, "OPENAI_API_KEY": site.key}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [evaluation] = registry.list_evaluations(site.version_id)
    assert done.stdout.strip() == evaluation.id
    assert evaluation.format == "lm-eval" and evaluation.model_named == ["tiny"]
    [metric] = evaluation.metrics
    assert (metric["task"], metric["metric"], metric["filter"]) == (
        "charter_qa", "exact_match", "none")
    assert 0.0 <= metric["value"] <= 1.0 and metric["samples"] == len(QUESTIONS)
    # A governed workload: every prompt was decided, sent to the node and audited.
    outcomes = list_events(EventFilter(action="dispatch.outcome", limit=1000))[before:]
    assert len(outcomes) == len(QUESTIONS)
    assert {o.details["team"] for o in outcomes} == {"apps"}
    assert all(o.outcome == "success" for o in outcomes)
    # The key the evaluation ran as is nowhere in what was kept.
    from charter.registry.models import Evaluation
    from charter.uow import unit_of_work

    with unit_of_work() as session:
        stored = session.get(Evaluation, evaluation.id)
        assert stored is not None
        content = stored.content
    assert site.key not in content and site.key.split("_", 2)[2] not in content
    assert json.loads(content)["config"]["model_args"]["model"] == "tiny"
    [attached] = list_events(EventFilter(action="version.evaluation_attach"))
    assert attached.details["tasks"] == ["charter_qa"]

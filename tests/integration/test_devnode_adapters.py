"""The dev node's multi-LoRA serving as a real process, driven by the real huggingface_hub and
openai clients: a PEFT-format adapter (read without peft) merged into a copy of the base,
selected by TGI's `parameters.adapter_id` or OpenAI's `model`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from huggingface_hub import InferenceClient, metadata_load
from huggingface_hub.errors import ValidationError
from openai import OpenAI
from safetensors.torch import load_file, save_file

from charter.devnode.lora import AdapterError
from charter.devnode.server import create_node_app
from charter.devnode.tinymodel import build_tiny_adapter, build_tiny_model
from tests.processes import free_port, wait_until_up

CHARTER = Path(sys.executable).parent / "charter"
BASE = "charter-tiny-llama"
PROMPT = "The quick brown fox"
FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@dataclass(frozen=True)
class Built:
    base: Path
    adapter: Path


@dataclass(frozen=True)
class Node:
    url: str

    def tgi(self) -> InferenceClient:
        return InferenceClient(base_url=self.url)

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(root / BASE)
    return Built(base, build_tiny_adapter(root / "support-lora", base))


@contextmanager
def _serve(model: Path, *args: str) -> Iterator[Node]:
    port = free_port()
    log = model.parent / f"node-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CHARTER), "node", "serve", "--model", str(model), "--region", "eu-west",
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/health", log, "the node", timeout_s=120)
        yield Node(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def node(built: Built) -> Iterator[Node]:
    with _serve(built.base, "--adapter", f"support={built.adapter}") as serving:
        yield serving


@pytest.fixture(scope="module")
def plain(built: Built) -> Iterator[Node]:
    """The same base served without any adapter."""
    with _serve(built.base) as serving:
        yield serving


def _chat(node: Node, model: str, text: str = PROMPT) -> Any:
    return node.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


# --- the adapter on disk ----------------------------------------------------------------------
def test_build_tiny_adapter_writes_peft_format(built: Built) -> None:
    assert {p.name for p in built.adapter.iterdir()} == FILES
    config = json.loads((built.adapter / "adapter_config.json").read_text())
    assert config == {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                      "target_modules": ["q_proj", "v_proj"], "bias": "none",
                      "fan_in_fan_out": False, "base_model_name_or_path": "charter/tiny-llama"}
    tensors = load_file(built.adapter / "adapter_model.safetensors")
    shapes = {"q_proj": 64, "v_proj": 32}  # the tiny model: 4 heads, 2 kv heads of 16
    assert set(tensors) == {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                            for i in (0, 1) for m in shapes for ab in "AB"}
    for layer in (0, 1):
        for module, out_features in shapes.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            assert tensors[f"{key}.lora_A.weight"].shape == (4, 64)
            assert tensors[f"{key}.lora_B.weight"].shape == (out_features, 4)
            assert tensors[f"{key}.lora_B.weight"].abs().min() > 0  # not PEFT's zero init
    card = metadata_load(built.adapter / "README.md")
    assert card == {"license": "apache-2.0", "base_model": "charter/tiny-llama",
                    "library_name": "peft", "tags": ["charter", "tiny", "lora"]}


def test_build_tiny_adapter_is_byte_deterministic(built: Built, tmp_path: Path) -> None:
    again = build_tiny_adapter(tmp_path / "again", built.base)
    assert _digests(again) == _digests(built.adapter)
    other = _digests(build_tiny_adapter(tmp_path / "other", built.base, seed=8))
    assert other["adapter_model.safetensors"] != _digests(again)["adapter_model.safetensors"]
    named = build_tiny_adapter(tmp_path / "named", built.base, base_model_name="org/base-7b",
                               r=2, alpha=4)
    config = json.loads((named / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (
        "org/base-7b", 2, 4)
    assert metadata_load(named / "README.md")["base_model"] == "org/base-7b"


# --- serving ----------------------------------------------------------------------------------
def test_adapter_id_changes_the_greedy_text_deterministically(node: Node) -> None:
    client = node.tgi()
    base = client.text_generation(PROMPT, max_new_tokens=8)
    tuned = client.text_generation(PROMPT, max_new_tokens=8, adapter_id="support")
    assert base == client.text_generation(PROMPT, max_new_tokens=8)
    assert tuned == client.text_generation(PROMPT, max_new_tokens=8, adapter_id="support")
    assert tuned != base
    streamed = client.text_generation(PROMPT, max_new_tokens=8, adapter_id="support",
                                      stream=True)
    assert "".join(streamed) == tuned
    generated = httpx.post(f"{node.url}/generate", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": None}}).json()
    assert generated["generated_text"] == base  # null: the base, as when absent


def test_openai_model_names_the_adapter(node: Node) -> None:
    tgi = node.tgi()
    base = _chat(node, BASE)
    tuned = _chat(node, "support")
    assert tuned.model == "support" and base.model == BASE
    assert tuned.choices[0].message.content == _chat(node, "support").choices[0].message.content
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # The tiny tokenizer has no chat template: the node writes `role: content` lines.
    assert tuned.choices[0].message.content == tgi.text_generation(
        f"user: {PROMPT}\nassistant:", max_new_tokens=8, adapter_id="support")
    completion = node.openai().completions.create(model="support", prompt=PROMPT,
                                                  max_tokens=8, temperature=0)
    assert completion.choices[0].text == tgi.text_generation(PROMPT, max_new_tokens=8,
                                                             adapter_id="support")
    # Any other model is the base, as before adapters.
    other = _chat(node, "gpt-4o")
    assert other.choices[0].message.content == base.choices[0].message.content
    assert other.model == BASE


def test_models_lists_the_base_and_its_adapters(node: Node) -> None:
    data = httpx.get(f"{node.url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == [BASE, "support"]
    assert data[0]["owned_by"] == "charter" and "parent" not in data[0]
    lora = {k: v for k, v in data[1].items() if k != "created"}
    assert lora == {"id": "support", "object": "model", "owned_by": "charter-devnode",
                    "parent": BASE, "root": "support-lora"}
    assert [m.id for m in node.openai().models.list()] == [BASE, "support"]


def test_info_reports_only_the_base(node: Node, built: Built) -> None:
    from charter.registry.importer import content_revision

    info = httpx.get(f"{node.url}/info").json()
    assert (info["model_id"], info["model_sha"]) == (BASE, content_revision(built.base))


@pytest.mark.parametrize(("parameters", "words"), [
    ({"adapter_id": "nope"}, "adapter_id `nope` is not loaded on this node (loaded: support)"),
    ({"adapter_id": ""}, "adapter_id `` is not loaded"),
    ({"adapter_id": 42}, "`adapter_id` must be a string"),
])
def test_unknown_adapter_is_refused_in_tgis_shape(node: Node, parameters: dict[str, Any],
                                                  words: str) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        response = httpx.post(f"{node.url}{route}",
                              json={"inputs": PROMPT, "parameters": parameters})
        assert response.status_code == 422, route
        assert set(response.json()) == {"error", "error_type"}
        assert response.json()["error_type"] == "validation"
        assert words in response.json()["error"]


def test_the_client_reads_the_refusal_as_a_validation_error(node: Node) -> None:
    with pytest.raises(ValidationError, match="nope"):
        node.tgi().text_generation(PROMPT, max_new_tokens=8, adapter_id="nope")


def test_adapter_and_base_requests_queue_on_one_worker(node: Node) -> None:
    """Mixed and at once, through the one queue, each answer is still its own model's."""
    client = node.tgi()
    expected = {a: client.text_generation(PROMPT, max_new_tokens=8, adapter_id=a)
                for a in (None, "support")}
    order = [None, "support"] * 6
    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(lambda a: node.tgi().text_generation(
            PROMPT, max_new_tokens=8, adapter_id=a), order))
    assert answers == [expected[a] for a in order]


def test_loading_an_adapter_leaves_the_base_unchanged(node: Node, plain: Node) -> None:
    for text in (PROMPT, "Charter governs"):
        assert node.tgi().text_generation(text, max_new_tokens=8) == plain.tgi(
        ).text_generation(text, max_new_tokens=8)
    assert _chat(node, BASE).choices[0].message.content == _chat(
        plain, BASE).choices[0].message.content
    # Embeddings always come from the base.
    assert httpx.post(f"{node.url}/embed", json={"inputs": PROMPT}).json() == httpx.post(
        f"{plain.url}/embed", json={"inputs": PROMPT}).json()


# --- the merge and the refusals (in-process) --------------------------------------------------
@pytest.mark.parametrize(("rslora", "scaling"), [(False, 8 / 4), (True, 8 / 2)])
def test_merge_is_w_plus_scaled_b_at_a(built: Built, tmp_path: Path, rslora: bool,
                                       scaling: float) -> None:
    adapter = _copy(built.adapter, tmp_path / "a", use_rslora=rslora)
    engine = create_node_app(built.base, region="x", adapters={"a": adapter}
                             ).extensions["charter_devnode"]
    base, tuned = engine.models[None], engine.models["a"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    for name, weight in base.named_parameters():
        merged = tuned.get_parameter(name)
        module = name.removesuffix(".weight")
        key = f"base_model.model.{module}"
        if f"{key}.lora_A.weight" in tensors:
            delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            assert torch.allclose(merged, weight + scaling * delta, atol=1e-6), name
        else:
            assert torch.equal(merged, weight), name
    fresh = create_node_app(built.base, region="x").extensions["charter_devnode"].model
    assert all(torch.equal(p, fresh.get_parameter(n)) for n, p in base.named_parameters())


def test_target_modules_may_be_a_regex_over_full_names(built: Built, tmp_path: Path) -> None:
    """PEFT's other form: one regex that must match a module's whole name."""
    regex = _copy(built.adapter, tmp_path / "regex",
                  target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    engines = [create_node_app(built.base, region="x", adapters={"a": a}
                               ).extensions["charter_devnode"] for a in (built.adapter, regex)]
    listed, matched = (dict(e.models["a"].named_parameters()) for e in engines)
    assert all(torch.equal(listed[name], matched[name]) for name in listed)


def _copy(adapter: Path, to: Path, *, tensors: dict[str, torch.Tensor] | None = None,
          **config: Any) -> Path:
    """The adapter, with config fields overridden and its weights replaced if given."""
    to.mkdir()
    raw = json.loads((adapter / "adapter_config.json").read_text())
    (to / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if tensors is None:
        (to / "adapter_model.safetensors").write_bytes(
            (adapter / "adapter_model.safetensors").read_bytes())
    else:
        save_file(tensors, to / "adapter_model.safetensors")
    return to


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("change", "words"), [
    ({"r": 8}, "adapter_config.json says r=8, but model.layers.0.self_attn.q_proj's lora_A "
               "is (4, 64) and lora_B (64, 4)"),
    ({"target_modules": ["q_proj", "w_gate"]}, "target_modules ['w_gate'] name no module"),
    ({"target_modules": ["q_proj"]}, "v_proj.lora_A.weight is not the LoRA weight of a target"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "no lora_A and lora_B weights for"),
    ({"target_modules": ["self_attn"]}, "are not linear layers"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type is 'PREFIX_TUNING'; only LORA"),
    ({"use_dora": True}, "use_dora not supported"),
    ({"bias": "all"}, "bias 'all' not supported"),
    ({"r": 0}, "r must be a positive integer"),
    ({"target_modules": "(q_proj"}, "target_modules is not a regex"),
])
def test_a_bad_adapter_stops_the_start(built: Built, tmp_path: Path, change: dict[str, Any],
                                       words: str) -> None:
    bad = _copy(built.adapter, tmp_path / "bad", **change)
    with pytest.raises(AdapterError) as refused:
        create_node_app(built.base, region="x", adapters={"bad": bad})
    assert words in str(refused.value)


def test_lora_weights_of_the_wrong_shape_stop_the_start(built: Built, tmp_path: Path) -> None:
    tensors = load_file(built.adapter / "adapter_model.safetensors")
    tensors[f"{Q0}.lora_A.weight"] = torch.zeros(4, 32)
    bad = _copy(built.adapter, tmp_path / "bad", tensors=tensors)
    with pytest.raises(AdapterError, match=r"q_proj is 64x64 in the base model, its lora_B @ "
                                           r"lora_A 64x32"):
        create_node_app(built.base, region="x", adapters={"bad": bad})


@pytest.mark.parametrize(("name", "words"), [
    (BASE, "is the base model's id"), ("-x", "use letters, digits"), ("a b", "use letters")])
def test_an_adapter_name_requests_cannot_use_is_refused(built: Built, name: str,
                                                        words: str) -> None:
    with pytest.raises(AdapterError, match=words):
        create_node_app(built.base, region="x", adapters={name: built.adapter})


def test_the_cli_refuses_to_start_with_a_bad_adapter(built: Built, tmp_path: Path) -> None:
    bad = _copy(built.adapter, tmp_path / "bad", r=8)
    done = subprocess.run(
        [str(CHARTER), "node", "serve", "--model", str(built.base), "--region", "x",
         "--port", str(free_port()), "--adapter", f"support={bad}"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    assert "adapter refused" in done.stderr and "says r=8" in done.stderr
    malformed = subprocess.run(
        [str(CHARTER), "node", "serve", "--model", str(built.base), "--region", "x",
         "--adapter", str(built.adapter)],
        capture_output=True, text=True, timeout=120, check=False)
    assert malformed.returncode == 2 and "give NAME=DIR" in malformed.stderr

"""Content inspection through the official clients: the openai client and huggingface_hub's
InferenceClient against `charter serve`, whose policy data inspects internal data. A card
number is refused in each client's own error type, the node never sees it, and what
internal data may carry is served."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.sites import Site, governed_site

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def site(model_dir, configured, make_person, tmp_path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    path = policies / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"]["data_classes"] = ["internal"]
    path.write_text(json.dumps(data))
    with governed_site(model_dir, configured, make_person, tmp_path,
                       policy_dir=str(policies)) as found:
        yield found


def _prompts_seen(node: str) -> int:
    """The prompt tokens the node has read (its own Prometheus counter)."""
    text = httpx.get(f"{node}/metrics", timeout=10).text
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith("charter_devnode_prompt_tokens_total "))


def test_the_official_clients_hear_the_refusal_in_their_own_protocol(site) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import TextGenerationError
    from openai import OpenAI, PermissionDeniedError

    before = _prompts_seen(site.node)
    client = OpenAI(base_url=f"{site.charter}/v1", api_key=site.key)
    with pytest.raises(PermissionDeniedError) as refused:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": "charge my card 4111 1111 1111 1111 please"}])
    assert refused.value.code == "policy_denied"
    assert "the request carries 1 of CREDIT_CARD, which internal data may not" in str(
        refused.value)
    tgi = InferenceClient(base_url=f"{site.charter}/tgi/tiny", api_key=site.key)
    with pytest.raises(TextGenerationError) as denied:  # TGI's error shape, as it parses it
        tgi.text_generation("my key is AKIAIOSFODNN7EXAMPLE", max_new_tokens=4)
    assert str(denied.value) == ("policy denies this request: the request carries 1 of "
                                 "AWS_ACCESS_KEY, which internal data may not")
    assert _prompts_seen(site.node) == before  # neither reached the node

    served = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}])
    assert served.model == "tiny"
    assert isinstance(tgi.text_generation("nothing personal", max_new_tokens=4), str)

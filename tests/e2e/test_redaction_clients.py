"""What inspection's decisions do, through the official clients: the openai client and
huggingface_hub's InferenceClient against `charter serve`, in front of a real HTTP node
that echoes what it was sent (so what the node read is in the answer). Internal data is
inspected; e-mail addresses are replaced before sending (the caller told in a header),
card numbers are replaced in answers (streamed four characters an event, so each number
arrives split), an AWS key is refused, and an IBAN may go only to a region no node of
this deployment is in."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.batch_support import BatchWorld, make_world
from tests.e2e.sites import charter_serve

ROOT = Path(__file__).resolve().parents[2]
CARD = "4111 1111 1111 1111"


@pytest.fixture
def site(configured, make_person, tmp_path) -> Iterator[tuple[str, BatchWorld]]:  # type: ignore[no-untyped-def]
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    path = policies / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"]["data_classes"] = ["internal"]
    data["deny"]["internal"] = [t for t in data["deny"]["internal"] if t != "CREDIT_CARD"]
    data["responses"]["internal"] = ["CREDIT_CARD"]
    data["residency"]["IBAN_CODE"] = "nordic"
    path.write_text(json.dumps(data))
    residency = policies / "data" / "residency.json"
    zones = json.loads(residency.read_text())
    zones["data_classes"]["nordic"] = ["eu-north"]
    residency.write_text(json.dumps(zones))
    world = make_world(configured, make_person, policy_dir=str(policies))
    world.node.piece = 4
    try:
        with charter_serve(world.settings.database_url, policy_dir=str(policies)) as (url, _):
            yield url, world
    finally:
        world.node.stop()


def test_the_openai_client_reads_redacted_requests_and_answers(site) -> None:  # type: ignore[no-untyped-def]
    from openai import InternalServerError, OpenAI, PermissionDeniedError

    url, world = site
    client = OpenAI(base_url=f"{url}/v1", api_key=world.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="m", max_tokens=8, messages=[
        {"role": "user", "content": "write to jane.doe@example.com"}])
    assert raw.headers["x-charter-redacted"] == "EMAIL_ADDRESS=1"
    assert raw.parse().choices[0].message.content == "echo: write to <EMAIL_ADDRESS>"

    stream = client.chat.completions.create(model="m", max_tokens=8, stream=True, messages=[
        {"role": "user", "content": f"charge {CARD} now"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "echo: charge <CREDIT_CARD> now"
    assert world.node.bodies[-1][1]["messages"][0]["content"] == f"charge {CARD} now"

    with pytest.raises(PermissionDeniedError) as denied:
        client.chat.completions.create(model="m", max_tokens=8, messages=[
            {"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}])
    assert denied.value.code == "policy_denied"
    with pytest.raises(InternalServerError) as routed:
        client.chat.completions.create(model="m", max_tokens=8, messages=[
            {"role": "user", "content": "pay to DE89 3704 0044 0532 0130 00"}])
    assert routed.value.status_code == 503 and routed.value.code == "no_node_in_allowed_region"
    assert "handled as nordic data: not in region eu-central" in str(routed.value)
    assert all("AKIA" not in json.dumps(b) and "DE89" not in json.dumps(b)
               for _, b in world.node.bodies)


def test_the_tgi_client_reads_redacted_requests_and_answers(site) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import TextGenerationError

    url, world = site
    tgi = InferenceClient(base_url=f"{url}/tgi/m", api_key=world.key, timeout=20)
    assert tgi.text_generation("ping 10.1.2.3", max_new_tokens=8) == "echo: ping <IP_ADDRESS>"
    tokens = list(tgi.text_generation(f"card {CARD} ok", max_new_tokens=8, stream=True,
                                      details=True))
    text = "".join(t.token.text for t in tokens if not t.token.special)
    assert text == "echo: card <CREDIT_CARD> ok"
    assert tokens[-1].generated_text == "echo: card <CREDIT_CARD> ok"
    with pytest.raises(TextGenerationError) as denied:
        tgi.text_generation("key AKIAIOSFODNN7EXAMPLE", max_new_tokens=8)
    assert "AWS_ACCESS_KEY, which internal data may not" in str(denied.value)
    with pytest.raises(Exception) as routed:  # noqa: PT011 - the client's own 503 error
        tgi.text_generation("pay to DE89 3704 0044 0532 0130 00", max_new_tokens=8)
    assert "handled as nordic data: not in region eu-central" in str(routed.value)

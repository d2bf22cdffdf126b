"""Charter's own token counts, for answers a node reported none for (charter.metering.tokens):
with the version's tokenizer from the tokenizers folder, only where it is the pinned one."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from charter.metering import tokens
from charter.metering.tokens import Count, TokenizerPin, Tokenizers, answer_of, prompt_of, rough


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from charter.devnode.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def placed(root: Path, model_dir: Path, *parts: str) -> Path:
    """The tokenizer files of the model, where an operator puts them."""
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prompts_and_answers_of_every_shape() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                      {"type": "text", "text": "there"}]},
                         "not a message"]}
    assert prompt_of("openai", chat) == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi there"}]
    assert prompt_of("openai", {"prompt": "Once"}) == "Once"
    assert prompt_of("openai", {"prompt": ["Once", " upon"]}) == "Once upon"
    assert prompt_of("openai", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_of("tgi", {"inputs": "The audit log"}) == "The audit log"
    assert prompt_of("tgi", {"inputs": None}) == ""
    assert answer_of("openai", {"choices": [{"message": {"content": "Yes."}},
                                            {"text": " And no."}]}) == "Yes. And no."
    assert answer_of("openai", {"error": "x"}) == "" and answer_of("openai", None) == ""
    assert answer_of("tgi", {"generated_text": "abc"}) == "abc"
    assert answer_of("tgi", [{"generated_text": "a"}, {"generated_text": "b"}]) == "ab"


def test_without_a_tokenizer_the_count_is_rough_and_said_so() -> None:
    counter = Tokenizers("", lambda vid: None)
    assert rough("") == 0 and rough("abcd") == 1 and rough("abcde") == 2
    assert rough("é") == 1 and rough("ééé") == 2  # UTF-8 bytes, not characters
    assert counter.count("v1", "x" * 40, "y" * 9) == Count(10, 3, "bytes")
    assert counter.count("v1", [1, 2, 3], "", events=5) == Count(3, 5, "events")


def test_the_versions_own_tokenizer_counts_as_the_engine_does(
        tmp_path, model_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    folder = placed(tmp_path, model_dir, "charter", "tiny", "0.1")
    pin = TokenizerPin("charter/tiny", "0.1", digest(folder / "tokenizer.json"))
    counter = Tokenizers(str(tmp_path), {"v1": pin}.get)
    text, answer = "The audit log is sealed.", " Every event is chained."
    got = counter.count("v1", text, answer)
    assert got == Count(len(tokenizer(text)["input_ids"]),
                        len(tokenizer(answer, add_special_tokens=False)["input_ids"]),
                        "tokenizer")
    assert got.tokens_in != rough(text)  # the tokenizer's figure, not the rough one
    # A chat: rendered as the engine renders it (no template here: the transcript).
    messages = [{"role": "user", "content": text}]
    expected = len(tokenizer(f"user: {text}\nassistant:")["input_ids"])
    assert counter.count("v1", messages, "").tokens_in == expected
    assert counter.count("v1", text, "", events=4).tokens_out == 4  # a TGI stream's events


def test_a_tokenizer_that_is_not_the_pinned_one_is_not_used(
        tmp_path, model_dir, caplog) -> None:  # type: ignore[no-untyped-def]
    placed(tmp_path, model_dir, "tiny", "0.1")
    counter = Tokenizers(str(tmp_path), {"v1": TokenizerPin("tiny", "0.1", "0" * 64)}.get)
    assert counter.get("v1") is None
    assert counter.count("v1", "x" * 8, "").method == "bytes"


@pytest.mark.parametrize("name,label", [("..", "0.1"), ("a/../../etc", "0.1"), ("tiny", ".."),
                                        ("tiny", ""), ("tiny", "a\\b")])
def test_a_name_cannot_lead_out_of_the_folder(tmp_path, model_dir, name, label) -> None:  # type: ignore[no-untyped-def]
    placed(tmp_path, model_dir, "inside")
    pins = {"v1": TokenizerPin(name, label, None)}
    counter = Tokenizers(str(tmp_path / "inside" / "x"), pins.get)
    assert counter.get("v1") is None


def test_a_tokenizer_placed_later_is_found_on_the_next_look(
        tmp_path, model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    looked: list[str] = []

    def pin_of(version_id: str) -> TokenizerPin:
        looked.append(version_id)
        return TokenizerPin("tiny", version_id, None)  # no digest pinned: any file is taken

    counter = Tokenizers(str(tmp_path), pin_of, capacity=1)
    assert counter.get("a") is None and counter.get("a") is None
    assert looked == ["a"]  # not looked for again before RECHECK_S
    placed(tmp_path, model_dir, "tiny", "a")
    placed(tmp_path, model_dir, "tiny", "b")
    monkeypatch.setattr(tokens, "RECHECK_S", 0.0)
    assert counter.get("a") is not None
    assert counter.get("a") is counter.get("a") and looked == ["a", "a"]  # kept
    assert counter.get("b") is not None
    counter.get("a")  # capacity 1: b pushed a out, so a is loaded again
    assert looked == ["a", "a", "b", "a"]

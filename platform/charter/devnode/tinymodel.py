"""Build a tiny Llama model with real weights, fully offline (needs the `node` extra).

A byte-level BPE tokenizer is trained on a small built-in corpus, wrapped as a
PreTrainedTokenizerFast, and saved beside a randomly initialised LlamaForCausalLM with a
few layers, in safetensors, with a model card whose YAML front matter names its license.
`task="embedding"` writes the same kind of model with other weights and a card that says
`pipeline_tag: feature-extraction`, so the dev node serves it as an embedding model.
build_tiny_adapter writes a LoRA adapter for such a model in PEFT's format (without peft).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

CORPUS = [
    "Charter governs which open models may serve requests, and proves every decision.",
    "A model version is pinned by the SHA-256 digests of its weight files.",
    "Approvers check license, provenance and data residency before approving a version.",
    "The audit log is append-only and every event is chained to the one before it.",
    "Requests go only to attested nodes in regions where the data class may be processed.",
    "Sovereign deployments run on the organisation's own GPUs, often without internet.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
] * 8

CARD = """---
license: apache-2.0
language:
- en
library_name: transformers
pipeline_tag: text-generation
datasets:
- charter/tiny-corpus
tags:
- charter
- tiny
---

# charter-tiny-llama

A deliberately tiny Llama model (a few layers, random weights, a byte-level BPE trained on
a few sentences) built locally by `charter demo` and the tests, so every part of Charter
can run end to end without downloading anything. Its output is gibberish by design.
"""

EMBED_CARD = """---
license: apache-2.0
language:
- en
library_name: transformers
pipeline_tag: feature-extraction
datasets:
- charter/tiny-corpus
tags:
- charter
- tiny
---

# charter-tiny-embed

The tiny Llama model of `charter-tiny-llama` with other random weights, served by the dev
node as an embedding model: the mean of its last hidden states. Its vectors are
deterministic, not meaningful.
"""
ADAPTER_CARD = """---
license: apache-2.0
base_model: {base}
library_name: peft
tags:
- charter
- tiny
- lora
---

# charter-tiny-lora

A LoRA adapter (q_proj and v_proj, random weights) for the tiny Llama model, in PEFT's
format, built locally so the dev node's multi-LoRA serving can be tried offline. Its B
matrices are not zero, so it changes what the model writes: into other gibberish.
"""
# The tiny model's attention adds little to its residual stream: B must be about this large
# for its greedy text to change within 8 tokens on plain and chat prompts alike (at 0.05 no
# token changes; at 0.2 the text after "assistant:" does not).
ADAPTER_B_STD = 0.5
TASKS = {"generation": (0, CARD), "embedding": (1, EMBED_CARD)}  # default seed, card


def build_tiny_model(out_dir: Path, *, seed: int | None = None, vocab_size: int = 384,
                     task: str = "generation") -> Path:
    """Write the model into out_dir (created) and return it. Deterministic for a seed; each
    task has its own default seed, so the two models' weight digests differ."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, not {task!r}")
    default_seed, card = TASKS[task]
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"  # noqa: S106
    )

    torch.manual_seed(default_seed if seed is None else seed)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if len(fast) <= fast.vocab_size else len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def build_tiny_adapter(out_dir: Path, base_dir: Path, *, seed: int = 7, r: int = 4,
                       alpha: int = 8, base_model_name: str = "charter/tiny-llama") -> Path:
    """Write a LoRA adapter for the model in base_dir into out_dir (created) and return it:
    adapter_config.json, adapter_model.safetensors and a card, byte for byte the same for
    the same arguments. Unlike PEFT's initialisation (B = 0), B is random: it has an effect."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    outs = {"q_proj": heads * head_dim,
            "v_proj": int(config.get("num_key_value_heads") or heads) * head_dim}
    generator, tensors = torch.Generator().manual_seed(seed), {}
    bound = 1 / math.sqrt(hidden)  # PEFT's A: kaiming-uniform with a = sqrt(5)
    for layer in range(int(config["num_hidden_layers"])):
        for module, out_features in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (
                torch.rand(r, hidden, generator=generator) * 2 - 1) * bound
            tensors[f"{key}.lora_B.weight"] = torch.randn(
                out_features, r, generator=generator) * ADAPTER_B_STD
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": list(outs), "base_model_name_or_path": base_model_name,
        "bias": "none", "fan_in_fan_out": False,
    }
    (out_dir / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plain = re.fullmatch(r"[A-Za-z0-9][\w./-]*", base_model_name)  # else quoted for YAML
    base = base_model_name if plain else json.dumps(base_model_name)
    (out_dir / "README.md").write_text(ADAPTER_CARD.replace("{base}", base), encoding="utf-8")
    return out_dir

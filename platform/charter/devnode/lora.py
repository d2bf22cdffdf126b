"""PEFT's LoRA adapters, read without peft: `adapter_config.json` and
`adapter_model.safetensors` are checked against the base model, then merged into a copy of
it, W += scaling * B @ A for each target module (scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA)."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# PEFT saves the weights under its wrapper's names, without the adapter's own name:
# base_model.model.<module of the base>.lora_A.weight (r, in), .lora_B.weight (out, r).
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# A name as engines take one (TGI's adapter_id, vLLM's LoRA module name).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
# Config fields whose set values change what the adapter does beyond W += scaling * B @ A.
NOT_MERGED = ("use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
              "rank_pattern", "alpha_pattern", "exclude_modules", "lora_bias",
              "target_parameters", "trainable_token_indices")


class AdapterError(ValueError):
    """An adapter the node refuses to load (at start, before it serves anything)."""


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    targets: tuple[str, ...] | str  # module names (suffixes), or one regex over full names
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def targets_module(self, name: str) -> bool:
        """PEFT's rule: a regex matches the full name, a listed name its last parts."""
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in self.targets)


def check_name(name: str, base_id: str) -> None:
    if not NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r}: use letters, digits and . _ / - "
                           "(at most 200, starting with a letter or digit)")
    if name == base_id:
        raise AdapterError(f"adapter name {name!r} is the base model's id: requests naming "
                           "it would be ambiguous")


def read_config(adapter_dir: Path) -> LoraConfig:
    """The adapter's LoRA config; refuses other PEFT types and what a merge cannot do."""
    path = adapter_dir / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AdapterError(f"{path}: peft_type is {kind!r}; only LORA adapters are served")
    r, alpha, targets = raw.get("r"), raw.get("lora_alpha", 8), raw.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{path}: r must be a positive integer, not {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise AdapterError(f"{path}: lora_alpha must be a number, not {alpha!r}")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path}: target_modules must be a list of module names or a regex")
    try:
        re.compile(targets if isinstance(targets, str) else "")
    except re.error as exc:
        raise AdapterError(f"{path}: target_modules is not a regex ({exc})") from None
    if set_fields := [k for k in NOT_MERGED if raw.get(k)]:
        raise AdapterError(f"{path}: {', '.join(set_fields)} not supported by the dev node")
    if (raw.get("bias") or "none") != "none":
        raise AdapterError(f"{path}: bias {raw['bias']!r} not supported by the dev node")
    return LoraConfig(r, float(alpha), targets if isinstance(targets, str) else tuple(targets),
                      rslora=raw.get("use_rslora") is True)


def merged(base: Any, adapter_dir: Path) -> Any:
    """A deep copy of base with the adapter in adapter_dir merged into its weights."""
    import torch

    config = read_config(adapter_dir)
    pairs = _weights(base, adapter_dir, config)
    model = copy.deepcopy(base)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            weight = model.get_submodule(module).weight
            weight.add_((config.scaling * (b.float() @ a.float())).to(weight.dtype))
    return model


def _weights(base: Any, adapter_dir: Path, config: LoraConfig) -> dict[str, tuple[Any, Any]]:
    """(lora_A, lora_B) per target module, checked: every target module is a linear layer of
    base, has both weights and none other, and they have the config's rank and its shape."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    names = [name for name, _ in base.named_modules() if name]
    if isinstance(config.targets, tuple):
        absent = [t for t in config.targets
                  if not any(n == t or n.endswith(f".{t}") for n in names)]
    else:
        absent = [] if any(map(config.targets_module, names)) else [config.targets]
    if absent:
        raise AdapterError(f"{adapter_dir / CONFIG}: target_modules {absent} name no module "
                           "of the base model")
    targets = {name for name in names if config.targets_module(name)}
    if not_linear := sorted(t for t in targets
                            if not isinstance(base.get_submodule(t), torch.nn.Linear)):
        raise AdapterError(f"{adapter_dir / CONFIG}: target modules {not_linear[:3]} are not "
                           "linear layers; the dev node merges LoRA into linear layers only")
    path = adapter_dir / WEIGHTS
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{path}: not readable safetensors ({exc})") from None
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in sorted(tensors.items()):
        match = KEY.fullmatch(key)
        if match is None or match["module"] not in targets:
            raise AdapterError(f"{path}: {key} is not the LoRA weight of a target module")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if missing := sorted(t for t in targets if len(parts.get(t, {})) < 2):
        raise AdapterError(f"{path}: no lora_A and lora_B weights for {missing[:3]}")
    for module, part in parts.items():
        a, b = part["A"], part["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config.r or b.shape[1] != config.r:
            raise AdapterError(f"{adapter_dir}: {CONFIG} says r={config.r}, but {module}'s "
                               f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}")
        out_features, in_features = base.get_submodule(module).weight.shape
        if (b.shape[0], a.shape[1]) != (out_features, in_features):
            raise AdapterError(f"{path}: {module} is {out_features}x{in_features} in the base "
                               f"model, its lora_B @ lora_A {b.shape[0]}x{a.shape[1]}")
    return {module: (part["A"], part["B"]) for module, part in sorted(parts.items())}

"""`charter models import DIR`: describe a local model directory offline and create a draft.

Reads config.json through transformers' AutoConfig, the model card's YAML front matter
through huggingface_hub's ModelCard, counts parameters from safetensors headers (no
weights are loaded), streams every file through SHA-256, and flags pickle files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError

from charter.actor import Actor
from charter.errors import ImportFailedError, validation_failed
from charter.identifiers import canonical
from charter.registry import service
from charter.registry.models import ModelVersion
from charter.registry.schemas import CARD_TEXT_MAX, FileSpec, ModelCreate, VersionSpec
from charter.uow import unit_of_work

CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"
ProgressFn = Callable[[str, int], None]  # (path, bytes just hashed)


@dataclass
class Inspection:
    files: list[FileSpec]
    weight_format: str
    pickle_files: list[str]
    code: list[str] = field(default_factory=list)  # why it would run code when loaded
    architecture: str | None = None
    model_type: str | None = None
    context_length: int | None = None
    parameter_count: int | None = None
    card: dict[str, Any] = field(default_factory=dict)
    card_text: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def license_card(self) -> str | None:
        """The card's license id in canonical form; one that is not an identifier is left
        to the card (kept verbatim) and reported by `inspect` as a warning."""
        return canonical(self.card.get("license"))

    @property
    def base_model(self) -> str | None:
        value = self.card.get("base_model")
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, str) else None

    @property
    def derivation(self) -> str:
        """From the card: Hugging Face's base_model_relation; else a PEFT folder
        (`adapter_config.json`) is an adapter, as the Hub infers it; else a declared base
        model means a fine-tune."""
        relation = self.card.get("base_model_relation")
        mapping = {"finetune": "fine_tune", "adapter": "adapter", "quantized": "quantized",
                   "merge": "merge"}
        if isinstance(relation, str) and relation in mapping:
            return mapping[relation]
        if any(f.path == "adapter_config.json" for f in self.files):
            return "adapter"
        return "fine_tune" if self.base_model else "unknown"

    @property
    def datasets(self) -> list[str]:
        value = self.card.get("datasets") or []
        return [value] if isinstance(value, str) else [str(v) for v in value]


def sha256_file(path: Path, progress: ProgressFn | None = None, rel: str = "") -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(rel, len(chunk))
    return digest.hexdigest()


def content_revision(root: Path) -> str:
    """A pin for a model that has no source repository: SHA-256 over its files' digests."""
    lines = sorted(
        f"{p.relative_to(root).as_posix()}:{sha256_file(p)}\n" for p in _walk(Path(root))
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def is_pickle(path: Path) -> bool:
    """Pickle by content, whatever the name: protocol-2+ pickles and torch zip archives."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == _ZIP_MAGIC:
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(".pkl") for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    return path.suffix.lower() in service.PICKLE_SUFFIXES


def safetensors_parameters(path: Path) -> int:
    """Sum of tensor element counts, read from the header only (weights stay on disk)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="numpy") as fh:
        for name in fh.keys():
            count = 1
            for dim in fh.get_slice(name).get_shape():
                count *= dim
            total += count
    return total


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # os.walk lists a linked folder but does not enter it: refuse it, never skip it.
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                raise ImportFailedError(
                    f"{(Path(dirpath) / name).relative_to(root)} is a symbolic link; "
                    "copy the real folder in",
                    code="symlink_refused",
                )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ImportFailedError(
                    f"{p.relative_to(root)} is a symbolic link; copy the real file in",
                    code="symlink_refused",
                )
            out.append(p)
    return out


def inspect_directory(root: Path, progress: ProgressFn | None = None) -> Inspection:
    root = Path(root)
    if not root.is_dir():
        raise ImportFailedError(f"{root} is not a directory", code="not_a_directory")
    paths = _walk(root)
    if not paths:
        raise ImportFailedError(f"{root} holds no files", code="empty_directory")
    files: list[FileSpec] = []
    pickles: list[str] = []
    warnings: list[str] = []
    params = 0
    formats: set[str] = set()
    for p in paths:
        rel = p.relative_to(root).as_posix()
        files.append(FileSpec(path=rel, size=p.stat().st_size,
                              sha256=sha256_file(p, progress, rel)))
        lower = rel.lower()
        if lower.endswith(".safetensors"):
            formats.add("safetensors")
            try:
                params += safetensors_parameters(p)
            except Exception as exc:  # noqa: BLE001 - a bad header is the file's fault
                raise ImportFailedError(
                    f"{rel} is not a valid safetensors file: {exc}", code="invalid_weights"
                ) from exc
        elif lower.endswith(".gguf"):
            formats.add("gguf")
        elif is_pickle(p):
            pickles.append(rel)
            formats.add("pytorch_pickle")
    weight_format = next(
        (f for f in ("safetensors", "gguf", "pytorch_pickle") if f in formats), "none"
    )
    if pickles:
        warnings.append(f"pickle-based files run code when loaded: {', '.join(pickles)}")
    info = Inspection(files=files, weight_format=weight_format, pickle_files=pickles,
                      warnings=warnings, parameter_count=params or None)
    _read_config(root, info)
    _read_card(root, info)
    return info


def _read_config(root: Path, info: Inspection) -> None:
    py = [f.path for f in info.files if f.path.lower().endswith(".py")]
    if py:
        info.code.append(f"Python files: {', '.join(py[:5])}")
    if not (root / "config.json").is_file():
        info.warnings.append("no config.json: architecture and context length unknown")
        _say_code(info)
        return
    try:  # read as JSON first: auto_map is what makes a loader fetch and run code
        raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ImportFailedError(f"config.json is not JSON: {exc}",
                                code="invalid_config") from exc
    if isinstance(raw, dict) and raw.get("auto_map"):
        info.code.append(f"auto_map in config.json: {json.dumps(raw['auto_map'])[:200]}")
    _say_code(info)
    from transformers import AutoConfig

    config: Any
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - report, do not guess
        if not (isinstance(raw, dict) and raw.get("auto_map")):
            raise ImportFailedError(f"config.json could not be read: {exc}",
                                    code="invalid_config") from exc
        # A model type only its own code defines: read the file, never run its code.
        config = SimpleNamespace(**{k: v for k, v in raw.items() if isinstance(k, str)})
    archs = getattr(config, "architectures", None) or []
    info.architecture = archs[0] if archs else None
    info.model_type = getattr(config, "model_type", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            info.context_length = value
            break


def _say_code(info: Inspection) -> None:
    if info.code:
        info.warnings.append("the model ships code its loaders would run (trust_remote_code): "
                             + "; ".join(info.code))


def _read_card(root: Path, info: Inspection) -> None:
    readme = root / "README.md"
    if not readme.is_file():
        info.warnings.append("no model card (README.md): license and lineage unknown")
        return
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(readme)
    except Exception as exc:  # noqa: BLE001
        raise ImportFailedError(f"the model card could not be read: {exc}",
                                code="invalid_card") from exc
    # YAML may hold dates and other non-JSON values; keep the card as plain JSON.
    data = {k: v for k, v in card.data.to_dict().items() if v is not None}
    info.card = json.loads(json.dumps(data, default=str))
    info.card_text = card.text.strip()
    if len(info.card_text) > CARD_TEXT_MAX:
        info.warnings.append(f"the model card's text is kept to its first {CARD_TEXT_MAX:,} "
                             "characters")
        info.card_text = info.card_text[:CARD_TEXT_MAX]
    stated = info.card.get("license")
    if stated is not None and info.license_card is None:
        info.warnings.append(f"the model card's license {stated!r} is not a license id; "
                             "it stays in the card, and the version has no card license")
    if not info.datasets:
        info.warnings.append("the model card names no training datasets")


@dataclass(frozen=True)
class ImportOptions:
    model_name: str
    label: str
    publisher: str | None = None
    source_repo: str | None = None
    source_revision: str | None = None
    license_declared: str | None = None
    intended_use: str = ""
    risk_tier: str = "limited"
    derivation: str | None = None  # None: from the card's base_model(_relation)
    storage_region: str | None = None
    hosting_regions: tuple[str, ...] = ()
    base_version_id: str | None = None  # the registered version it derives from
    task: str | None = None  # generation or embedding; None: from the card's pipeline_tag


def import_directory(
    actor: Actor, root: Path, opts: ImportOptions, progress: ProgressFn | None = None
) -> tuple[ModelVersion, Inspection]:
    """Inspect `root` and create a draft version of `opts.model_name` (created if new)."""
    info = inspect_directory(root, progress)
    spec = _version_spec(opts, info)
    # One transaction: a refused version must not leave a new, empty model behind.
    with unit_of_work():
        model = service.find_model(opts.model_name)
        if model is None:
            if not opts.publisher or not opts.source_repo:
                raise ImportFailedError(
                    f"model {opts.model_name!r} is new: give its publisher and source repository",
                    code="model_details_missing",
                )
            model = service.create_model(actor, ModelCreate(
                name=opts.model_name, publisher=opts.publisher, source_repo=opts.source_repo))
        version = service.create_version(actor, model.id, spec, pickle_files=info.pickle_files,
                                         code_reasons=info.code)
    return version, info


def _version_spec(opts: ImportOptions, info: Inspection) -> VersionSpec:
    try:
        return _build_spec(opts, info)
    except ValidationError as exc:
        raise validation_failed(exc, "version's details") from None


def _build_spec(opts: ImportOptions, info: Inspection) -> VersionSpec:
    return VersionSpec(
        label=opts.label,
        source_revision=opts.source_revision,
        weight_format=info.weight_format,
        files=info.files,
        architecture=info.architecture,
        parameter_count=info.parameter_count,
        context_length=info.context_length,
        license_declared=opts.license_declared,
        license_card=info.license_card,
        base_model=info.base_model,
        derivation=opts.derivation or info.derivation,
        datasets=info.datasets,
        intended_use=opts.intended_use,
        risk_tier=opts.risk_tier,
        storage_region=opts.storage_region,
        hosting_regions=list(opts.hosting_regions),
        card=info.card, card_text=info.card_text,
        base_version_id=opts.base_version_id, task=opts.task,
    )

"""`charter models import`'s engine on a real tiny model: digests, metadata, pickles, refusals."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from charter.audit.service import head
from charter.devnode.tinymodel import build_tiny_model
from charter.errors import ImportFailedError, ValidationFailedError
from charter.registry import service
from charter.registry.importer import (
    ImportOptions,
    import_directory,
    inspect_directory,
    sha256_file,
)
from charter.registry.schemas import FileSpec, ModelCreate, Transition, VersionSpec

MiB = 1 << 20
EXPECTED_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "charter-tiny-llama")


@pytest.fixture
def copy_of(tiny: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def copy(name: str = "model") -> Path:
        return Path(shutil.copytree(tiny, tmp_path / name))

    return copy


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(exc_info: pytest.ExceptionInfo[ImportFailedError], code: str) -> str:
    assert exc_info.value.code == code, exc_info.value
    assert exc_info.value.status == 422
    return exc_info.value.message


# --- inspection -----------------------------------------------------------------------
def test_every_file_is_listed_with_size_and_digest(tiny: Path) -> None:
    info = inspect_directory(tiny)
    on_disk = sorted(p.name for p in tiny.iterdir())
    assert sorted(EXPECTED_FILES) == on_disk
    assert [f.path for f in info.files] == on_disk
    for f in info.files:
        assert f.size == (tiny / f.path).stat().st_size, f.path
        assert f.sha256 == _sha256(tiny / f.path), f.path
    assert info.weight_format == "safetensors"
    assert info.pickle_files == [] and info.warnings == []


def test_metadata_from_config_weights_and_card(tiny: Path) -> None:
    info = inspect_directory(tiny)
    tensors = load_file(str(tiny / "model.safetensors"))
    expected = sum(int(t.size) for t in tensors.values())
    assert expected > 0
    assert info.parameter_count == expected
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.context_length == 512
    assert info.license_card == "apache-2.0"
    assert info.datasets == ["charter/tiny-corpus"]
    assert info.base_model is None
    assert info.card["tags"] == ["charter", "tiny"]


def test_progress_reports_every_byte_of_every_file(tiny: Path) -> None:
    seen: dict[str, int] = {}

    def progress(path: str, n: int) -> None:
        assert 0 < n <= MiB
        seen[path] = seen.get(path, 0) + n

    info = inspect_directory(tiny, progress)
    assert seen == {f.path: f.size for f in info.files}


def test_nested_files_use_posix_relative_paths(copy_of) -> None:  # type: ignore[no-untyped-def]
    root = copy_of()
    (root / "original").mkdir()
    (root / "original" / "params.json").write_text('{"dim": 64}')
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_text("not part of the model")
    info = inspect_directory(root)
    paths = [f.path for f in info.files]
    assert "original/params.json" in paths
    assert not any(p.startswith(".cache") for p in paths)
    assert len(paths) == len(EXPECTED_FILES) + 1


@pytest.mark.parametrize(("stated", "kept"), [
    ("Apache-2.0", "apache-2.0"),  # folded to the canonical form policy compares
    ("Llama 3 Community License", None),  # not an id: left to the card, with a warning
    ("\u0130sc", None),
])
def test_the_card_license_is_canonical_or_left_to_the_card(copy_of, stated: str,  # type: ignore[no-untyped-def]
                                                           kept: str | None) -> None:
    root = copy_of()
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("license: apache-2.0",
                                                 f"license: {stated}"))
    info = inspect_directory(root)
    assert info.license_card == kept and info.card["license"] == stated
    warned = [w for w in info.warnings if "is not a license id" in w]
    assert bool(warned) == (kept is None), info.warnings


# --- pickles --------------------------------------------------------------------------
def _add_pickles(root: Path) -> None:
    with (root / "extra.bin").open("wb") as fh:
        pickle.dump({"weights": [1.0, 2.0]}, fh)
    torch.save({"w": torch.zeros(2, 2)}, root / "weights.pt")
    with (root / "blob.dat").open("wb") as fh:
        pickle.dump(["hidden", "pickle"], fh)


def test_pickles_are_flagged_by_name_and_content(copy_of) -> None:  # type: ignore[no-untyped-def]
    root = copy_of()
    _add_pickles(root)
    (root / "notes.dat").write_bytes(b"plain bytes, not a pickle")
    info = inspect_directory(root)
    assert sorted(info.pickle_files) == ["blob.dat", "extra.bin", "weights.pt"]
    assert info.weight_format == "safetensors"
    assert any("blob.dat" in w and "run code" in w for w in info.warnings)
    assert len(info.files) == len(EXPECTED_FILES) + 4


def test_pickle_only_directory_is_pytorch_pickle(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    info = inspect_directory(tmp_path)
    assert info.weight_format == "pytorch_pickle"
    assert info.pickle_files == ["pytorch_model.bin"]
    assert info.parameter_count is None


def test_imported_version_with_pickles_is_unsafe(copy_of, make_person) -> None:  # type: ignore[no-untyped-def]
    root = copy_of()
    _add_pickles(root)
    steward = make_person("steward")
    version, info = import_directory(steward.actor, root, ImportOptions(
        model_name="tiny", label="1", publisher="charter", source_repo="charter/tiny"))
    assert version.unsafe_weights is True
    assert version.weight_format == "safetensors"
    assert sorted(info.pickle_files) == ["blob.dat", "extra.bin", "weights.pt"]
    stored = service.get_version(version.id)
    assert stored.unsafe_weights is True and len(stored.files) == len(EXPECTED_FILES) + 3


def test_pickle_under_neutral_name_alone_makes_version_unsafe(copy_of, make_person) -> None:  # type: ignore[no-untyped-def]
    """Only content gives blob.dat away; the stored version must still be flagged."""
    root = copy_of()
    with (root / "blob.dat").open("wb") as fh:
        pickle.dump({"payload": 1}, fh)
    steward = make_person("steward")
    version, info = import_directory(steward.actor, root, ImportOptions(
        model_name="tiny", label="1", publisher="charter", source_repo="charter/tiny"))
    assert info.pickle_files == ["blob.dat"]
    assert service.get_version(version.id).unsafe_weights is True


def test_clean_import_is_safe_and_complete(tiny: Path, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    version, _ = import_directory(steward.actor, tiny, ImportOptions(
        model_name="tiny", label="1", publisher="charter", source_repo="charter/tiny",
        source_revision="a" * 40, license_declared="apache-2.0",
        storage_region="eu-west", hosting_regions=("eu-west",)))
    stored = service.get_version(version.id)
    assert stored.state == "draft" and stored.unsafe_weights is False
    assert stored.model_name == "tiny" and stored.model.publisher == "charter"
    assert {f.path: (f.size, f.sha256) for f in stored.files} == {
        p.name: (p.stat().st_size, _sha256(p)) for p in tiny.iterdir()
    }
    assert stored.total_bytes == sum(p.stat().st_size for p in tiny.iterdir())
    assert (stored.architecture, stored.context_length) == ("LlamaForCausalLM", 512)
    assert (stored.license_card, stored.license_declared) == ("apache-2.0", "apache-2.0")
    assert stored.datasets == ["charter/tiny-corpus"]
    assert stored.hosting_regions == ["eu-west"]
    # A second version of the now-known model needs no publisher.
    second, _ = import_directory(steward.actor, tiny, ImportOptions(model_name="tiny", label="2"))
    assert second.model_id == version.model_id


def test_a_model_that_ships_code_is_flagged_and_its_code_never_run(copy_of, make_person) -> None:  # type: ignore[no-untyped-def]
    """Python files and `auto_map` in config.json are code a loader runs with
    trust_remote_code: flagged at import (with a warning naming them), and the admission
    policy denies the version (organisation.json `allow_custom_code: false`). The model
    type only its code defines is read from the file, never by running it."""
    import json as jsonlib

    root = copy_of()
    marker = root / "ran.txt"
    (root / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")
    config = jsonlib.loads((root / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig"})
    (root / "config.json").write_text(jsonlib.dumps(config))
    steward = make_person("steward")
    version, info = import_directory(steward.actor, root, ImportOptions(
        model_name="evil", label="1", publisher="charter", source_repo="charter/evil",
        source_revision="a" * 40, license_declared="apache-2.0",
        storage_region="eu-west", hosting_regions=("eu-west",)))
    assert not marker.exists()
    assert version.custom_code is True and version.architecture == "LlamaForCausalLM"
    assert info.code == ["Python files: modeling_evil.py",
                         'auto_map in config.json: {"AutoConfig": "modeling_evil.EvilConfig"}']
    assert any("trust_remote_code" in w for w in info.warnings)
    submitted = service.submit_version(steward.actor, version.id, Transition())
    codes = [v["code"] for v in submitted.admission["violations"]]
    assert "custom_code" in codes, codes
    # A version registered by its listing alone is flagged by a .py path too.
    model = service.create_model(steward.actor, ModelCreate(
        name="listed", publisher="charter", source_repo="charter/listed"))
    listed = service.create_version(steward.actor, model.id, VersionSpec(
        label="1", files=[FileSpec(path="sub/Tokenization_X.PY", size=1, sha256="b" * 64)]))
    assert listed.custom_code is True


# --- refusals -------------------------------------------------------------------------
def test_a_file_is_not_a_directory(tiny: Path) -> None:
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(tiny / "config.json")
    assert "config.json" in _error(exc_info, "not_a_directory")
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(tiny / "no-such-dir")
    _error(exc_info, "not_a_directory")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(tmp_path)
    _error(exc_info, "empty_directory")
    (tmp_path / ".hidden").write_text("ignored")
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(tmp_path)
    _error(exc_info, "empty_directory")


def test_corrupt_safetensors(copy_of) -> None:  # type: ignore[no-untyped-def]
    root = copy_of()
    (root / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(root)
    assert "model.safetensors" in _error(exc_info, "invalid_weights")


def test_symlinked_file_is_refused(copy_of, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = copy_of()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (root / "linked.json").symlink_to(outside)
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(root)
    assert "linked.json" in _error(exc_info, "symlink_refused")


def test_symlinked_directory_is_refused(copy_of, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A linked folder must not be silently left out of the digests."""
    root = copy_of()
    outside = tmp_path / "shards"
    outside.mkdir()
    (outside / "model-00002.safetensors").write_bytes(b"x")
    (root / "shards").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImportFailedError) as exc_info:
        inspect_directory(root)
    assert "shards" in _error(exc_info, "symlink_refused")


def test_new_model_without_details_writes_nothing(tiny: Path, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    before = head()
    for opts in (
        ImportOptions(model_name="brand-new", label="1"),
        ImportOptions(model_name="brand-new", label="1", publisher="p"),
        ImportOptions(model_name="brand-new", label="1", source_repo="p/m"),
    ):
        with pytest.raises(ImportFailedError) as exc_info:
            import_directory(steward.actor, tiny, opts)
        assert "brand-new" in _error(exc_info, "model_details_missing")
    assert service.find_model("brand-new") is None
    assert service.list_models() == []
    assert head() == before


def test_invalid_version_details_write_nothing(tiny: Path, make_person) -> None:  # type: ignore[no-untyped-def]
    """A bad field is refused before the new model is created, not after."""
    steward = make_person("steward")
    before = head()
    with pytest.raises(ValidationFailedError) as exc_info:
        import_directory(steward.actor, tiny, ImportOptions(
            model_name="brand-new", label="1", publisher="p", source_repo="p/m",
            license_declared="Apache 2.0"))
    assert exc_info.value.code == "validation_failed"
    fields = [e["field"] for e in exc_info.value.details["errors"]]
    assert fields == ["license_declared"]
    assert service.find_model("brand-new") is None
    assert head() == before


# --- streaming ------------------------------------------------------------------------
def test_sha256_streams_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    size = 50 * MiB + 123
    with path.open("wb") as fh:
        fh.truncate(size)  # sparse: no 50 MB written
    chunks: list[tuple[str, int]] = []
    tracemalloc.start()
    try:
        digest = sha256_file(path, lambda rel, n: chunks.append((rel, n)), rel="big.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"hashing held {peak} bytes at once"

    expected = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(MiB):
            expected.update(block)
    assert digest == expected.hexdigest()
    assert all(rel == "big.safetensors" for rel, _ in chunks)
    assert all(0 < n <= MiB for _, n in chunks)
    assert sum(n for _, n in chunks) == size
    assert len(chunks) >= 51

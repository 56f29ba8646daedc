"""params.yaml sections load into frozen dataclasses; bad input is refused with a useful message."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qlorapipe.errors import UserError
from qlorapipe.params import SECTIONS, load_section, parse_section, read_params_file

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_of_the_repo_params_loads():
    raw = read_params_file(ROOT / "params.yaml")
    assert set(raw) == set(SECTIONS)
    for name in SECTIONS:
        section = load_section(ROOT / "params.yaml", name)
        assert dataclasses.is_dataclass(section)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, dataclasses.fields(section)[0].name, None)


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(UserError, match=r"lora: key 'rnak' is unknown \(did you mean 'rank'\?\)"):
        parse_section("lora", {"rnak": 8})


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lora:\n  rank: 8\ntrainig:\n  seed: 1\n")
    with pytest.raises(UserError, match=r"section 'trainig' is unknown \(did you mean 'training'\?\)"):
        read_params_file(path)


def test_wrong_types_and_choices_are_all_reported_at_once():
    with pytest.raises(UserError) as info:
        parse_section("training", {"optimizer": "sgd", "per_device_batch_size": "four", "gradient_checkpointing": 1})
    message = str(info.value)
    assert "training.optimizer: must be one of 'paged_adamw_8bit'" in message
    assert "training.per_device_batch_size: must be an integer, got 'four'" in message
    assert "training.gradient_checkpointing: must be true or false, got 1" in message


def test_cross_field_checks_collect_every_problem():
    with pytest.raises(UserError) as info:
        parse_section("lora", {"rank": 0, "dropout": 1.5, "target_modules": []})
    message = str(info.value)
    assert "lora.rank must be a positive integer, got 0" in message
    assert "lora.dropout must be in [0, 1), got 1.5" in message
    assert "lora.target_modules is an empty list" in message


def test_hub_source_requires_a_pinned_revision():
    with pytest.raises(UserError, match="model.revision is required when model.source is 'hub'"):
        parse_section("model", {"source": "hub", "repo_id": "Qwen/Qwen2.5-3B-Instruct"})


def test_data_checks_name_the_fixing_param():
    with pytest.raises(UserError) as info:
        parse_section("data", {"source": "hub", "path": "org/set", "max_masked_share": 2})
    message = str(info.value)
    assert "data.revision is required when data.source is 'hub'" in message
    assert "data.max_masked_share must be in [0, 1], got 2" in message
    with pytest.raises(UserError, match="builtin:python-docs is raw text: use data.format: text"):
        parse_section("data", {"format": "chat"})
    with pytest.raises(UserError, match="data.format: must be one of 'text', 'instruction', 'chat', 'completion'"):
        parse_section("data", {"format": "alpaca"})


def test_numbers_written_the_way_yaml_and_dvc_exp_write_them():
    # YAML 1.1 loads 2e-4 as a string; `dvc exp run -S training.learning_rate=2e-4` writes it so.
    section = parse_section("training", {"learning_rate": "2e-4", "epochs": 3})
    assert section.learning_rate == pytest.approx(2e-4)
    assert isinstance(section.epochs, float) and section.epochs == 3.0
    assert parse_section("lora", {"target_modules": ["q_proj", "v_proj"]}).target_modules == ["q_proj", "v_proj"]


def test_missing_params_file_names_the_file(tmp_path):
    with pytest.raises(UserError, match="params.yaml: params file not found"):
        load_section(tmp_path / "params.yaml", "lora")


def test_export_formats_are_checked_against_the_four_known():
    assert parse_section("export", {"formats": ["gguf-q8_0", "adapter"]}).formats == ["gguf-q8_0", "adapter"]
    with pytest.raises(UserError) as info:
        parse_section("export", {"formats": ["gguf-q4", "adapter", "adapter"], "verify_batches": 0})
    message = str(info.value)
    assert "export.formats: unknown ['gguf-q4']; choose from safetensors, gguf-f16, gguf-q8_0, adapter" in message
    assert "export.formats lists a format twice" in message
    assert "export.verify_batches must be at least 1, got 0" in message

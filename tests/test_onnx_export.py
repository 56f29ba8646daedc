"""ONNX Runtime GenAI folders built from tiny Llama and Qwen2 models, run in ONNX Runtime itself."""

from __future__ import annotations

import json
import shutil

import pytest

from qlorapipe.errors import UserError
from qlorapipe.export import gate, llamacpp, onnxgenai
from qlorapipe.params import ExportParams

TEXT = "Generators produce items lazily, 2026 of them, and remember where they left off!"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    """fp32 and int4 folders of both tiny models, built once by onnxruntime-genai's model builder."""
    root = tmp_path_factory.mktemp("onnx")
    folders = {}
    for arch, model_dir in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        for precision in ("fp32", "int4"):
            folders[arch, precision] = root / f"{arch}-{precision}"
            onnxgenai.build(model_dir, folders[arch, precision], precision)
    return folders


def _references(model_dir, rows: int = 2, length: int = 24, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(3, len(tokenizer), (rows, length), generator=generator)]
    with torch.no_grad():
        logits = [model(b).logits for b in batches]
    prompts = [batches[0][0, :6].tolist(), batches[0][1, :5].tolist()]
    continuations = llamacpp.reference_continuations(model, prompts, 8, {tokenizer.eos_token_id},
                                                     tokenizer.pad_token_id, torch.device("cpu"))
    return model, tokenizer, batches, logits, prompts, continuations


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_onnx_runtime_computes_the_fp32_model_as_transformers_does(arch, built, request):
    import numpy as np
    import onnxruntime
    import torch

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    folder = built[arch, "fp32"]
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model, tokenizer, batches, logits, prompts, continuations = _references(model_dir)
    # Raw logits, unrounded: the tiny model's are small, so the rounded metrics alone would say little.
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feed[spec.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    ours = session.run(["logits"], feed)[0]
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    assert np.abs(theirs).max() > 1e-2
    assert np.abs(ours - theirs).max() < 1e-5
    found = onnxgenai.check_model(folder, tokenizer, logits, batches, prompts, continuations, 8)
    assert found["token_agreement"] == 1.0 and found["stop_mismatches"] == 0  # GenAI's generator, greedy
    assert found["tokenizer_matches"] is True
    assert abs(found["perplexity_change"]) < 1e-4
    assert found["chat_template_matches"] is None  # the tiny tokenizer has no chat template


def test_int4_weights_are_four_times_smaller_and_measured_against_the_model(built, tiny_llama_dir):
    _, tokenizer, batches, logits, prompts, continuations = _references(tiny_llama_dir)
    exact = onnxgenai.check_model(built["llama", "fp32"], tokenizer, logits, batches, prompts, continuations, 8)
    quantized = onnxgenai.check_model(built["llama", "int4"], tokenizer, logits, batches, prompts, continuations, 8)
    assert quantized["size_mb"] < exact["size_mb"] / 3
    assert quantized["max_logit_diff"] > 10 * max(exact["max_logit_diff"], 1e-6)  # rounded weights, measured
    assert abs(quantized["perplexity_change"]) < 0.05


def test_logits_of_another_model_are_far_from_the_reference(built, tiny_llama_dir, tiny_qwen2_dir):
    _, tokenizer, batches, logits, prompts, continuations = _references(tiny_llama_dir)
    found = onnxgenai.check_model(built["qwen2", "fp32"], tokenizer, logits, batches, prompts, continuations, 8)
    own = onnxgenai.check_model(built["llama", "fp32"], tokenizer, logits, batches, prompts, continuations, 8)
    assert found["mean_logit_diff"] > 100 * max(own["mean_logit_diff"], 1e-7)


def test_the_gate_names_the_onnx_format_its_key_and_the_runtime():
    found = {"perplexity_change": 0.5, "token_agreement": 1.0, "stop_mismatches": 0, "tokenizer_matches": False,
             "chat_template_matches": None}
    with pytest.raises(UserError) as error:
        gate(ExportParams(), "onnx-int4", found, runtime="ONNX Runtime")
    message = str(error.value)
    assert "\n" not in message and message.startswith("onnx-int4 in ONNX Runtime drifts from the trained model")
    assert "export.max_perplexity_change.onnx-int4 0.25" in message
    assert "ONNX Runtime splits held-out text into other token ids" in message


def test_a_model_the_builder_cannot_build_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(UserError) as error:
        onnxgenai.build(model_dir, tmp_path / "out", "int4")
    message = str(error.value)
    assert "\n" not in message and message.startswith("onnx-int4: onnxruntime-genai's model builder failed on ")
    assert message.endswith("model is not currently supported.")  # the builder's own error line


def test_onnx_gates_are_keyed_by_known_formats():
    assert ExportParams(formats=["onnx-int8"]).check() == []
    assert any("['int2'] are not ONNX precisions" in p
               for p in ExportParams(onnx_builder_options={"int2": {}}).check())
    problems = ExportParams(max_perplexity_change={"onnx-int3": 0.1}).check()
    assert any("['onnx-int3'] are not GGUF or ONNX formats" in p for p in problems)
    missing = ExportParams(formats=["onnx-int4"], min_token_agreement={"gguf-f16": 0.5}).check()
    assert any("export.min_token_agreement has no entry for onnx-int4" in p for p in missing)


def test_a_folder_onnx_runtime_cannot_load_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    """Some builder options write graphs ONNX Runtime refuses (here: an int8 output layer of a model whose
    embeddings are tied to it); the check says so in one line instead of passing the folder on."""
    _, tokenizer, batches, logits, prompts, continuations = _references(tiny_llama_dir)
    folder = tmp_path / "int4"
    onnxgenai.build(tiny_llama_dir, folder, "int4", {"matmul_mixed_precision": "last_matmul:int8"})
    with pytest.raises(UserError) as error:
        onnxgenai.check_model(folder, tokenizer, logits, batches, prompts, continuations, 8)
    message = str(error.value)
    assert "\n" not in message and message.startswith("onnx-int4: ONNX Runtime cannot run what the builder wrote (")
    assert message.endswith("try other export.onnx_builder_options")


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             + CHATML)


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM], ids=["chatml", "refuses-system"])
def test_the_chat_template_is_rendered_by_onnx_runtime_genai_as_by_transformers(template, tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    onnxgenai.build(model_dir, tmp_path / "fp32", "fp32")
    _, tokenizer, batches, logits, prompts, continuations = _references(model_dir)
    found = onnxgenai.check_model(tmp_path / "fp32", tokenizer, logits, batches, prompts, continuations, 8)
    assert found["chat_template_matches"] is True  # a template refusing the system turn is probed without it


def test_a_continuation_stops_where_the_trained_model_stops(tiny_llama_dir, tmp_path):
    """End-of-sequence ids as a list, one of them a token the model generates: ONNX Runtime GenAI stops there."""
    import torch

    model, tokenizer, batches, logits, prompts, _ = _references(tiny_llama_dir)
    stop = llamacpp.reference_continuations(model, prompts[:1], 8, set(), tokenizer.pad_token_id,
                                            torch.device("cpu"))[0].tokens[2]
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        (model_dir / name).write_text(json.dumps({**config, "eos_token_id": [tokenizer.eos_token_id, stop]}))
    onnxgenai.build(model_dir, tmp_path / "fp32", "fp32")
    reference = llamacpp.reference_continuations(model, prompts, 8, {tokenizer.eos_token_id, stop},
                                                 tokenizer.pad_token_id, torch.device("cpu"))
    assert reference[0].stop is not None and reference[0].stop <= 2
    found = onnxgenai.check_model(tmp_path / "fp32", tokenizer, logits, batches, prompts, reference, 8)
    assert found["stops_onnx"] == found["stops_trained"] >= 1
    assert found["stop_mismatches"] == 0 and found["token_agreement"] == 1.0


def test_builder_errors_are_its_own_error_line_or_how_it_ended():
    log = ("Extra options: {}\nTraceback (most recent call last):\n  File x\nNotImplementedError: not supported.\n"
           "Saving GenAI config\n")  # a line printed after the traceback is not the error
    assert onnxgenai._why(log, 1) == "NotImplementedError: not supported."
    assert onnxgenai._why("Reading layer 3\n", -9) == "killed by signal 9 (out of memory?)"
    assert onnxgenai._why("", 2) == "exit status 2"
    assert onnxgenai.option_value(True) == "true" and onnxgenai.option_value(32) == "32"


def test_the_chat_tool_runs_a_folder_given_by_its_model_onnx(built, tiny_llama_dir):
    import torch

    from qlorapipe.inference import OnnxLoadedModel, SamplingSettings, load_standalone

    loaded = load_standalone(built["llama", "fp32"] / "model.onnx", torch.device("cpu"))
    assert isinstance(loaded, OnnxLoadedModel)
    greedy = SamplingSettings(max_new_tokens=4, temperature=0)
    answer = loaded.answer("The with statement", greedy)
    # the fp32 model computes the source model's logits (above): the same greedy answer as transformers gives
    assert answer.strip() and answer == load_standalone(tiny_llama_dir, torch.device("cpu")).answer(
        "The with statement", greedy)


def test_the_chat_tool_pointed_at_an_export_of_onnx_folders_only_names_them(tmp_path):
    import torch

    from qlorapipe.inference import load_standalone

    (tmp_path / "export/onnx/int8").mkdir(parents=True)
    (tmp_path / "export/onnx/int8/genai_config.json").write_text("{}")
    folder = str(tmp_path / "export/onnx/int8")
    # The export directory, its onnx folder, a precision not exported: each names the folders.
    for wrong in ("export", "export/onnx", "export/onnx/int3"):
        with pytest.raises(UserError, match=f"no model here; the ONNX folders beside it: --model {folder}$"):
            load_standalone(tmp_path / wrong, torch.device("cpu"))
    with pytest.raises(UserError, match="nowhere does not exist; pass a model directory, a .gguf file or an ONNX"):
        load_standalone(tmp_path / "nowhere", torch.device("cpu"))


def test_builder_options_it_does_not_know_are_refused_before_anything_is_built():
    onnxgenai.check_builder_options({"int4": {"algo_config": "k_quant_mixed", "int4_block_size": 32}}, ["int4"])
    onnxgenai.check_builder_options({"int8": {"bogus": 1}}, ["int4"])  # a precision not asked for is not built
    with pytest.raises(UserError) as error:
        onnxgenai.check_builder_options({"int8": {"blok_size": 16}}, ["int8"])
    assert str(error.value).startswith("export.onnx_builder_options.int8.blok_size (did you mean block_size?): "
                                       "not an option of onnxruntime-genai's model builder")


def test_the_check_stage_refuses_unknown_builder_options_and_warns_of_options_nothing_builds_with(
        tmp_path, tiny_llama_dir, corpus_file, caplog):
    """A misspelt builder option stops `dvc repro` at the first stage, before DVC deletes models/export; an
    option for an ONNX precision export.formats does not hold is named without stopping the run."""
    from conftest import load_stage, tiny_params, write_params

    check = load_stage("check")
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "export.formats": ["safetensors", "onnx-int4"],
        "export.onnx_builder_options": {"int4": {"algo_config": "k_quant_mixed", "blok_size": 16}}}))
    with pytest.raises(UserError, match=r"^export.onnx_builder_options.int4.blok_size \(did you mean block_size\?\): "
                                        "not an option of onnxruntime-genai's model builder, which would ignore it"):
        check.main(["--params", str(params), "--out", str(tmp_path / "passed.txt")])
    assert not (tmp_path / "passed.txt").exists()

    write_params(params, tiny_params(tiny_llama_dir, corpus_file, **{
        "export.onnx_builder_options": {"int4": {"algo_config": "k_quant_mixed", "block_size": 16}}}))
    with caplog.at_level("WARNING", logger="qlorapipe.check"):
        check.main(["--params", str(params), "--out", str(tmp_path / "passed.txt")])
    assert (tmp_path / "passed.txt").is_file()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("export.")] == [
        "export.onnx_builder_options int4 set, but export.formats has no onnx-int4: nothing is built with them "
        "(add the format to export.formats to build it)"]
    caplog.clear()
    write_params(params, tiny_params(tiny_llama_dir, corpus_file))  # the default options: nothing said
    with caplog.at_level("WARNING", logger="qlorapipe.check"):
        check.main(["--params", str(params), "--out", str(tmp_path / "passed.txt")])
    assert not [r for r in caplog.records if r.getMessage().startswith("export.")]

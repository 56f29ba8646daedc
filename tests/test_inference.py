"""The inference CLI and the adapter library on a tiny model: every mode, several adapters, clear refusals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_stage, make_model_dir, tiny_params, write_params

from qlorapipe import inference
from qlorapipe.cli import chat
from qlorapipe.errors import UserError

GREEDY = ["--temperature", "0", "--max_new_tokens", "6"]


def _download(tmp: Path, model_dir: Path, corpus: Path) -> Path:
    params = write_params(tmp / "params.yaml", tiny_params(model_dir, corpus))
    load_stage("download").main(["--params", str(params), "--out", str(tmp / "base")])
    return tmp / "base"


def _make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A real peft adapter with random (non-zero) LoRA weights and the record training writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlorapipe.params import DataParams, LoraParams, QuantizationParams, TrainingParams
    from qlorapipe.records import AdapterRecord, read_source_record, write_adapter_record

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    write_adapter_record(out, AdapterRecord(base_model=read_source_record(base_dir), data_sha256="0" * 64,
                                            environment={}, data=DataParams(), quantization=QuantizationParams(),
                                            lora=LoraParams(rank=4, alpha=8), training=TrainingParams()))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir, corpus_file):
    work = tmp_path_factory.mktemp("inference")
    base = _download(work, tiny_llama_dir, corpus_file)
    return {"work": work, "base": base, "params": work / "params.yaml",
            "chat": _make_adapter(base, work / "chat", seed=1), "code": _make_adapter(base, work / "code", seed=2)}


def _run(argv: list[str], stdin: str = "") -> str:
    out = io.StringIO()
    chat.main(argv, stdin=io.StringIO(stdin), stdout=out)
    return out.getvalue()


def _greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    """``model``'s greedy continuation of ``prompt``, computed directly with transformers, for comparison."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.eval().generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _greedy_reference(base_dir: Path, adapter_dir: Path, prompt: str, tokens: int) -> str:
    """The same answer computed directly with peft on the 4-bit base, for comparison, on the device the tool
    picks (on random weights the top tokens are near ties, which a GPU and a CPU can settle differently)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlorapipe import modeling
    from qlorapipe.params import QuantizationParams

    base, _ = modeling.load_base_model(base_dir, QuantizationParams(), modeling.pick_device())
    return _greedy(PeftModel.from_pretrained(base, adapter_dir), AutoTokenizer.from_pretrained(base_dir), prompt,
                   tokens)


def test_text_mode_answers_with_the_adapter_on_the_4bit_base(project):
    out = _run(["--base", str(project["base"]), "--adapter", str(project["chat"]), "--mode", "text",
                "--prompt", "Python is", *GREEDY])
    expected = _greedy_reference(project["base"], project["chat"], "Python is", 6)
    assert out == f"### Python is\n{expected}\n\n"
    assert expected.strip()


def test_demo_mode_answers_every_params_prompt(project):
    out = _run(["--base", str(project["base"]), "--adapter", str(project["chat"]), "--mode", "demo",
                "--params", str(project["params"]), *GREEDY])
    prompts = ["Python is", "The with statement"]
    assert out == "".join(f"### {p}\n{_greedy_reference(project['base'], project['chat'], p, 6)}\n\n" for p in prompts)


def test_merged_model_directory_loads_without_an_adapter(project, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe import modeling
    from qlorapipe.merge import merging
    from qlorapipe.params import QuantizationParams

    merged = merging.merge_adapter(project["base"], project["chat"], QuantizationParams(), torch.float32,
                                   torch.device("cpu"))
    merged.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged").joinpath("tokenizer.json").write_bytes((project["base"] / "tokenizer.json").read_bytes())
    (tmp_path / "merged").joinpath("tokenizer_config.json").write_bytes(
        (project["base"] / "tokenizer_config.json").read_bytes())
    # The merged model's own greedy answer, computed directly on the CPU. Not base + adapter's (the merge stage's
    # gate compares those): on random weights the top tokens are near ties, which the 4-bit base's arithmetic
    # (bfloat16 where the CPU has bfloat16 instructions) and the merged float32 model's settle differently on
    # different machines (seen on an H100's host).
    monkeypatch.setattr(modeling, "pick_device", lambda: torch.device("cpu"))
    out = _run(["--model", str(tmp_path / "merged"), "--mode", "text", "--prompt", "Python is", *GREEDY])
    expected = _greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
                       AutoTokenizer.from_pretrained(tmp_path / "merged"), "Python is", 6)
    assert out == f"### Python is\n{expected}\n\n"


def test_interactive_mode_streams_answers_read_from_stdin_in_a_subprocess(project):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "qlorapipe.inference", "--base", str(project["base"]),
         "--adapter", f"chat={project['chat']}", "--adapter", f"code={project['code']}", *GREEDY],
        input="Python is\n/use code\nPython is\n/use nope\n/quit\n", capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    chat = _greedy_reference(project["base"], project["chat"], "Python is", 6)
    code = _greedy_reference(project["base"], project["code"], "Python is", 6)
    assert chat != code
    assert result.stdout.startswith("Type a prompt (/use NAME, /base, /quit).\n[chat]> ")
    assert f"[chat]> {chat}\n[chat]> [code]> {code}\n[code]> error: no adapter named 'nope'" in result.stdout


def test_many_adapters_switch_by_name_without_reloading_the_base(project):
    import torch

    loaded = inference.load_with_adapters(project["base"], {"chat": project["chat"], "code": project["code"]},
                                          torch.device("cpu"))
    base_model = loaded.model.get_base_model()
    settings = inference.SamplingSettings(max_new_tokens=6, temperature=0)
    chat = loaded.answer("Python is", settings)
    code = loaded.answer("Python is", settings, adapter="code")
    assert loaded.active == "chat"  # a per-request choice does not change the active adapter
    assert chat != code
    assert loaded.answer("Python is", settings, adapter="chat") == chat
    assert loaded.model.get_base_model() is base_model
    assert sorted(loaded.model.peft_config) == ["chat", "code"]
    with pytest.raises(UserError, match="no adapter named 'summary' is loaded \\(loaded: chat, code"):
        loaded.use("summary")


def test_compare_mode_prints_each_adapters_answer_to_the_same_prompts(project):
    out = _run(["--base", str(project["base"]), "--adapter", f"chat={project['chat']}",
                "--adapter", f"code={project['code']}", "--mode", "compare", "--params", str(project["params"]),
                *GREEDY])
    from transformers import AutoTokenizer

    from qlorapipe import modeling
    from qlorapipe.params import QuantizationParams

    base_alone, _ = modeling.load_base_model(project["base"], QuantizationParams(), modeling.pick_device())
    tokenizer = AutoTokenizer.from_pretrained(project["base"])
    expected = []
    for prompt in ("Python is", "The with statement"):
        answers = {"base": _greedy(base_alone, tokenizer, prompt, 6),
                   **{name: _greedy_reference(project["base"], project[name], prompt, 6) for name in ("chat", "code")}}
        assert len(set(answers.values())) == 3  # each row can only be right by coming from its own model
        expected += [f"### {prompt}", *(f"{name}: {' '.join(text.split())}" for name, text in answers.items()), ""]
    assert out.splitlines() == expected


def test_sampling_flags_change_the_answer_and_are_checked(project):
    argv = ["--base", str(project["base"]), "--adapter", str(project["chat"]), "--mode", "text",
            "--prompt", "Python is", "--max_new_tokens", "12"]
    hot = [_run(argv + ["--temperature", "5", "--top_p", "1.0", "--seed", str(s)]) for s in (1, 2)]
    assert hot[0] != hot[1]
    with pytest.raises(UserError, match="--top_p must be in \\(0, 1\\], got 1.5"):
        _run(argv + ["--top_p", "1.5"])
    with pytest.raises(UserError, match="--chat-template: this tokenizer has no chat template"):
        _run(argv + ["--chat-template"])


def test_missing_adapter_is_one_clear_error(project, tmp_path):
    with pytest.raises(UserError, match=f"adapter directory {tmp_path / 'nope'} does not exist"):
        _run(["--base", str(project["base"]), "--adapter", str(tmp_path / "nope"), "--mode", "text",
              "--prompt", "x"])


def test_a_base_the_download_stage_did_not_write_is_one_clear_error(project, tmp_path):
    merged = tmp_path / "merged"  # a model directory, but not a downloaded base (no source.json)
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    with pytest.raises(UserError, match=f"^{merged} is not a base model the download stage wrote .*--model$"):
        _run(["--base", str(merged), "--adapter", str(project["chat"]), "--mode", "text", "--prompt", "x"])


def test_adapter_trained_on_another_base_is_refused_naming_both(project, tmp_path, corpus_file):
    other = _download(tmp_path, make_model_dir(tmp_path / "other-model", seed=7), corpus_file)
    with pytest.raises(UserError) as info:
        _run(["--base", str(other), "--adapter", str(project["chat"]), "--mode", "text", "--prompt", "x"])
    message = str(info.value)
    assert f"{project['chat']} was trained on" in message and f"but {other} holds" in message
    assert "\n" not in message


def test_cli_exits_non_zero_with_one_line_for_a_user_error(project, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "qlorapipe.inference", "--model", str(tmp_path), "--mode",
                             "text", "--prompt", "x"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "error:" in result.stderr and "no model here (no config.json)" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(UserError, match=r"nope\.gguf: no such GGUF file; run `dvc repro export` or fix --model$"):
        _run(["--model", str(tmp_path / "nope.gguf"), "--mode", "text", "--prompt", "x"])

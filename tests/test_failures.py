"""Failing well: bad input refused in one line before anything is written, and no leftovers after a kill."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_stage, write_params

from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir, write_json, write_text_atomic
from qlorapipe.params import parse_section


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    # What SIGKILL leaves: the temporaries of atomic_dir and write_text_atomic, never renamed.
    (tmp_path / ".prepared.tmp-k1ll3d").mkdir()
    (tmp_path / ".prepared.tmp-k1ll3d" / "half.arrow").write_bytes(b"x" * 100)
    (tmp_path / ".eval.json.tmp-k1ll3d").write_text("{")
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's temporary is not ours to remove
    with atomic_dir(tmp_path / "prepared") as out:
        (out / "rows").write_text("complete")
    write_text_atomic(tmp_path / "eval.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "eval.json", "prepared"]


def test_a_replaced_output_stays_whole_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    with atomic_dir(tmp_path / "adapter") as out:
        (out / "weights").write_text("old")
    with atomic_dir(tmp_path / "adapter") as out:
        (out / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the old one moved aside, then deleted
    assert (tmp_path / "adapter/weights").read_text() == "new"
    real_replace = os.replace

    def failing_rename(src, dst):  # the new output cannot be renamed in (e.g. another process holds the path)
        if Path(src).name.startswith(".adapter.tmp-") and Path(dst) == tmp_path / "adapter":
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_rename)
    with pytest.raises(OSError, match="busy"):
        with atomic_dir(tmp_path / "adapter") as out:
            (out / "weights").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the old output is back, no temporary left
    assert (tmp_path / "adapter/weights").read_text() == "new"


def test_a_figure_is_written_whole_with_the_same_bytes_for_the_same_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlorapipe.outputs import save_figure_atomic

    (tmp_path / ".curves.png.tmp-k1ll3d.png").write_bytes(b"\x89PNG half")  # what a killed save leaves
    pngs = []
    for _ in range(2):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        save_figure_atomic(fig, tmp_path / "curves.png")
        assert not plt.fignum_exists(fig.number)  # closed
        pngs.append((tmp_path / "curves.png").read_bytes())
    assert pngs[0] == pngs[1] and pngs[0].startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_outputs_are_readable_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "metrics.json", "{}\n")
        with atomic_dir(tmp_path / "adapter") as out:
            (out / "a").write_text("a")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_a_metric_file_never_holds_nan_or_infinity(tmp_path):
    with pytest.raises(UserError, match=r"eval.json: finetuned.perplexity is not a finite number"):
        write_json(tmp_path / "eval.json", {"base": {"loss": 1.0}, "finetuned": {"perplexity": float("inf")}})
    with pytest.raises(UserError, match=r"curve.1 is not a finite number"):
        write_json(tmp_path / "eval.json", {"curve": [1.0, float("nan")]})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("section", "raw", "message"), [
    ("training", {"learning_rate": "nan"}, "training.learning_rate: must be a finite number, got 'nan'"),
    ("training", {"learning_rate": float("inf")}, "training.learning_rate: must be a finite number, got inf"),
    ("training", {"epochs": float("nan")}, "training.epochs: must be a finite number"),
    ("lora", {"alpha": float("nan")}, "lora.alpha: must be a finite number"),
    ("merge", {"max_perplexity_change": float("inf")}, "merge.max_perplexity_change: must be a finite number"),
    ("acceleration", {"memory_budget_gb": float("nan")}, "acceleration.memory_budget_gb: must be a finite number or null"),
    ("training", {"max_eval_batches": -1}, "training.max_eval_batches must be at least 1, or null"),
    ("evaluate", {"max_eval_batches": 0}, "evaluate.max_eval_batches must be at least 1, or null"),
    ("export", {"max_shard_size": "banana"}, "export.max_shard_size must be a whole number and a unit"),
    ("export", {"max_shard_size": "1.5GB"}, "export.max_shard_size must be a whole number and a unit"),
])
def test_numbers_that_are_not_finite_or_out_of_range_are_refused(section, raw, message):
    with pytest.raises(UserError) as info:
        parse_section(section, raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_shard_sizes_save_pretrained_reads_are_accepted_and_the_others_refused():
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {"w": torch.zeros(4)}
    for size in ("5GB", "500MB", "10 GB", "2gb", "1TB"):
        assert parse_section("export", {"max_shard_size": size}).max_shard_size == size
        assert split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors  # what it runs
    for size in ("2GiB", "1.5GB", "5 Gbit", "GB", "100"):
        with pytest.raises(UserError, match="export.max_shard_size must be a whole number and a unit"):
            parse_section("export", {"max_shard_size": size})
    for size in ("2GiB", "5 Gbit", "GB"):
        with pytest.raises(ValueError):  # what export would have met, after every GGUF file
            split_torch_state_dict_into_shards(state, max_shard_size=size)


def _download(tmp_path: Path, model_dir: Path) -> subprocess.CompletedProcess:
    params = write_params(tmp_path / "params.yaml", {"model": {"source": "local", "local_path": str(model_dir)}})
    return subprocess.run([sys.executable, str(ROOT / "stages/download.py"), "--params", str(params),
                           "--out", str(tmp_path / "models/base")], capture_output=True, text=True, cwd=tmp_path)


def _copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


@pytest.mark.parametrize("case", ["no tokenizer", "truncated weights", "missing shard"])
def test_a_broken_local_model_directory_is_refused_at_download_in_one_line(tmp_path, tiny_llama_dir, case):
    broken = _copy(tiny_llama_dir, tmp_path / "broken")
    if case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (broken / name).unlink(missing_ok=True)
        expected = "no tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json + merges.txt)"
    elif case == "truncated weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        expected = "model.safetensors is truncated:"
    else:
        (broken / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
        expected = "model.safetensors.index.json names shards that are not there: model-00002-of-00002.safetensors"
    result = _download(tmp_path, broken)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.local_path") and expected in " ".join(lines[-3:]), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models/base").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no temporary left either


def test_a_complete_local_model_directory_still_downloads(tmp_path, tiny_llama_dir):
    result = _download(tmp_path, tiny_llama_dir)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models/base/model.safetensors").is_file()


def test_a_stage_rerun_after_a_kill_leaves_no_temporary_behind(tmp_path, tiny_llama_dir):
    params = write_params(tmp_path / "params.yaml", {"model": {"source": "local", "local_path": str(tiny_llama_dir)}})
    (tmp_path / "models/.base.tmp-k1ll3d").mkdir(parents=True)  # what a download killed with SIGKILL leaves
    (tmp_path / "models/.base.tmp-k1ll3d/model.safetensors").write_bytes(b"half")
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "models/base")])
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["base"]


def _prepare(tmp_path: Path, model_dir: Path, corpus: Path, **data) -> list[str]:
    from conftest import tiny_params

    params = tiny_params(model_dir, corpus)
    params["data"].update(data)
    path = write_params(tmp_path / "params.yaml", params)
    load_stage("download").main(["--params", str(path), "--out", str(tmp_path / "base")])
    return ["--params", str(path), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "prepared"),
            "--report", str(tmp_path / "data.json"), "--lengths", str(tmp_path / "lengths.csv"),
            "--lengths-plot", str(tmp_path / "lengths.png")]


def test_one_text_file_is_a_stream_split_into_train_rows_and_a_held_out_tail(tmp_path, tiny_llama_dir):
    import datasets
    from conftest import CORPUS

    corpus = tmp_path / "book.txt"
    corpus.write_text("\n".join([CORPUS] * 4))
    load_stage("prepare").main(_prepare(tmp_path, tiny_llama_dir, corpus))
    report = json.loads((tmp_path / "data.json").read_text())
    assert report["records"] == 1 and report["train"]["examples"] == report["eval"]["examples"] == 1
    tokens = report["train"]["tokens"] + report["eval"]["tokens"]
    assert report["eval"]["tokens"] == max(32, round(0.2 * tokens))  # the last eval_fraction of the stream
    train = datasets.load_from_disk(str(tmp_path / "prepared/train"))
    held_out = datasets.load_from_disk(str(tmp_path / "prepared/eval"))
    assert len(train) == report["train"]["tokens"] // 32 and len(held_out) == report["eval"]["tokens"] // 32 >= 1


def test_a_split_that_cannot_be_made_is_refused_before_tokenizing(tmp_path, tiny_llama_dir):
    one_record = tmp_path / "one.jsonl"
    one_record.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    with pytest.raises(UserError, match=r"one.jsonl: 1 record\(s\); need at least 2, one for training and one for "
                                        r"evaluation"):
        load_stage("prepare").main(_prepare(tmp_path, tiny_llama_dir, one_record, format="completion"))
    short = tmp_path / "short.txt"
    short.write_text("Python is a programming language.")
    with pytest.raises(UserError, match=r"is one document of \d+ tokens: too few for a train row and an eval row of "
                                        r"data.max_length=32"):
        (tmp_path / "b").mkdir()
        load_stage("prepare").main(_prepare(tmp_path / "b", tiny_llama_dir, short))
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "b" / "prepared").exists()


@pytest.fixture(scope="module")
def tiny_neox_base(tmp_path_factory) -> Path:
    """A downloaded tiny GPT-NeoX model: an architecture that trains but has no GGUF writer here."""
    import torch
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    work = tmp_path_factory.mktemp("neox")
    tokenizer = build_tokenizer()
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "neox")
    tokenizer.save_pretrained(work / "neox")
    params = write_params(work / "params.yaml", {"model": {"source": "local", "local_path": str(work / "neox")}})
    load_stage("download").main(["--params", str(params), "--out", str(work / "base")])
    return work / "base"


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _compat(tmp_path: Path, base: Path, **sections) -> list[str]:
    path = write_params(tmp_path / "params.yaml", sections)
    return ["--params", str(path), "--base", str(base), "--out", str(tmp_path / "compat_check.txt")]


def test_what_the_model_cannot_do_is_refused_before_prepare_naming_each_key(tmp_path, tiny_neox_base):
    args = _compat(tmp_path, tiny_neox_base, export={"formats": ["safetensors", "gguf-q8_0", "onnx-int4"]},
                   lora={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]},
                   data={"source": "builtin:chatterbot", "max_length": 1024, "format": "chat"},
                   evaluate={"chat_template": True, "general_corpus": "builtin:python-docs"})
    result = subprocess.run([sys.executable, str(ROOT / "stages/compat.py"), *args], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: params ask what {tiny_neox_base} (gpt_neox) cannot do: ")
    for expected in ("export.formats ['gguf-q8_0']: GGUF files are written for llama and qwen2 models; this one is "
                     "gpt_neox; keep safetensors and adapter only",
                     "export.formats ['onnx-int4']: ONNX models are built for LlamaForCausalLM, MistralForCausalLM, ",
                     "this one is GPTNeoXForCausalLM; keep safetensors and adapter only",
                     "lora.target_modules ['q_proj', 'v_proj'] match no linear layer of this model; its linear layers "
                     "are: dense, dense_4h_to_h, dense_h_to_4h, query_key_value",
                     "lora.modules_to_save ['embed_tokens'] match no module",
                     "data.max_length 1024 is longer than this model's 512 positions (max_position_embeddings); "
                     "set it to 512 or less",
                     "data.format is chat but the tokenizer has no chat template; set data.chat_template",
                     "evaluate.chat_template is true but the tokenizer has no chat template"):
        assert expected in message
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]  # nothing written


def test_a_chat_template_with_a_jinja_syntax_error_is_refused_before_prepare(tmp_path, tiny_neox_base):
    def compat(template: str) -> list[str]:
        return _compat(tmp_path, tiny_neox_base, export={"formats": ["safetensors", "adapter"]},
                       data={"source": "builtin:chatterbot", "format": "chat", "chat_template": template},
                       evaluate={"general_corpus": "builtin:python-docs"})

    with pytest.raises(UserError) as refused:
        load_stage("compat").main(compat("{% for m in messages %}{{ m.content"))
    assert ("data.chat_template: not a Jinja template (unexpected end of template, expected 'end of print "
            "statement'. at line 1); fix its Jinja syntax") in str(refused.value)
    assert not (tmp_path / "compat_check.txt").exists()
    # transformers' own tags compile as apply_chat_template compiles them
    load_stage("compat").main(compat("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                                     "{% endfor %}"))
    assert (tmp_path / "compat_check.txt").is_file()


@pytest.mark.skipif(torch_cuda_available(), reason="float16 compute is refused only where there is no CUDA GPU")
def test_float16_compute_without_a_gpu_is_refused_before_prepare(tmp_path, tiny_neox_base):
    args = _compat(tmp_path, tiny_neox_base, export={"formats": ["safetensors", "adapter"]},
                   quantization={"compute_dtype": "float16"})
    with pytest.raises(UserError, match=r"quantization.compute_dtype float16 is not supported on the CPU \(no CUDA "
                                        r"GPU here\); use auto or float32"):
        load_stage("compat").main(args)
    assert not (tmp_path / "compat_check.txt").exists()


def test_what_the_model_can_do_passes_and_writes_the_same_text_every_time(tmp_path, tiny_neox_base, tiny_llama_dir):
    neox = _compat(tmp_path, tiny_neox_base, export={"formats": ["safetensors", "adapter"]},
                   lora={"target_modules": ["query_key_value"], "modules_to_save": ["embed_in"]})
    load_stage("compat").main(neox)
    first = (tmp_path / "compat_check.txt").read_bytes()
    (tmp_path / "llama").mkdir()
    params = write_params(tmp_path / "llama/params.yaml",
                          {"model": {"source": "local", "local_path": str(tiny_llama_dir)}})
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "llama/base")])
    load_stage("compat").main(_compat(tmp_path / "llama", tmp_path / "llama/base"))  # the repo defaults: GGUF too
    assert (tmp_path / "llama/compat_check.txt").read_bytes() == first


def test_the_export_step_refuses_gguf_with_the_same_rule(tmp_path, tiny_neox_base):
    from transformers import AutoModelForCausalLM

    from qlorapipe.export.gguf import write_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_neox_base)
    with pytest.raises(UserError, match=r"export.formats gguf-f16: GGUF files are written for llama and qwen2 "
                                        r"models; this one is gpt_neox"):
        write_gguf(model, tiny_neox_base, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_a_figure_that_is_not_a_number_fails_every_gate():
    """Logits that overflow the merged dtype come back as NaN, and NaN compares false to every
    bound: each gate must read that as failing, not passing."""
    from qlorapipe import export
    from qlorapipe.evaluate import gate_problems
    from qlorapipe.fidelity import Fidelity
    from qlorapipe.merge import gate
    from qlorapipe.params import EvaluateParams, ExportParams, MergeParams

    nan = float("nan")
    import torch

    from qlorapipe.fidelity import compare

    reference = torch.zeros(1, 4, 8)
    candidate = reference.clone()
    candidate[0, 1, 2] = nan  # one NaN logit among finite ones: what a broken merge gives
    compared = compare([reference], [candidate], [torch.zeros(1, 4, dtype=torch.long)])
    assert math.isnan(compared.max_logit_diff) and math.isnan(compared.mean_logit_diff)
    found = gate.problems(Fidelity(nan, nan, nan, 10.0), MergeParams())
    assert [f.split(" >")[0].split(" exceeds")[0] for f in found] == [
        "max logit difference nan", "mean logit difference nan", "perplexity change +nan"]
    with pytest.raises(UserError, match="perplexity change \\+nan > export.max_perplexity_change.gguf-f16"):
        export.gate(ExportParams(), "gguf-f16", {"perplexity_change": nan, "token_agreement": 1.0,
                                                 "stop_mismatches": 0, "tokenizer_matches": True,
                                                 "chat_template_matches": True})
    [problem] = gate_problems(EvaluateParams(max_general_perplexity_increase=0.1),
                              {"finetuned": {}, "general_perplexity_increase": nan})
    assert "evaluate.max_general_perplexity_increase=0.1" in problem


def test_the_merge_gate_suggests_only_what_would_change_something():
    from qlorapipe.fidelity import Fidelity
    from qlorapipe.merge import gate
    from qlorapipe.params import MergeParams

    far = Fidelity(6.13, 0.34, 10.01, 10.0)  # logits apart, perplexity close
    with pytest.raises(UserError, match=r"max logit difference 6.1300 > merge.max_logit_diff 5.0.*"
                                        r"\(try merge.dtype: float32, or raise the threshold if this is expected\)$"):
        gate.check(far, MergeParams())
    with pytest.raises(UserError, match=r"\(raise the threshold if this is expected\)$"):
        gate.check(far, MergeParams(dtype="float32"))
    gate.check(far, MergeParams(max_logit_diff=7.0, max_mean_logit_diff=0.4))  # raised: passes


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_rope_scaling_refuses_gguf_in_compat_as_in_export_whichever_key_spells_it(tmp_path, tiny_llama_dir, key):
    """compat reads the raw config.json, export a transformers config: both must see old configs' "type" too."""
    import json
    from types import SimpleNamespace

    from transformers import AutoConfig

    from qlorapipe.compat import gguf_problem

    raw = {**json.loads((tiny_llama_dir / "config.json").read_text()),
           "rope_scaling": {key: "linear", "factor": 4.0}, "rope_theta": 10000.0}
    raw.pop("rope_parameters", None)  # a config written before transformers 5, as on the Hub
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "tokenizer.json").write_bytes((tiny_llama_dir / "tokenizer.json").read_bytes())
    expected = "GGUF files are written without rope scaling; this model uses 'linear'"
    assert gguf_problem(SimpleNamespace(**raw), tmp_path) == expected  # as the compat stage reads it
    assert gguf_problem(AutoConfig.from_pretrained(tmp_path), tmp_path) == expected  # as export reads it

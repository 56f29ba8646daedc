"""Each stage's main() run in a temp directory on a tiny model: the exact files it writes and its metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_stage, tiny_params, train_args, write_params

from qlorapipe.errors import UserError


def _memory_keys() -> set[str]:
    import torch

    return {"peak_gpu_allocated_gb", "peak_gpu_reserved_gb"} if torch.cuda.is_available() else {"peak_rss_gb"}


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, corpus_file):
    """Run the six stages in order; each test below inspects one stage's outputs."""
    work = tmp_path_factory.mktemp("pipeline")
    params = write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "export.formats": ["safetensors", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "adapter"],
        "merge.requantized_candidate": True,
        "merge.speed_new_tokens": 8}))
    p = {"params": params} | {name: work / rel for name, rel in {
        "base": "models/base", "prepared": "data/prepared", "adapter": "models/adapter",
        "merged": "models/merged", "export": "models/export", "metrics": "metrics",
    }.items()}
    common = ["--params", str(params)]
    m = p["metrics"]
    load_stage("download").main(common + ["--out", str(p["base"])])
    load_stage("prepare").main(common + ["--base", str(p["base"]), "--out", str(p["prepared"]),
                                         "--report", str(m / "data.json"), "--lengths", str(m / "data_lengths.csv"),
                                         "--lengths-plot", str(m / "data_lengths.png")])
    load_stage("train").main(common + ["--base", str(p["base"]), "--data", str(p["prepared"]),
                                       "--adapter", str(p["adapter"]), "--metrics", str(m / "train.json"),
                                       "--history", str(m / "train_history.csv"),
                                       "--curves", str(m / "training_curves.png"),
                                       "--log", str(m / "training_log.txt"),
                                       "--checkpoints", str(work / "models/checkpoints"),
                                       "--live", str(m / "train_live")])
    load_stage("evaluate").main(common + ["--base", str(p["base"]), "--adapter", str(p["adapter"]),
                                          "--data", str(p["prepared"]), "--metrics", str(m / "eval.json"),
                                          "--samples", str(m / "samples.json"),
                                          "--scores-plot", str(m / "eval_scores.png")])
    load_stage("merge").main(common + ["--base", str(p["base"]), "--adapter", str(p["adapter"]),
                                       "--data", str(p["prepared"]), "--out", str(p["merged"]),
                                       "--metrics", str(m / "merge.json")])
    load_stage("card").main(["--data-report", str(m / "data.json"), "--train-metrics", str(m / "train.json"),
                             "--eval-metrics", str(m / "eval.json"), "--merge-metrics", str(m / "merge.json"),
                             "--out", str(m / "card.json")])
    load_stage("export").main(common + ["--merged", str(p["merged"]), "--base", str(p["base"]),
                                        "--adapter", str(p["adapter"]),
                                        "--data", str(p["prepared"]), "--out", str(p["export"]),
                                        "--metrics", str(m / "export.json"), "--card", str(m / "card.json")])
    return p


def test_download_writes_a_plain_model_directory(run):
    assert _files(run["base"]) == ["config.json", "generation_config.json", "model.safetensors", "source.json",
                                   "tokenizer.json", "tokenizer_config.json"]
    source = json.loads((run["base"] / "source.json").read_text())
    assert source["source"] == "local" and source["model_type"] == "llama"
    assert len(source["content_sha256"]) == 64


def test_prepare_writes_train_and_eval_arrow_datasets_and_a_report(run):
    import datasets

    assert _files(run["prepared"]) == sorted([f"{split}/{f}" for split in ("eval", "train")
                                              for f in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
                                              ] + ["eval_tasks.jsonl"])
    assert (run["prepared"] / "eval_tasks.jsonl").read_text() == ""  # text data: no prompts to answer
    report = json.loads((run["metrics"] / "data.json").read_text())
    assert set(report) == {"format", "max_length", "records", "empty_skipped", "duplicates", "truncated",
                           "dropped_too_long", "dropped_all_masked", "truncated_share", "dropped_share",
                           "train", "eval"}
    assert report["train"]["examples"] + report["eval"]["examples"] == report["records"] == 60
    for split in ("train", "eval"):
        stats = report[split]
        assert set(stats) == {"examples", "rows", "tokens", "trained_tokens", "padding_share", "tokens_dropped"} | (
            {"task_examples"} if split == "eval" else set())
        assert stats["rows"] * 32 + stats["tokens_dropped"] == stats["tokens"]
        dataset = datasets.load_from_disk(str(run["prepared"] / split))
        assert len(dataset) == stats["rows"]
        assert dataset[0]["position_ids"] == list(range(32))
        assert dataset[0]["input_ids"] == dataset[0]["labels"]
    histogram = (run["metrics"] / "data_lengths.csv").read_text().splitlines()
    assert histogram[0] == "length,examples"
    assert sum(int(line.split(",")[1]) for line in histogram[1:]) == 60
    assert (run["metrics"] / "data_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_train_writes_a_peft_adapter_metrics_curves_and_log(run):
    assert _files(run["adapter"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                      "training_params.json"]
    metrics = json.loads((run["metrics"] / "train.json").read_text())
    assert set(metrics) == {"train_loss", "eval_loss", "steps", "tokens_trained", "tokens_per_second",
                            "train_seconds", "wall_seconds", "trainable_params", "total_params", "compute_dtype",
                            "device", "best_step", "stopped_early", "resumed_from_step", "cuda_graph_replays",
                            "uncheckpointed_layers", "host_kept_layers", "offload_checkpoints", "environment",
                            "num_processes", "global_batch_size", "seconds", "loop_seconds"} | _memory_keys()
    # Where the stage's time went: each phase, the optimizer steps inside the loop, all within the wall time.
    assert set(metrics["seconds"]) == {"start", "load", "lora", "plan", "loop", "save"}
    assert metrics["seconds"]["loop"] >= metrics["train_seconds"]
    # Beside the optimizer steps: two evaluations (steps 6 and 12), and no checkpoints (checkpoint_every_steps 0).
    beside = metrics["loop_seconds"]
    assert set(beside) == {"evaluations", "checkpoints"} and beside["evaluations"] > 0 and beside["checkpoints"] == 0
    assert metrics["train_seconds"] + sum(beside.values()) <= metrics["seconds"]["loop"] + 0.05
    assert sum(metrics["seconds"].values()) <= metrics["wall_seconds"] + 0.05
    assert set(metrics["environment"]) == {"torch", "transformers", "peft", "bitsandbytes", "cuda", "gpu"}
    assert metrics["environment"]["torch"] == __import__("torch").__version__
    assert metrics["steps"] == 12 and metrics["tokens_trained"] == 12 * 4 * 32
    assert metrics["num_processes"] == 1 and metrics["global_batch_size"] == 4
    # auto: both tiny blocks fit in 90% of a GPU's memory, and on the CPU in half the host memory available.
    assert metrics["uncheckpointed_layers"] == 2
    assert metrics["host_kept_layers"] == 0 and metrics["offload_checkpoints"] is False  # CUDA levers
    assert metrics["trainable_params"] > 0 and metrics["total_params"] > metrics["trainable_params"]
    history = (run["metrics"] / "train_history.csv").read_text().splitlines()
    assert history[0] == "step,epoch,train_loss,eval_loss,learning_rate"
    assert len(history) == 13
    evaluated = [row.split(",")[0] for row in history[1:] if row.split(",")[3]]
    assert evaluated == ["6", "12"]
    assert (run["metrics"] / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run["metrics"] / "training_log.txt").read_text()
    assert log.startswith("trainable params: ")
    record = json.loads((run["adapter"] / "training_params.json").read_text())
    assert set(record) == {"base_model", "data_sha256", "environment", "data", "quantization", "lora", "training"}
    assert len(record["data_sha256"]) == 64 and len(record["base_model"]["content_sha256"]) == 64
    assert set(record["environment"]) == {"torch", "transformers", "peft", "bitsandbytes", "cuda", "gpu"}
    assert record["lora"]["rank"] == 8


def test_training_lowers_the_loss(run):
    history = [line.split(",") for line in (run["metrics"] / "train_history.csv").read_text().splitlines()[1:]]
    assert float(history[-1][2]) < float(history[0][2])


def test_evaluate_reports_base_and_finetuned_perplexity(run):
    metrics = json.loads((run["metrics"] / "eval.json").read_text())
    assert set(metrics) == {"base", "finetuned", "eval_tokens", "perplexity_reduction", "general_tokens",
                            "general_perplexity_increase", "memory", "seconds"}
    assert set(metrics["memory"]) - {"budget_gb"} == _memory_keys()
    # Text data: no held-out answers to time.
    assert set(metrics["seconds"]) == {"load", "perplexity", "general", "samples", "chart"}
    assert all(value >= 0 for value in metrics["seconds"].values())
    for name in ("base", "finetuned"):
        assert set(metrics[name]) == {"loss", "perplexity", "general"}  # text data: no task scores
        assert math.isclose(metrics[name]["perplexity"], math.exp(metrics[name]["loss"]), rel_tol=1e-3)
        assert math.isclose(metrics[name]["general"]["perplexity"], math.exp(metrics[name]["general"]["loss"]),
                            rel_tol=1e-3)
    assert metrics["general_tokens"] == 2 * 4 * 31  # general_batches x batch_size rows of 32, each predicts 31
    assert math.isclose(metrics["general_perplexity_increase"],
                        metrics["finetuned"]["general"]["perplexity"] / metrics["base"]["general"]["perplexity"] - 1,
                        abs_tol=1e-4)
    assert (run["metrics"] / "eval_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["finetuned"]["perplexity"] < metrics["base"]["perplexity"]
    samples = json.loads((run["metrics"] / "samples.json").read_text())
    assert samples["prompts"] == ["Python is", "The with statement"]
    assert len(samples["base"]) == len(samples["finetuned"]) == 2


def test_merge_writes_a_standalone_model_that_computes_what_was_trained(run):
    from transformers import AutoModelForCausalLM

    assert _files(run["merged"]) == ["config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json", "training_params.json"]
    metrics = json.loads((run["metrics"] / "merge.json").read_text())
    assert set(metrics) == {"merged", "naive_merge_into_16bit_base", "merged_requantized_4bit", "speed",
                            "reference_perplexity", "dtype", "eval_tokens", "scored_tokens", "offloaded_modules",
                            "seconds", "memory"}
    # Compared where training took a loss: at most every position but each row's last.
    length = json.loads((run["metrics"] / "data.json").read_text())["max_length"]
    assert 0 < metrics["scored_tokens"] <= metrics["eval_tokens"] - metrics["eval_tokens"] // length
    # Where the time went, phase by phase.
    assert set(metrics["seconds"]) == {"load", "merge", "save", "reference", "speed", "naive", "reload_and_compare",
                                       "requantized"}
    assert all(value >= 0 for value in metrics["seconds"].values())
    # The stage's peak memory (and on a GPU its budget), for `dvc metrics diff`.
    assert set(metrics["memory"]) - {"budget_gb"} == _memory_keys() and metrics["offloaded_modules"] == 0
    assert all(value > 0 for value in metrics["memory"].values())
    assert metrics["merged"]["max_logit_diff"] < 1e-2
    assert metrics["naive_merge_into_16bit_base"]["max_logit_diff"] > 5 * metrics["merged"]["max_logit_diff"]
    # Quantizing the merged weights again re-rounds them: further from what was trained than the merge.
    assert metrics["merged_requantized_4bit"]["max_logit_diff"] > 5 * metrics["merged"]["max_logit_diff"]
    for name in ("base_plus_adapter", "merged"):
        speed = metrics["speed"][name]
        assert speed["new_tokens"] == 8
        assert 0 < speed["time_to_first_token_ms"] < 1000 * speed["total_seconds"]
        memory_key = "peak_gpu_allocated_mb" if "peak_rss_gb" not in _memory_keys() else "process_peak_rss_mb"
        assert speed["tokens_per_second"] > 0 and speed[memory_key] > 0
    # The merged model is float32 here, the base + adapter 4-bit: it holds more bytes of weights.
    assert metrics["speed"]["merged"]["weights_mb"] > metrics["speed"]["base_plus_adapter"]["weights_mb"]
    model = AutoModelForCausalLM.from_pretrained(run["merged"])
    assert "quantization_config" not in model.config.to_dict()


def test_export_writes_model_tokenizer_and_card(run):
    assert _files(run["export"]) == [
        "README.md", "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json", "adapter/tokenizer_config.json", "adapter/training_params.json", "config.json",
        "generation_config.json", "gguf/model-f16.Modelfile", "gguf/model-f16.gguf", "gguf/model-q4_k_m.Modelfile",
        "gguf/model-q4_k_m.gguf", "gguf/model-q8_0.Modelfile", "gguf/model-q8_0.gguf", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "training_params.json"]
    card = (run["export"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: model\n")
    for needle in ("## Base model", "## Data", "## Results", "fine-tuned", '"rank": 8'):
        assert needle in card


def test_export_max_shard_size_splits_the_model_into_shards_holding_the_same_tensors(run, tmp_path):
    import torch
    import yaml
    from safetensors.torch import load_file

    params = yaml.safe_load(run["params"].read_text())
    params["export"].update({"formats": ["safetensors"], "max_shard_size": "100KB"})
    out = tmp_path / "sharded"
    load_stage("export").main(["--params", str(write_params(tmp_path / "params.yaml", params)),
                               "--merged", str(run["merged"]), "--base", str(run["base"]),
                               "--adapter", str(run["adapter"]), "--data", str(run["prepared"]), "--out", str(out),
                               "--metrics", str(tmp_path / "export.json"), "--card", str(run["metrics"] / "card.json")])
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and all(s.stat().st_size <= 100 * 1000 * 2 for s in shards)  # one tensor may overfill
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [s.name for s in shards]
    whole = load_file(run["export"] / "model.safetensors")
    parts = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    assert sorted(parts) == sorted(whole) == sorted(index)
    assert all(torch.equal(parts[name], whole[name]) for name in whole)


def test_a_failing_stage_leaves_no_output_behind(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "data.max_length": 100000}))
    (tmp_path / "models").mkdir()
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "models/base")])
    with pytest.raises(UserError, match="fewer than data.max_length=100000: lower data.max_length"):
        load_stage("prepare").main(["--params", str(params), "--base", str(tmp_path / "models/base"),
                                    "--out", str(tmp_path / "data/prepared"), "--report", str(tmp_path / "r.json"),
                                    "--lengths", str(tmp_path / "l.csv"), "--lengths-plot", str(tmp_path / "l.png")])
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "r.json").exists()


def test_the_check_stage_finds_every_missing_or_wrong_local_input_at_once(tmp_path, tiny_llama_dir, corpus_file):
    """Local files the params name are looked at by the first stage, before DVC deletes the outputs of the
    stages that read them; what is fine passes."""
    check = load_stage("check")
    (tmp_path / "general.txt").write_text("Everyday English, not trained on.\n")
    good = write_params(tmp_path / "good.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "evaluate.general_corpus": str(tmp_path / "general.txt")}))
    check.main(["--params", str(good), "--out", str(tmp_path / "passed.txt")])
    assert (tmp_path / "passed.txt").is_file()

    (tmp_path / "empty").mkdir()
    bad = write_params(tmp_path / "bad.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "model.local_path": str(tmp_path / "no-model"), "data.path": str(tmp_path / "empty"),
        "evaluate.general_corpus": str(tmp_path / "params.md")}))
    with pytest.raises(UserError) as found:
        check.main(["--params", str(bad), "--out", str(tmp_path / "failed.txt")])
    assert str(found.value) == (
        f"model.local_path '{tmp_path / 'no-model'}' does not exist: point it at a Hugging Face model directory or "
        f"a .gguf file; data.path '{tmp_path / 'empty'}': no .txt, .jsonl, .json, .csv, .parquet files found; "
        f"evaluate.general_corpus '{tmp_path / 'params.md'}' does not exist: name a local .txt file or folder, or "
        "one of builtin:python-docs, builtin:chatterbot")
    assert not (tmp_path / "failed.txt").exists()

    # A param out of range too: its problem and the local inputs' in one message, one run to see them all.
    bad = write_params(tmp_path / "bad.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "model.local_path": str(tmp_path / "no-model"), "training.per_device_batch_size": 0}))
    with pytest.raises(UserError) as found:
        check.main(["--params", str(bad), "--out", str(tmp_path / "failed.txt")])
    assert str(found.value) == (
        f"invalid params: training.per_device_batch_size must be at least 1, got 0; model.local_path "
        f"'{tmp_path / 'no-model'}' does not exist: point it at a Hugging Face model directory or a .gguf file")
    assert not (tmp_path / "failed.txt").exists()

    # Data whose first record lacks a column the format needs (prepare would stop there, its outputs deleted).
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n')
    write_params(bad, tiny_params(tiny_llama_dir, rows, **{"data.format": "instruction"}))
    with pytest.raises(UserError) as found:
        check.main(["--params", str(bad), "--out", str(tmp_path / "failed.txt")])
    assert str(found.value) == (f"{rows}:1: no 'instruction' or 'output' column (has: answer, question); set "
                                "data.instruction_column and data.output_column")
    assert not (tmp_path / "failed.txt").exists()

    # A file that is neither a model directory nor a GGUF file, and a directory without config.json.
    for path, message in ((corpus_file, "must be a Hugging Face model directory or a .gguf file"),
                          (tmp_path / "empty", "not a Hugging Face model directory (no config.json)")):
        write_params(bad, tiny_params(path, corpus_file))
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check.main(["--params", str(bad), "--out", str(tmp_path / "failed.txt")])


def test_the_check_stage_refuses_unknown_lm_eval_tasks_and_warns_of_inputs_dvc_does_not_track(
        tmp_path, tiny_llama_dir, corpus_file, caplog, monkeypatch):
    """An lm-eval task the evaluate stage would refuse is refused first; a local input no stage depends on
    in dvc.yaml, or a gate that cannot act, is named without stopping the run."""
    import shutil

    check = load_stage("check")
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    data_file = tmp_path / "mydata" / "rows.txt"
    data_file.write_text(corpus_file.read_text())
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task_file = tasks / "general_knowledge.yaml"
    shutil.copy(root / "tests" / "data" / "lm_eval" / "general_knowledge.yaml", task_file)
    shutil.copy(root / "tests" / "data" / "lm_eval" / "general_knowledge.jsonl", tasks)
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, Path("mydata/rows.txt"), **{
        "evaluate.lm_eval_tasks": ["tasks/general_knowledge.yaml", "arc_eazy"]}))
    with pytest.raises(UserError, match=r"^evaluate.lm_eval_tasks: 'arc_eazy' is not an lm-eval task, group or "
                                        r"tag: did you mean arc_easy"):
        check.main(["--params", str(params), "--out", "passed.txt"])
    assert not (tmp_path / "passed.txt").exists()

    write_params(params, tiny_params(tiny_llama_dir, Path("mydata/rows.txt"), **{
        "evaluate.lm_eval_tasks": ["tasks/general_knowledge.yaml"], "evaluate.min_stop_share": 0.8}))
    with caplog.at_level("WARNING", logger="qlorapipe.check"):
        check.main(["--params", str(params), "--out", "passed.txt"])
    assert (tmp_path / "passed.txt").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == "qlorapipe.check"]
    model_dep = f"model.local_path '{tiny_llama_dir}' is not among the download stage's deps"
    assert warnings == [
        "evaluate.min_stop_share has no effect with data.format text: only instruction, chat and completion data "
        "have held-out answers to score",
        f"{model_dep} in dvc.yaml: DVC will not re-run download when it changes; add it there (deps: - "
        f"{tiny_llama_dir})",
        "data.path 'mydata/rows.txt' is not among the prepare stage's deps in dvc.yaml: DVC will not re-run "
        "prepare when it changes; add it there (deps: - mydata/rows.txt)",
        "evaluate.lm_eval_tasks 'tasks/general_knowledge.yaml' is not among the evaluate stage's deps in dvc.yaml: "
        "DVC will not re-run evaluate when it changes; add it there (deps: - tasks/general_knowledge.yaml)"]

    # Listed as deps (the file, or a folder holding it), they are tracked: no warning.
    import yaml

    pipeline = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    pipeline["stages"]["download"]["deps"].append(str(tiny_llama_dir))
    pipeline["stages"]["prepare"]["deps"].append("mydata/rows.txt")
    pipeline["stages"]["evaluate"]["deps"].append("tasks")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    write_params(params, tiny_params(tiny_llama_dir, Path("mydata/rows.txt"), **{
        "evaluate.lm_eval_tasks": ["tasks/general_knowledge.yaml"]}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="qlorapipe.check"):
        check.main(["--params", str(params), "--out", "passed.txt"])
    assert [r for r in caplog.records if r.name == "qlorapipe.check"] == []


def test_bad_params_stop_before_any_weights_load(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "training.optimizer": "adam"}))
    with pytest.raises(UserError, match="training.optimizer: must be one of"):
        load_stage("train").main(train_args(params, Path("nowhere"), Path("nowhere"), tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_export_gguf_files_run_in_llama_cpp_as_the_trained_model_does(run):
    import gguf

    metrics = json.loads((run["metrics"] / "export.json").read_text())
    assert metrics["formats"] == ["safetensors", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "adapter"]
    # Where the time went, phase by phase, and the peak memory.
    assert set(metrics["seconds"]) == {"load", "safetensors", "reference_logits", "reference_continuations",
                                       "write_f16", "check_f16", "write_q8_0", "check_q8_0", "write_q4_k_m",
                                       "check_q4_k_m", "adapter"}
    assert all(value >= 0 for value in metrics["seconds"].values())
    assert set(metrics["memory"]) - {"budget_gb"} == _memory_keys()
    f16, q8, q4 = metrics["gguf_f16"], metrics["gguf_q8_0"], metrics["gguf_q4_k_m"]
    # Logits computed by llama.cpp against the merged model: f16 rounds each weight to 11 bits, q8_0
    # to 8 bits per block of 32, q4_k_m to 4-6 bits: each drifts more, all stay close.
    assert f16["max_logit_diff"] < 2e-3
    assert f16["max_logit_diff"] < q8["max_logit_diff"] < q4["max_logit_diff"] < 0.2
    assert abs(q8["perplexity_change"]) < 5e-3 and abs(q4["perplexity_change"]) < 2e-2
    for found in (f16, q8, q4):
        assert found["tokenizer_matches"] and found["chat_template_matches"] is None  # no chat template here
        assert found["stop_mismatches"] == 0 and found["token_agreement"] >= 0.5
        assert found["ollama_modelfile"]
        assert found["gpu_layers"] == 0 and found["gpu_gb"] == 0  # the CPU runs llama.cpp here
        # llama.cpp's own log: the weights in one CPU buffer the size of the file's tensors, a KV cache, and
        # where the check's time went.
        weights_mb = found["buffers_mb"]["CPU_Mapped"] * 2**20 / 1e6
        assert 0.7 * found["size_mb"] < weights_mb <= found["size_mb"] and found["buffers_mb"]["CPU"] > 0
        assert set(found["seconds"]) == {"load", "logits", "logits_sent", "continuations", "tokenizer_and_chat"}
        assert 0 <= found["seconds"]["logits_sent"] <= found["seconds"]["logits"]
    assert f16["token_agreement"] == 1.0  # greedy continuations of base + adapter, token for token
    assert q4["size_mb"] < q8["size_mb"] < f16["size_mb"]
    # The k-quant file is llama.cpp's own: its quantizer wrote the file type and its metadata.
    reader = gguf.GGUFReader(run["export"] / "gguf/model-q4_k_m.gguf")
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert "general.quantization_version" in reader.fields
    modelfile = (run["export"] / "gguf/model-q4_k_m.Modelfile").read_text()
    assert "FROM ./model-q4_k_m.gguf\n" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_writing_beside_the_references_writes_the_same_files_and_nothing_when_a_gate_fails(run, tmp_path,
                                                                                            monkeypatch):
    """The GPU's order (safetensors, f16, q8_0 and q4_k_m written while the references are computed), forced
    on the CPU."""
    import yaml

    from qlorapipe import memory

    monkeypatch.setattr(memory, "write_beside_compute", lambda device: True)
    params = yaml.safe_load(run["params"].read_text())
    params["export"]["formats"] = ["safetensors", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    m = run["metrics"]

    def export_to(out: Path, params_file: Path) -> None:
        load_stage("export").main(["--params", str(params_file), "--merged", str(run["merged"]),
                                   "--base", str(run["base"]), "--adapter", str(run["adapter"]),
                                   "--data", str(run["prepared"]), "--out", str(out),
                                   "--metrics", str(out.with_suffix(".json")), "--card", str(m / "card.json")])

    export_to(tmp_path / "early", write_params(tmp_path / "params.yaml", params))
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"):
        assert (tmp_path / "early/gguf" / name).read_bytes() == (run["export"] / "gguf" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "early").glob("*.safetensors")) == ["model.safetensors"]
    assert (tmp_path / "early/model.safetensors").read_bytes() == (run["export"] / "model.safetensors").read_bytes()
    early = json.loads((tmp_path / "early.json").read_text())
    before = json.loads((m / "export.json").read_text())
    for key in ("gguf_f16", "gguf_q8_0", "gguf_q4_k_m"):
        assert early[key]["perplexity_change"] == before[key]["perplexity_change"]

    # The f16 file fails its gate with the other files made, or being made, beside it: the stage waits for
    # them, then leaves nothing behind. (A gate no figure passes: a tight bound is not enough, as on some CPUs
    # the f16 file's perplexity change on this tiny model rounds to 0.)
    from qlorapipe import export as export_step

    checked = export_step.gate

    def f16_refused(params, file_format, found):
        checked(params, file_format, found)
        if file_format == "gguf-f16":
            raise UserError("gguf-f16 in llama.cpp drifts from the trained model: refused by the test")

    monkeypatch.setattr(export_step, "gate", f16_refused)
    with pytest.raises(UserError, match="gguf-f16"):
        export_to(tmp_path / "failed", write_params(tmp_path / "strict.yaml", params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early", "early.json", "params.yaml", "strict.yaml"]


def test_the_f16_gguf_also_reads_back_in_transformers(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe.export.gguf import load_gguf

    merged = AutoModelForCausalLM.from_pretrained(run["export"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run["export"])
    gguf_model, gguf_tokenizer = load_gguf(run["export"] / "gguf/model-f16.gguf", dtype=torch.float32)
    text = "The with statement is used to wrap 42 blocks!"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (gguf_tokenizer.bos_token, gguf_tokenizer.eos_token, gguf_tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(gguf_model(ids).logits, merged(ids).logits, atol=2e-3)


def _export_argv(run, params: Path, out: Path, metrics: Path) -> list[str]:
    m = run["metrics"]
    return ["--params", str(params), "--merged", str(run["merged"]), "--base", str(run["base"]),
            "--adapter", str(run["adapter"]), "--data", str(run["prepared"]), "--out", str(out),
            "--metrics", str(metrics), "--card", str(m / "card.json")]


def test_a_gguf_that_llama_cpp_runs_differently_fails_the_export_and_writes_nothing(run, tmp_path, monkeypatch):
    """A GGUF file of the base weights, the adapter lost on the way (the complaint "the GGUF answers
    like the base model"): llama.cpp's perplexity on held-out rows gives it away."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from qlorapipe.export import gguf

    params = yaml.safe_load(run["params"].read_text())
    params["export"]["formats"] = ["gguf-q8_0"]
    path = write_params(tmp_path / "params.yaml", params)
    write = gguf.write_gguf
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    monkeypatch.setattr(gguf, "write_gguf", lambda model, *args: write(base, *args))
    with pytest.raises(UserError, match=r"^gguf-q8_0 in llama.cpp drifts from the trained model: perplexity change "
                                        r"\+0\.\d{4} > export.max_perplexity_change.gguf-q8_0 0.02.* \(to export it "
                                        r"anyway, relax the gate named; or leave gguf-q8_0 out of export.formats\)$"):
        load_stage("export").main(_export_argv(run, path, tmp_path / "export", tmp_path / "export.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_export_onnx_models_run_in_onnx_runtime_as_the_trained_model_does(run, tmp_path):
    import yaml

    params = yaml.safe_load(run["params"].read_text())
    params["export"]["formats"] = ["onnx-fp32", "onnx-int4"]
    path = write_params(tmp_path / "params.yaml", params)
    load_stage("export").main(_export_argv(run, path, tmp_path / "export", tmp_path / "export.json"))
    for precision in ("fp32", "int4"):  # folders ONNX Runtime GenAI loads as they are
        assert _files(tmp_path / "export" / "onnx" / precision) == [
            "genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert set(metrics["seconds"]) == {"load", "reference_logits", "reference_continuations", "build_onnx_fp32",
                                       "check_onnx_fp32", "build_onnx_int4", "check_onnx_int4"}
    fp32, int4 = metrics["onnx_fp32"], metrics["onnx_int4"]
    # The fp32 model computes the merged model's float32 logits up to summation order; int4 rounds the weights.
    assert fp32["max_logit_diff"] < 1e-4 < int4["max_logit_diff"] < 0.5
    assert abs(int4["perplexity_change"]) < 0.05
    assert int4["size_mb"] < fp32["size_mb"] / 3
    for found in (fp32, int4):
        assert found["tokenizer_matches"] and found["chat_template_matches"] is None  # no chat template here
        assert found["stop_mismatches"] == 0
    assert fp32["token_agreement"] == 1.0  # ONNX Runtime GenAI's greedy tokens are base + adapter's

    # qlorapipe-chat --model models/export/onnx/fp32: ONNX Runtime GenAI answers as the merged model does.
    import io

    import torch

    from qlorapipe.inference import SamplingSettings, load_standalone

    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    onnx = load_standalone(tmp_path / "export" / "onnx" / "fp32", torch.device("cpu"))
    out = io.StringIO()
    from qlorapipe.cli.chat import text_streamer

    answer = onnx.answer("The with statement", greedy, streamer=text_streamer(onnx.tokenizer, out))
    assert answer == load_standalone(run["merged"], torch.device("cpu")).answer("The with statement", greedy)
    assert out.getvalue().strip() == answer.strip()  # streamed as it was generated
    with pytest.raises(UserError, match="an ONNX model has its adapter merged in"):
        onnx.use("chat")


def test_an_onnx_model_of_the_base_fails_the_export_and_writes_nothing(run, tmp_path, monkeypatch):
    """An ONNX model built from the base, the adapter lost on the way: ONNX Runtime's perplexity gives it away."""
    import yaml

    from qlorapipe.export import onnxgenai

    params = yaml.safe_load(run["params"].read_text())
    params["export"]["formats"] = ["safetensors", "onnx-fp32"]
    path = write_params(tmp_path / "params.yaml", params)
    build = onnxgenai.build
    monkeypatch.setattr(onnxgenai, "build", lambda merged, *args: build(run["base"], *args))
    with pytest.raises(UserError, match=r"^onnx-fp32 in ONNX Runtime drifts from the trained model: perplexity "
                                        r"change \+0\.\d{4} > export.max_perplexity_change.onnx-fp32 0.01"):
        load_stage("export").main(_export_argv(run, path, tmp_path / "export", tmp_path / "export.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_export_adapter_alone_loads_with_peft_and_names_its_base(run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run["export"] / "adapter"
    record = json.loads((adapter / "training_params.json").read_text())
    assert record == json.loads((run["adapter"] / "training_params.json").read_text())
    card = (adapter / "README.md").read_text()
    assert f"revision `{record['base_model']['revision']}`" in card and "prompt template: plain text" in card
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32),
                                          run["adapter"])
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, reference(ids).logits)
        with model.disable_adapter():
            assert (logits - model(ids).logits).abs().max() > 1e-3  # the adapter is really there


def _merge_argv(run, params: Path, out: Path, metrics: Path) -> list[str]:
    return ["--params", str(params), "--base", str(run["base"]), "--adapter", str(run["adapter"]),
            "--data", str(run["prepared"]), "--out", str(out), "--metrics", str(metrics)]


def test_merge_gate_fires_on_a_broken_merge_and_writes_nothing(run, tmp_path, monkeypatch):
    """Merging into the original 16-bit base (the usual mistake) is caught; the right merge passes. The GPU's
    order (the merged model written while the reference logits are computed), forced on the CPU, writes the
    same files and, on a failed gate, nothing."""
    import yaml

    from qlorapipe import memory
    from qlorapipe.merge import merging

    params = yaml.safe_load(run["params"].read_text())
    params["merge"].update(max_logit_diff=0.02, max_mean_logit_diff=0.003, speed_new_tokens=0,
                           requantized_candidate=False, naive_comparison=False)
    strict = write_params(tmp_path / "params.yaml", params)
    load_stage("merge").main(_merge_argv(run, strict, tmp_path / "good", tmp_path / "good.json"))
    good = json.loads((tmp_path / "good.json").read_text())
    assert good["merged"]["max_logit_diff"] < 0.02
    # The diagnostics switched off leave no figures and take no time.
    assert not {"naive_merge_into_16bit_base", "speed", "merged_requantized_4bit"} & set(good)
    assert set(good["seconds"]) == {"load", "merge", "save", "reference", "reload_and_compare"}

    monkeypatch.setattr(memory, "write_beside_compute", lambda device: True)
    load_stage("merge").main(_merge_argv(run, strict, tmp_path / "beside", tmp_path / "beside.json"))
    beside = json.loads((tmp_path / "beside.json").read_text())
    assert beside["merged"] == good["merged"]
    assert _files(tmp_path / "beside") == _files(tmp_path / "good")
    for path in (tmp_path / "good").iterdir():
        assert (tmp_path / "beside" / path.name).read_bytes() == path.read_bytes(), path.name

    # A test-only hook: the stage's merge replaced by the naive one.
    stage_merge = merging.merged_model
    monkeypatch.setattr(merging, "merged_model", lambda with_adapter, base, dtype, from_quantized=True, **kwargs:
                        stage_merge(with_adapter, base, dtype, from_quantized=False, **kwargs))
    with pytest.raises(UserError, match=r"the merged model does not compute what was trained: max logit difference "
                                        r"0\.0\d+ > merge\.max_logit_diff 0\.02; mean logit difference "
                                        r"0\.00\d+ > merge\.max_mean_logit_diff 0\.003"):
        load_stage("merge").main(_merge_argv(run, strict, tmp_path / "broken", tmp_path / "broken.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside", "beside.json", "good", "good.json", "params.yaml"]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_data_is_packed_identically_twice_and_trains(tmp_path, tiny_llama_dir, corpus_file):
    from conftest import CORPUS

    lines = [line for line in CORPUS.splitlines() if line.strip()]
    chat = tmp_path / "chat.jsonl"
    with open(chat, "w") as handle:
        for i, line in enumerate(lines * 3):
            question, answer = line.split(" ", 3)[:3], line.split(" ", 3)[3]
            messages = [{"from": "human", "value": f"{' '.join(question)} ({i})?"}, {"from": "gpt", "value": answer}]
            handle.write(json.dumps({"conversations": messages}) + "\n")
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, chat, **{
        "data.format": "chat", "data.messages_column": "conversations", "data.chat_template": CHAT_TEMPLATE,
        "data.max_length": 256, "training.max_steps": 2, "training.eval_every_steps": 2}))
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "base")])
    digests = []
    for run_dir in ("a", "b"):
        out = tmp_path / run_dir
        load_stage("prepare").main(["--params", str(params), "--base", str(tmp_path / "base"), "--out",
                                    str(out / "prepared"), "--report", str(out / "data.json"), "--lengths",
                                    str(out / "lengths.csv"), "--lengths-plot", str(out / "lengths.png")])
        digests.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert digests[0] == digests[1]  # byte-identical data, report and plots
    report = json.loads((tmp_path / "a" / "data.json").read_text())
    assert report["format"] == "chat" and report["records"] == 30 and report["duplicates"] == 0
    assert report["train"]["examples"] + report["eval"]["examples"] == 30 and report["truncated"] == 0
    # Packing: far fewer rows than examples, every row exactly max_length long.
    assert report["train"]["rows"] < report["train"]["examples"] / 2
    import datasets

    train = datasets.load_from_disk(str(tmp_path / "a" / "prepared" / "train"))
    assert {len(row) for row in train["input_ids"]} == {256}
    restarts = sum(1 for row in train["position_ids"] for i, p in enumerate(row) if p == 0)
    assert restarts == report["train"]["examples"]
    load_stage("train").main(train_args(params, tmp_path / "base", tmp_path / "a" / "prepared", tmp_path))
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["eval_loss"])

    # The template trained with travels with the model: the merged tokenizer (so every export) and the chat tool
    # prompt in it, though the base's tokenizer has none.
    import torch
    from transformers import AutoTokenizer

    from qlorapipe import inference

    assert AutoTokenizer.from_pretrained(tmp_path / "base").chat_template is None
    load_stage("merge").main(["--params", str(params), "--base", str(tmp_path / "base"), "--adapter",
                              str(tmp_path / "adapter"), "--data", str(tmp_path / "a" / "prepared"), "--out",
                              str(tmp_path / "merged"), "--metrics", str(tmp_path / "merge.json")])
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHAT_TEMPLATE
    loaded = inference.load_with_adapters(tmp_path / "base", {"chat": tmp_path / "adapter"}, torch.device("cpu"))
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert inference.encode_prompt(loaded.tokenizer, "Hi", True)["input_ids"][0].tolist() == loaded.tokenizer(
        "<|user|>Hi</s><|assistant|>", add_special_tokens=False)["input_ids"]


def test_the_card_quotes_figures_a_rerun_reproduces_and_names_a_missing_input(run, tmp_path):
    m = run["metrics"]
    facts = json.loads((m / "card.json").read_text())
    assert set(facts) == {"data", "train", "eval", "merge"}
    text = json.dumps(facts)
    for volatile in ("seconds", "memory", "tokens_per_second", "environment", "device"):
        assert volatile not in text  # what changes on every run stays out, so an unchanged card re-exports nothing
    train = json.loads((m / "train.json").read_text())
    assert facts["train"]["train_loss"] == train["train_loss"] and facts["eval"]["finetuned"]["perplexity"] > 0
    card = (run["export"] / "README.md").read_text()
    assert str(facts["merge"]["max_logit_diff"]) in card and '"train_loss"' in card
    with pytest.raises(UserError, match=f"^{tmp_path / 'train.json'} not found; run `dvc repro` to produce it$"):
        load_stage("card").main(["--data-report", str(m / "data.json"), "--train-metrics", str(tmp_path / "train.json"),
                                 "--eval-metrics", str(m / "eval.json"), "--merge-metrics", str(m / "merge.json"),
                                 "--out", str(tmp_path / "card.json")])
    assert not (tmp_path / "card.json").exists()

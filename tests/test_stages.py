"""Each stage's main() run in a temp directory on a tiny model: the exact files it writes and its metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_stage, tiny_params, write_params
from qlorapipe.errors import UserError


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, corpus_file):
    """Run the six stages in order; each test below inspects one stage's outputs."""
    work = tmp_path_factory.mktemp("pipeline")
    params = write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file))
    p = {name: work / rel for name, rel in {
        "base": "models/base", "prepared": "data/prepared", "adapter": "models/adapter",
        "merged": "models/merged", "export": "models/export", "metrics": "metrics",
    }.items()}
    common = ["--params", str(params)]
    m = p["metrics"]
    load_stage("download").main(common + ["--out", str(p["base"])])
    load_stage("prepare").main(common + ["--base", str(p["base"]), "--out", str(p["prepared"]),
                                         "--report", str(m / "data.json")])
    load_stage("train").main(common + ["--base", str(p["base"]), "--data", str(p["prepared"]),
                                       "--adapter", str(p["adapter"]), "--metrics", str(m / "train.json"),
                                       "--history", str(m / "train_history.csv"),
                                       "--curves", str(m / "training_curves.png"),
                                       "--log", str(m / "training_log.txt")])
    load_stage("evaluate").main(common + ["--base", str(p["base"]), "--adapter", str(p["adapter"]),
                                          "--data", str(p["prepared"]), "--metrics", str(m / "eval.json"),
                                          "--samples", str(m / "samples.json")])
    load_stage("merge").main(common + ["--base", str(p["base"]), "--adapter", str(p["adapter"]),
                                       "--data", str(p["prepared"]), "--out", str(p["merged"]),
                                       "--metrics", str(m / "merge.json")])
    load_stage("export").main(common + ["--merged", str(p["merged"]), "--out", str(p["export"]),
                                        "--data-report", str(m / "data.json"),
                                        "--train-metrics", str(m / "train.json"),
                                        "--eval-metrics", str(m / "eval.json"),
                                        "--merge-metrics", str(m / "merge.json")])
    return p


def test_download_writes_a_plain_model_directory(run):
    assert _files(run["base"]) == ["config.json", "generation_config.json", "model.safetensors", "source.json",
                                   "tokenizer.json", "tokenizer_config.json"]
    source = json.loads((run["base"] / "source.json").read_text())
    assert source["source"] == "local" and source["model_type"] == "llama"
    assert len(source["content_sha256"]) == 64


def test_prepare_writes_train_and_eval_arrow_datasets_and_a_report(run):
    import datasets

    assert _files(run["prepared"]) == [f"{split}/{f}" for split in ("eval", "train")
                                       for f in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")]
    report = json.loads((run["metrics"] / "data.json").read_text())
    assert set(report) == {"documents_empty_skipped", "max_length", "train", "eval"}
    assert report["train"]["documents"] + report["eval"]["documents"] == 60
    for split in ("train", "eval"):
        stats = report[split]
        assert set(stats) == {"documents", "tokens", "chunks", "tokens_dropped"}
        assert stats["chunks"] * 32 + stats["tokens_dropped"] == stats["tokens"]
        dataset = datasets.load_from_disk(str(run["prepared"] / split))
        assert len(dataset) == stats["chunks"]
        assert dataset[0]["input_ids"] == dataset[0]["labels"]


def test_train_writes_a_peft_adapter_metrics_curves_and_log(run):
    assert _files(run["adapter"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                      "training_params.json"]
    metrics = json.loads((run["metrics"] / "train.json").read_text())
    assert set(metrics) == {"train_loss", "eval_loss", "steps", "tokens_trained", "tokens_per_second",
                            "train_seconds", "wall_seconds", "trainable_params", "total_params", "compute_dtype",
                            "device", "peak_rss_gb", "num_processes", "global_batch_size"}
    assert metrics["steps"] == 12 and metrics["tokens_trained"] == 12 * 4 * 32
    assert metrics["num_processes"] == 1 and metrics["global_batch_size"] == 4
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
    assert set(record) == {"base_model", "quantization", "lora", "training"}
    assert record["lora"]["rank"] == 8


def test_training_lowers_the_loss(run):
    history = [line.split(",") for line in (run["metrics"] / "train_history.csv").read_text().splitlines()[1:]]
    assert float(history[-1][2]) < float(history[0][2])


def test_evaluate_reports_base_and_finetuned_perplexity(run):
    metrics = json.loads((run["metrics"] / "eval.json").read_text())
    assert set(metrics) == {"base", "finetuned", "eval_tokens", "perplexity_reduction"}
    for name in ("base", "finetuned"):
        assert math.isclose(metrics[name]["perplexity"], math.exp(metrics[name]["loss"]), rel_tol=1e-3)
    assert metrics["finetuned"]["perplexity"] < metrics["base"]["perplexity"]
    samples = json.loads((run["metrics"] / "samples.json").read_text())
    assert samples["prompts"] == ["Python is", "The with statement"]
    assert len(samples["base"]) == len(samples["finetuned"]) == 2


def test_merge_writes_a_standalone_model_that_computes_what_was_trained(run):
    from transformers import AutoModelForCausalLM

    assert _files(run["merged"]) == ["config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json", "training_params.json"]
    metrics = json.loads((run["metrics"] / "merge.json").read_text())
    assert set(metrics) == {"merged", "naive_merge_into_16bit_base", "reference_perplexity", "dtype", "eval_tokens"}
    assert metrics["merged"]["max_logit_diff"] < 1e-2
    assert metrics["naive_merge_into_16bit_base"]["max_logit_diff"] > metrics["merged"]["max_logit_diff"]
    model = AutoModelForCausalLM.from_pretrained(run["merged"])
    assert "quantization_config" not in model.config.to_dict()


def test_export_writes_model_tokenizer_and_card(run):
    assert _files(run["export"]) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json", "tokenizer_config.json", "training_params.json"]
    card = (run["export"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: model\n")
    for needle in ("## Base model", "## Data", "## Results", "fine-tuned", '"rank": 8'):
        assert needle in card


def test_a_failing_stage_leaves_no_output_behind(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "data.max_length": 100000}))
    (tmp_path / "models").mkdir()
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "models/base")])
    with pytest.raises(UserError, match="fewer than data.max_length=100000: lower data.max_length"):
        load_stage("prepare").main(["--params", str(params), "--base", str(tmp_path / "models/base"),
                                    "--out", str(tmp_path / "data/prepared"), "--report", str(tmp_path / "r.json")])
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "r.json").exists()


def test_bad_params_stop_before_any_weights_load(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "training.optimizer": "adam"}))
    with pytest.raises(UserError, match="training.optimizer: must be one of"):
        load_stage("train").main(["--params", str(params), "--base", "nowhere", "--data", "nowhere",
                                  "--adapter", str(tmp_path / "a"), "--metrics", str(tmp_path / "m.json"),
                                  "--history", str(tmp_path / "h.csv"), "--curves", str(tmp_path / "c.png"),
                                  "--log", str(tmp_path / "l.txt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

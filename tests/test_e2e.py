"""The whole pipeline through DVC: `dvc repro`, a no-op second repro, `dvc exp run -S`, `dvc metrics diff`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import init_project, run_cmd, tiny_params

DVC = [sys.executable, "-m", "dvc"]


def _sh(cmd: list[str], cwd: Path) -> str:
    result = run_cmd(cmd, cwd)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    """A fresh git + DVC project of this pipeline, configured for a tiny model."""
    work = tmp_path_factory.mktemp("e2e") / "project"
    return init_project(work, tiny_params(tiny_llama_dir, corpus_file, **{"training.checkpoint_every_steps": 6}))


def test_repro_then_noop_then_experiment_and_metrics_diff(project):
    out = _sh(DVC + ["repro"], project)
    for stage in ("check", "download", "compat", "prepare", "train", "evaluate", "merge", "card", "export"):
        assert f"Running stage '{stage}'" in out
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["finetuned"]["perplexity"] < evaluation["base"]["perplexity"]
    assert (project / "models/export/model.safetensors").is_file()

    again = _sh(DVC + ["repro"], project)
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in again

    _sh(["git", "add", "-A"], project)
    _sh(["git", "commit", "-qm", "baseline run"], project)

    exp = _sh(DVC + ["exp", "run", "-S", "lora.rank=4"], project)
    assert "Running stage 'train'" in exp
    for stage in ("download", "prepare"):
        assert f"Running stage '{stage}'" not in exp
    diff = json.loads(_sh(DVC + ["metrics", "diff", "--json"], project))
    train_diff = diff["metrics/train.json"]
    old, new = train_diff["trainable_params"]["old"], train_diff["trainable_params"]["new"]
    assert new * 2 == old  # LoRA parameters scale with the rank
    params = json.loads(_sh(DVC + ["params", "diff", "--json"], project))
    assert params["params.yaml"]["lora.rank"] == {"old": 8, "new": 4, "diff": -4}

    # `dvc plots diff` as an offline picture: both runs' curves in one PNG, where git does not see it.
    _sh([sys.executable, "-m", "qlorapipe.plot_diff", "HEAD", "workspace"], project)
    assert (project / "dvc_plots/plots_diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots_diff" not in _sh(["git", "status", "--short", "--untracked-files=all"], project)


def test_a_queued_sweep_runs_every_experiment(project):
    _sh(DVC + ["exp", "run", "--queue", "-S", "lora.rank=2,6"], project)
    _sh(DVC + ["queue", "start", "-j", "1"], project)
    deadline = time.monotonic() + 900
    status = _sh(DVC + ["queue", "status"], project)
    while ("Queued" in status or "Running" in status) and time.monotonic() < deadline:
        time.sleep(5)
        status = _sh(DVC + ["queue", "status"], project)
    assert status.count("Success") == 2, status
    shown = json.loads(_sh(DVC + ["exp", "show", "--json"], project))
    ranks = set()
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment.get("revs", []):
                params = revision.get("data", {}).get("params", {}).get("params.yaml", {}).get("data", {})
                ranks.add(params.get("lora", {}).get("rank"))
    assert {2, 6} <= ranks


def test_editing_evaluation_code_does_not_retrain(project):
    status = json.loads(_sh(DVC + ["status", "--json"], project))
    assert status == {}
    with open(project / "src/qlorapipe/evaluate/generation.py", "a") as handle:
        handle.write("\n# an edit\n")
    status = json.loads(_sh(DVC + ["status", "--json"], project))
    assert set(status) == {"evaluate"}
    exported = (project / "models/export/README.md").read_bytes()
    out = _sh(DVC + ["repro"], project)
    assert "Running stage 'evaluate'" in out and "Running stage 'card'" in out
    # Evaluate's figures came out the same (only its seconds moved), so what the model card quotes did not
    # change, and export, the longest stage after training, did not run again.
    assert "Running stage 'export'" not in out
    assert (project / "models/export/README.md").read_bytes() == exported


def test_train_rerun_by_dvc_resumes_from_the_persisted_checkpoint(project):
    # Without `persist: true` DVC would delete models/checkpoints before re-running train.
    shutil.rmtree(project / "models/adapter")
    out = _sh(DVC + ["repro"], project)
    assert "Running stage 'train'" in out and "Resuming from models/checkpoints/step-000012" in out
    assert json.loads((project / "metrics/train.json").read_text())["resumed_from_step"] == 12
    # The resumed adapter has the same bytes, so nothing downstream of it re-runs.
    assert "Running stage 'merge'" not in out


def test_adapter_versions_come_back_from_git_tags_and_experiments(project):
    """The README's commands for switching adapter versions, on the baseline (rank 8) and an experiment (rank 4)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]

    def rank() -> int:
        return json.loads((project / "models/adapter/adapter_config.json").read_text())["r"]

    _sh(git + ["tag", "adapter-v1"], project)  # the committed baseline run
    _sh(DVC + ["exp", "run", "-S", "lora.rank=4", "-n", "rank4"], project)
    assert rank() == 4
    _sh(["git", "checkout", "adapter-v1", "--", "dvc.lock"], project)
    _sh(DVC + ["checkout", "models/adapter"], project)
    assert rank() == 8
    _sh(DVC + ["exp", "apply", "rank4"], project)
    assert rank() == 4
    _sh(["git", "checkout", "HEAD", "--", "dvc.lock", "params.yaml"], project)
    _sh(DVC + ["checkout", "models/adapter"], project)
    assert rank() == 8


def test_a_failure_costs_nothing_the_last_good_run_stays_or_comes_back(project):
    """A rejected param touches no output; a stage that fails midway is undone by `dvc checkout`."""
    _sh(DVC + ["repro"], project)
    params_file = project / "params.yaml"
    good = params_file.read_text()
    kept = ("metrics/train.json", "metrics/train_history.csv", "metrics/training_curves.png",
            "metrics/training_log.txt", "metrics/eval.json", "models/adapter/adapter_model.safetensors")
    before = {rel: (project / rel).read_bytes() for rel in kept}

    def changed(section: str, key: str, value) -> str:
        import yaml

        params = yaml.safe_load(good)
        params[section][key] = value
        return yaml.safe_dump(params, sort_keys=False)

    def learning_rate(value) -> str:
        return changed("training", "learning_rate", value)

    # A key params.yaml does not have: DVC itself refuses the override, before any stage.
    result = run_cmd(DVC + ["exp", "run", "-S", "lora.rnak=4"], project, check=False)
    assert result.returncode != 0 and "Could not override 'lora.rnak'" in result.stdout + result.stderr
    assert "Running stage" not in result.stdout and params_file.read_text() == good

    # A misspelt section changes no param a stage reads: the check stage depends on the whole file and refuses it.
    params_file.write_text(good + "modle:\n  repo_id: Qwen/Qwen2.5-3B-Instruct\n")
    result = run_cmd(DVC + ["repro"], project, check=False)
    assert result.returncode == 255
    assert "params.yaml: section 'modle' is unknown (did you mean 'model'?)" in result.stdout + result.stderr
    assert "Running stage 'download'" not in result.stdout

    params_file.write_text(learning_rate(-1))
    result = run_cmd(DVC + ["repro"], project, check=False)
    assert result.returncode == 255  # DVC's own status for a failed stage (the stage exits with 1)
    assert "training.learning_rate must be positive, got -1.0" in result.stdout + result.stderr
    assert "Running stage 'train'" not in result.stdout
    assert {rel: (project / rel).read_bytes() for rel in kept} == before  # nothing was deleted or rewritten

    # A local input that is not there: refused by the first stage, before DVC deletes download's output.
    params_file.write_text(changed("model", "local_path", str(project / "no-such-model")))
    result = run_cmd(DVC + ["repro"], project, check=False)
    assert result.returncode != 0
    assert f"model.local_path '{project / 'no-such-model'}' does not exist" in result.stdout + result.stderr
    assert "Running stage 'download'" not in result.stdout and (project / "models/base/config.json").is_file()
    assert {rel: (project / rel).read_bytes() for rel in kept} == before

    # Valid on its own, impossible for this model (a GPT-NeoX module name on a Llama): refused
    # against the downloaded model, before prepare or train run.
    params_file.write_text(changed("lora", "target_modules", ["query_key_value"]))
    result = run_cmd(DVC + ["repro"], project, check=False)
    assert result.returncode != 0
    assert "lora.target_modules ['query_key_value'] match no linear layer" in result.stdout + result.stderr
    assert "Running stage 'compat'" in result.stdout and "Running stage 'train'" not in result.stdout
    assert {rel: (project / rel).read_bytes() for rel in kept} == before

    # Inside a stage: DVC deletes train's outputs before running it, and the loss diverges.
    params_file.write_text(learning_rate(1e30))
    result = run_cmd(DVC + ["repro"], project, check=False)
    assert result.returncode != 0 and "the training loss became" in result.stdout + result.stderr
    assert not (project / "metrics/train.json").exists()
    params_file.write_text(good)
    _sh(DVC + ["checkout"], project)  # every output is cached, metrics and plots included
    assert {rel: (project / rel).read_bytes() for rel in kept} == before
    again = _sh(DVC + ["repro"], project)  # only the checks re-run, to record the params put back
    assert "Running stage 'check'" in again and "Running stage 'train'" not in again
    assert json.loads(_sh(DVC + ["status", "--json"], project)) == {}
    assert not list(project.rglob(".*.tmp-*"))

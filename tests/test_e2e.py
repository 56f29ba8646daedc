"""The whole pipeline through DVC: `dvc repro`, a no-op second repro, `dvc exp run -S`, `dvc metrics diff`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_params, write_params

DVC = [sys.executable, "-m", "dvc"]


def _sh(cmd: list[str], cwd: Path) -> str:
    # Stage commands say `python`: the interpreter running the tests must be the one found first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    """A fresh git + DVC clone of the project, configured for a tiny model."""
    work = tmp_path_factory.mktemp("e2e") / "project"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for rel in tracked + ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]:
        if (ROOT / rel).is_file() and rel.startswith((".dvc", "dvc.", "params.", "stages/", "src/", ".dvcignore")):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
    (work / "dvc.lock").unlink(missing_ok=True)
    for rel in ("metrics",):
        shutil.rmtree(work / rel, ignore_errors=True)
    write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file))
    _sh(["git", "init", "-q"], work)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], work)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], work)
    return work


def test_repro_then_noop_then_experiment_and_metrics_diff(project):
    out = _sh(DVC + ["repro"], project)
    for stage in ("download", "prepare", "train", "evaluate", "merge", "export"):
        assert f"Running stage '{stage}'" in out
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["finetuned"]["perplexity"] < evaluation["base"]["perplexity"]
    assert (project / "models/export/model.safetensors").is_file()

    again = _sh(DVC + ["repro"], project)
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in again

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _sh(git + ["add", "-A"], project)
    _sh(git + ["commit", "-qm", "baseline run"], project)

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


def test_editing_evaluation_code_does_not_retrain(project):
    status = json.loads(_sh(DVC + ["status", "--json"], project))
    assert status == {}
    with open(project / "src/qlorapipe/generation.py", "a") as handle:
        handle.write("\n# an edit\n")
    status = json.loads(_sh(DVC + ["status", "--json"], project))
    assert set(status) == {"evaluate"}


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

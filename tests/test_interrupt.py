"""Fault injection: `dvc repro` killed with SIGKILL inside a stage, then run again.

After each kill the next `dvc repro` must finish, leave no temporary anywhere in the workspace,
and produce the outputs of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import init_project, run_cmd, tiny_params

DVC = [sys.executable, "-m", "dvc"]
OUTPUTS = ("data/prepared", "models/adapter", "models/merged", "models/export", "metrics/data.json",
           "metrics/eval.json", "metrics/samples.json")


def _digests(project: Path) -> dict[str, str]:
    """sha256 of every output file, but the model card: it quotes the training's wall time."""
    found = {}
    for rel in OUTPUTS:
        path = project / rel
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            if file != project / "models/export/README.md":
                found[str(file.relative_to(project))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def _leftovers(project: Path) -> list[Path]:
    return [p for p in project.rglob(".*.tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir, corpus_file):
    work = tmp_path_factory.mktemp("interrupt") / "project"
    project = init_project(work, tiny_params(tiny_llama_dir, corpus_file, **{
        "training.checkpoint_every_steps": 3, "export.formats": ["safetensors", "gguf-f16", "adapter"]}))
    run_cmd(DVC + ["repro"], project)
    return project


def _env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _kill_when(project: Path, marker: str, timeout: float = 600.0) -> bool:
    """Run ``dvc repro`` and SIGKILL its whole process group once ``marker`` (a glob under the project)
    exists; returns whether the kill landed before the run finished."""
    process = subprocess.Popen(DVC + ["repro"], cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=_env())
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if any(project.glob(marker)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def _set(project: Path, key: str, value) -> None:
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# (stage, a param of it set to a value never run before, what must exist when the kill lands): the
# temporary output being written, or a checkpoint in the middle of training. A new value, so the
# next `dvc repro` really runs the stage again instead of restoring it from DVC's run cache.
KILL_POINTS = [
    ("prepare", "data.seed", 2, "data/.prepared.tmp-*/train"),
    ("train", "training.seed", 7, "models/checkpoints/step-000006"),
    ("train", "training.seed", 8, "models/.adapter.tmp-*"),
    ("merge", "merge.fidelity_batches", 1, "models/.merged.tmp-*/*.safetensors"),
    ("export", "export.verify_batches", 1, "models/.export.tmp-*/gguf/*.gguf"),
]


@pytest.mark.parametrize(("stage", "key", "value", "marker"), KILL_POINTS,
                         ids=[f"{stage}:{marker}" for stage, _, _, marker in KILL_POINTS])
def test_killed_anywhere_the_next_repro_finishes_clean_with_an_uninterrupted_runs_outputs(project, stage, key,
                                                                                         value, marker):
    _set(project, key, value)
    assert _kill_when(project, marker), f"the run finished before {marker} was seen"
    run_cmd(DVC + ["repro"], project)
    assert _leftovers(project) == []
    assert run_cmd(DVC + ["status", "--json"], project).stdout.strip() == "{}"
    after_kill = _digests(project)
    # The killed stage run again without interruption, from scratch (no checkpoint to resume, no run
    # cache): its outputs are the same bytes, so the stages after it had the same inputs too.
    shutil.rmtree(project / "models/checkpoints", ignore_errors=True)
    run_cmd(DVC + ["repro", "--force", "--no-run-cache", "--single-item", stage], project)
    assert _digests(project) == after_kill

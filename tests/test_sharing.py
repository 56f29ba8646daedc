"""Teams share cached artifacts through a real DVC remote (a local directory) and a git remote."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import init_project, run_cmd, tiny_params

DVC = [sys.executable, "-m", "dvc"]


def _digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_llama_dir, corpus_file):
    """Alice runs the pipeline, commits, pushes data to the DVC remote and git to origin."""
    root = tmp_path_factory.mktemp("team")
    origin, storage = root / "origin.git", root / "storage"
    run_cmd(["git", "init", "-q", "--bare", str(origin)], root)
    alice = init_project(root / "alice", tiny_params(tiny_llama_dir, corpus_file))
    run_cmd(DVC + ["remote", "add", "-d", "storage", str(storage)], alice)
    run_cmd(DVC + ["remote", "modify", "storage", "verify", "true"], alice)
    run_cmd(DVC + ["repro"], alice)
    run_cmd(["git", "add", "-A"], alice)
    run_cmd(["git", "commit", "-qm", "baseline"], alice)
    run_cmd(["git", "remote", "add", "origin", str(origin)], alice)
    run_cmd(["git", "push", "-q", "origin", "HEAD:main"], alice)
    run_cmd(DVC + ["push"], alice)
    return {"root": root, "origin": origin, "storage": storage, "alice": alice}


def _clone(team, name: str, storage: Path | None = None) -> Path:
    path = team["root"] / name
    run_cmd(["git", "clone", "-q", "-b", "main", str(team["origin"]), str(path)], team["root"])
    if storage is not None:
        run_cmd(DVC + ["remote", "modify", "--local", "storage", "url", str(storage)], path)
    return path


def test_a_fresh_clone_pulls_everything_and_recomputes_nothing(team):
    bob = _clone(team, "bob")
    run_cmd(DVC + ["pull"], bob)
    for rel in ("models/adapter", "models/export", "metrics/eval.json", "metrics/training_curves.png"):
        assert _digest(bob / rel) == _digest(team["alice"] / rel), rel
    out = run_cmd(DVC + ["repro"], bob).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out


def test_pulling_the_train_stage_fetches_the_adapter_without_the_base(team):
    carol = _clone(team, "carol")
    run_cmd(DVC + ["pull", "train"], carol)
    # the adapter and the resumable checkpoint, not the base
    assert sorted(p.name for p in (carol / "models").iterdir() if not p.name.startswith(".")) == ["adapter", "checkpoints"]
    assert _digest(carol / "models/adapter") == _digest(team["alice"] / "models/adapter")


def _adapter_object(storage: Path, alice: Path) -> Path:
    """The remote object holding alice's adapter_model.safetensors."""
    md5 = hashlib.md5((alice / "models/adapter/adapter_model.safetensors").read_bytes()).hexdigest()
    return storage / "files" / "md5" / md5[:2] / md5[2:]


def test_a_corrupted_remote_object_fails_the_pull_instead_of_checking_out_a_wrong_file(team):
    import shutil

    bad = team["root"] / "storage-corrupted"
    shutil.copytree(team["storage"], bad)
    obj = _adapter_object(bad, team["alice"])
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[200] ^= 0xFF
    obj.write_bytes(bytes(data))
    dave = _clone(team, "dave", storage=bad)
    result = run_cmd(DVC + ["pull", "train"], dave, check=False)
    assert result.returncode != 0
    assert "models/adapter" in result.stderr
    assert not (dave / "models/adapter/adapter_model.safetensors").exists()


def test_a_missing_remote_object_fails_the_pull(team):
    import shutil

    partial = team["root"] / "storage-partial"
    shutil.copytree(team["storage"], partial)
    _adapter_object(partial, team["alice"]).unlink()
    erin = _clone(team, "erin", storage=partial)
    result = run_cmd(DVC + ["pull", "train"], erin, check=False)
    assert result.returncode != 0
    assert "failed to pull data from the cloud" in result.stderr
    assert not (erin / "models/adapter/adapter_model.safetensors").exists()


def test_changing_only_downstream_params_reruns_only_downstream_stages(team):
    frank = _clone(team, "frank")
    run_cmd(DVC + ["pull"], frank)
    params_file = frank / "params.yaml"
    original = params_file.read_text()
    # check reads every section and compat those the model constrains: they run first, and re-run
    # nothing downstream when they pass.
    expectations = {
        "evaluate.max_new_tokens=3": {"check", "compat", "evaluate"},
        "merge.fidelity_batches=1": {"check", "merge"},
        "export.max_shard_size=1GB": {"check", "compat", "export"},
        "lora.rank=4": {"check", "compat", "train"},  # status lists the stages whose own inputs changed
    }
    import yaml

    for change, stages in expectations.items():
        key, value = change.split("=")
        section, name = key.split(".")
        params = yaml.safe_load(original)
        params[section][name] = yaml.safe_load(value)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(run_cmd(DVC + ["status", "--json"], frank).stdout)
        assert set(status) == stages, change
    params_file.write_text(original)


def test_experiments_travel_through_git_and_the_dvc_remote(team):
    alice = team["alice"]
    run_cmd(DVC + ["exp", "run", "-n", "rank4", "-S", "lora.rank=4"], alice)
    run_cmd(DVC + ["exp", "push", "origin", "rank4"], alice)
    expected = _digest(alice / "models/adapter")
    grace = _clone(team, "grace")
    run_cmd(DVC + ["exp", "pull", "origin", "rank4"], grace)
    run_cmd(DVC + ["exp", "apply", "rank4"], grace)
    run_cmd(DVC + ["pull"], grace)
    assert json.loads((grace / "models/adapter/adapter_config.json").read_text())["r"] == 4
    assert _digest(grace / "models/adapter") == expected
    out = run_cmd(DVC + ["repro"], grace).stdout
    assert "Running stage" not in out


def test_an_experiment_made_before_the_remote_was_committed_is_shared_as_the_docs_say(team, tiny_llama_dir,
                                                                                      corpus_file):
    """docs/experiments.md: apply it, put the committed remote back, push its data, commit it on a branch;
    a teammate checks the branch out and pulls the experiment's adapter without computing anything."""
    root = team["root"]
    origin, storage = root / "heidi-origin.git", root / "heidi-storage"
    run_cmd(["git", "init", "-q", "--bare", str(origin)], root)
    heidi = init_project(root / "heidi", tiny_params(tiny_llama_dir, corpus_file))
    run_cmd(DVC + ["repro"], heidi)
    run_cmd(["git", "add", "-A"], heidi)
    run_cmd(["git", "commit", "-qm", "baseline"], heidi)
    run_cmd(DVC + ["exp", "run", "-n", "rank4", "-S", "lora.rank=4"], heidi)
    run_cmd(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"], heidi)  # the workspace back at the baseline
    run_cmd(DVC + ["remote", "add", "-d", "storage", str(storage)], heidi)
    run_cmd(["git", "add", ".dvc/config"], heidi)
    run_cmd(["git", "commit", "-qm", "the team's remote"], heidi)
    run_cmd(DVC + ["exp", "apply", "rank4"], heidi)
    pushed = run_cmd(DVC + ["push"], heidi, check=False)  # the experiment's own .dvc/config names no remote
    assert pushed.returncode != 0 and "no remote specified" in pushed.stderr + pushed.stdout
    run_cmd(["git", "checkout", "HEAD", "--", ".dvc/config"], heidi)
    run_cmd(DVC + ["push"], heidi)
    run_cmd(["git", "checkout", "-q", "-b", "rank4"], heidi)
    run_cmd(["git", "add", "params.yaml", "dvc.lock"], heidi)
    run_cmd(["git", "commit", "-qm", "rank4"], heidi)
    run_cmd(["git", "remote", "add", "origin", str(origin)], heidi)
    run_cmd(["git", "push", "-q", "origin", "rank4"], heidi)
    ivan = root / "ivan"
    run_cmd(["git", "clone", "-q", "-b", "rank4", str(origin), str(ivan)], root)
    run_cmd(DVC + ["pull"], ivan)
    assert json.loads((ivan / "models/adapter/adapter_config.json").read_text())["r"] == 4
    assert _digest(ivan / "models/adapter") == _digest(heidi / "models/adapter")
    assert "Running stage" not in run_cmd(DVC + ["repro"], ivan).stdout

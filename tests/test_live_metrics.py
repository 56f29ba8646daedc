"""Live training metrics through dvclive: each step reaches the live directory (and DVC Studio) while
training runs; the declared CSV, JSON, PNG and log keep their formats; a failure leaves the last good run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_stage, tiny_params, train_args, write_params

from qlorapipe.errors import UserError
from qlorapipe.outputs import live_dir

STEPS, EVAL_EVERY = 12, 6  # tiny_params' training section
LIVE_FILES = ["metrics.json", "plots/metrics/eval/loss.tsv", "plots/metrics/train/learning_rate.tsv",
              "plots/metrics/train/loss.tsv"]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _history(run: Path) -> list[dict[str, str]]:
    header, *rows = (run / "history.csv").read_text().splitlines()
    return [dict(zip(header.split(","), row.split(","), strict=True)) for row in rows]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    work = tmp_path_factory.mktemp("live")
    params = write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file))
    load_stage("download").main(["--params", str(params), "--out", str(work / "base")])
    load_stage("prepare").main(["--params", str(params), "--base", str(work / "base"), "--out", str(work / "prepared"),
                                "--report", str(work / "data.json"), "--lengths", str(work / "lengths.csv"),
                                "--lengths-plot", str(work / "lengths.png")])
    return work


@pytest.fixture(scope="module")
def run(prepared) -> dict:
    """The train stage, with what the live directory held after each step and what DVC Studio was sent."""
    import dvclive
    import dvclive.studio

    out = prepared / "run"
    snapshots, posts = [], []
    next_step = dvclive.Live.next_step

    def next_step_and_look(live):
        next_step(live)
        snapshots.append({"live": _tree(Path(live.dir)), "declared": sorted(p.name for p in out.iterdir())})

    def post_live_metrics(event, baseline_sha, name, client, **kwargs):
        posts.append({"event": event, **kwargs})
        return True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dvclive.Live, "next_step", next_step_and_look)
        patch.setattr(dvclive.studio, "post_live_metrics", post_live_metrics)  # DVC Studio's endpoint
        patch.setenv("DVC_STUDIO_TOKEN", "test-token")
        patch.setenv("DVC_STUDIO_REPO_URL", "https://example.invalid/project.git")
        patch.delenv("DVC_STUDIO_OFFLINE", raising=False)
        patch.chdir(prepared)  # outside any DVC repository: nothing of the one under test is touched
        load_stage("train").main(train_args(prepared / "params.yaml", prepared / "base", prepared / "prepared", out))
    return {"out": out, "snapshots": snapshots, "posts": posts}


def test_each_step_reaches_the_live_directory_while_training(run):
    history = _history(run["out"])
    assert len(run["snapshots"]) == STEPS
    for step, snapshot in enumerate(run["snapshots"], start=1):
        # Published as the step is done, before any declared output exists (all are written at the end).
        assert snapshot["declared"] == ["checkpoints", "live"]
        live = json.loads(snapshot["live"]["metrics.json"])
        row = history[step - 1]
        assert live["step"] == step == int(row["step"])
        assert f"{live['train']['loss']:.6f}" == row["train_loss"]
        assert f"{live['train']['learning_rate']:.6e}" == row["learning_rate"]
        assert str(live["train"]["epoch"]) == row["epoch"]
        evaluated = [r for r in history[:step] if r["eval_loss"]]
        assert ("eval" in live) == bool(evaluated)
        if evaluated:  # the latest evaluation
            assert f"{live['eval']['loss']:.6f}" == evaluated[-1]["eval_loss"]
        assert snapshot["live"]["plots/metrics/train/loss.tsv"].splitlines()[-1].startswith(f"{step}\t")
        assert len(snapshot["live"]["plots/metrics/train/loss.tsv"].splitlines()) == 1 + step


def test_the_live_directory_holds_every_step_in_dvclive_formats(run):
    live = _tree(run["out"] / "live")
    assert sorted(live) == LIVE_FILES
    assert live == run["snapshots"][-1]["live"]
    history = _history(run["out"])
    for name, column in (("train/loss", "train_loss"), ("train/learning_rate", "learning_rate"),
                         ("eval/loss", "eval_loss")):
        header, *rows = live[f"plots/metrics/{name}.tsv"].splitlines()
        assert header == f"step\t{name.split('/')[1]}"
        expected = [(r["step"], r[column]) for r in history if r[column]]
        fmt = "{:.6e}" if column == "learning_rate" else "{:.6f}"
        assert [(step, fmt.format(float(value))) for step, value in (row.split("\t") for row in rows)] == expected
    assert [r["step"] for r in history if r["eval_loss"]] == [str(EVAL_EVERY), str(STEPS)]
    metrics = json.loads(live["metrics.json"])
    assert set(metrics) == {"step", "train", "eval"} and metrics["step"] == STEPS


def test_the_declared_outputs_keep_their_formats(run):
    out = run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "curves.png", "history.csv", "live",
                                                     "log.txt", "train.json"]
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,train_loss,eval_loss,learning_rate" and len(lines) == 1 + STEPS
    row = re.compile(r"\d+,\d+(\.\d+)?,\d+\.\d{6},(\d+\.\d{6})?,\d\.\d{6}e[-+]\d\d")
    assert all(row.fullmatch(line) for line in lines[1:]), lines
    text = (out / "train.json").read_text()
    metrics = json.loads(text)
    assert text == json.dumps(metrics, indent=2, sort_keys=True) + "\n"  # write_json's format, not dvclive's
    assert metrics["steps"] == STEPS and "step" not in metrics and "train" not in metrics
    assert metrics["eval_loss"] == round(float(_history(out)[-1]["eval_loss"]), 5)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("trainable params: ")
    step_line = re.compile(rf"step \d+/{STEPS} loss \d+\.\d{{4}} lr \d\.\d{{3}}e[-+]\d\d tokens/s \d+"
                           r"( eval_loss \d+\.\d{4})?")
    assert sum(bool(step_line.fullmatch(line)) for line in log) == STEPS


def test_dvc_studio_is_sent_each_step_when_a_token_is_set(run):
    events = [post["event"] for post in run["posts"]]
    assert events == ["start"] + ["data"] * (STEPS + 1) + ["done"]
    data = [post for post in run["posts"] if post["event"] == "data"]
    assert [post["step"] for post in data] == [*range(1, STEPS + 1), STEPS]  # and the last once more at the end
    for step, post in zip([*range(1, STEPS + 1), STEPS], data, strict=True):
        (path, sent), = post["metrics"].items()
        assert path.endswith("live/metrics.json") and sent["data"]["step"] == step
    # Each update carries only the points Studio has not had yet: together, every step once.
    points = [point for post in data for path, plot in post["plots"].items()
              if path.endswith("train/loss.tsv") for point in plot["data"]]
    assert [point["step"] for point in points] == list(range(1, STEPS + 1))


def test_a_failed_run_leaves_the_last_good_runs_live_directory(run, prepared, tiny_llama_dir, corpus_file):
    out = prepared / "diverged"
    out.mkdir()
    (out / "live").mkdir()
    good = _tree(run["out"] / "live")
    for rel, text in good.items():
        (out / "live" / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / "live" / rel).write_text(text)
    params = write_params(out / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        "training.learning_rate": 1e30, "training.max_grad_norm": 0.0}))
    with pytest.raises(UserError, match="the training loss became"):
        load_stage("train").main(train_args(params, prepared / "base", prepared / "prepared", out))
    assert _tree(out / "live") == good
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "live", "params.yaml"]


def test_live_dir_is_written_in_place_and_put_back_when_the_block_fails(tmp_path):
    path = tmp_path / "live"
    with live_dir(path) as directory:
        assert directory == path and list(path.iterdir()) == []
        (path / "metrics.json").write_text("{}\n")  # readable where it belongs while the block runs
        assert (tmp_path / "live" / "metrics.json").is_file()
    with pytest.raises(RuntimeError), live_dir(path):
        assert list(path.iterdir()) == []  # the previous run's files are not this run's
        (path / "half.tsv").write_text("step\tloss\n1\t5.0\n")
        raise RuntimeError("the stage failed")
    assert _tree(path) == {"metrics.json": "{}\n"}
    (tmp_path / ".live.tmp-k1ll3d").mkdir()  # what SIGKILL leaves beside it: the previous run, set aside
    with live_dir(path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"] and list(path.iterdir()) == []

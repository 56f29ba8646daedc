"""Training that survives real use: resume after kill -9, early stopping, the best adapter, divergence, determinism."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, interruptible, load_stage, tiny_params, train_args, write_params

from qlorapipe import data, modeling
from qlorapipe.errors import UserError
from qlorapipe.params import parse_section
from qlorapipe.train import checkpoints
from qlorapipe.train import loop as training

CPU = torch.device("cpu")

# 8 steps of 8 x 2 chunks cross an epoch boundary of the tiny corpus (93 chunks); dropout draws from the RNG
# and the 8-bit optimizer has quantization state, so a resume must restore all of them.
RESUME_OVERRIDES = {
    "training.max_steps": 8, "training.per_device_batch_size": 8, "training.gradient_accumulation_steps": 2,
    "training.optimizer": "adamw_8bit", "training.eval_every_steps": 5, "training.checkpoint_every_steps": 2,
    "training.lr_scheduler": "cosine", "training.warmup_steps": 2, "lora.dropout": 0.1,
}


def _train_args(prepared: Path, work: Path) -> list[str]:
    return train_args(work / "params.yaml", prepared / "models/base", prepared / "data/prepared", work)


def _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, name: str, **overrides) -> Path:
    work = tmp_path_factory.mktemp(name)
    write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **overrides))
    return work


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    """An uninterrupted run of the train stage with the resume settings."""
    work = _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, "reference", **RESUME_OVERRIDES)
    load_stage("train").main(_train_args(prepared, work))
    return work


def _adapter_bytes(work: Path) -> bytes:
    return (work / "adapter" / "adapter_model.safetensors").read_bytes()


def _checkpoint_steps(work: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (work / "checkpoints").glob("step-*"))


def _live_files(work: Path) -> dict[str, str]:
    """The live metrics directory (dvclive's metrics.json and per-metric TSVs), by relative path."""
    live = work / "live"
    return {str(p.relative_to(live)): p.read_text() for p in sorted(live.rglob("*")) if p.is_file()}


def test_a_run_killed_midway_resumes_to_the_identical_adapter(prepared, reference, tmp_path_factory,
                                                               tiny_llama_dir, corpus_file):
    work = _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, "killed", **RESUME_OVERRIDES)
    command = [sys.executable, str(ROOT / "stages/train.py")] + _train_args(prepared, work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(step >= 4 for step in _checkpoint_steps(work)) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (work / "adapter").exists() and not (work / "train.json").exists()
    killed_at = _checkpoint_steps(work)[-1]
    assert 4 <= killed_at < 8
    # The live metrics were written in place: the killed run left them, every file whole, up to its last step.
    live = _live_files(work)
    assert json.loads(live["metrics.json"])["step"] >= killed_at
    for name, text in live.items():
        if name.endswith(".tsv"):
            assert text.endswith("\n") and all(len(line.split("\t")) == 2 for line in text.splitlines()), name

    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((work / "train.json").read_text())
    assert killed_at <= metrics["resumed_from_step"] < 8
    expected = json.loads((reference / "train.json").read_text())
    assert metrics["steps"] == 8 and metrics["tokens_trained"] == expected["tokens_trained"] > 7 * 16 * 32
    # On the CPU the resumed run is bitwise identical, not merely close; the config too,
    # although this process hashes strings differently from the one that made the reference.
    assert _adapter_bytes(work) == _adapter_bytes(reference)
    for name in ("adapter_config.json", "training_params.json"):
        assert (work / "adapter" / name).read_bytes() == (reference / "adapter" / name).read_bytes()
    assert (work / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert _live_files(work) == _live_files(reference)  # the restored steps were published first
    assert _checkpoint_steps(work) == [8]  # older checkpoints are deleted once a newer one is complete


def test_ctrl_c_stops_a_run_in_one_line_and_it_resumes_from_its_last_checkpoint(prepared, reference, tmp_path_factory,
                                                                               tiny_llama_dir, corpus_file):
    work = _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, "interrupted", **RESUME_OVERRIDES)
    command = [sys.executable, str(ROOT / "stages/train.py")] + _train_args(prepared, work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while not _checkpoint_steps(work) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate()[1]
    assert process.returncode == 130, "training finished before it could be interrupted"
    assert " ".join(stderr.split()).endswith("interrupted: nothing half-written was kept; run it again (training "
                                             "resumes from its last checkpoint)"), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (work / "adapter").exists() and not (work / "train.json").exists()
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]
    interrupted_at = _checkpoint_steps(work)[-1]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "train.json").read_text())["resumed_from_step"] == interrupted_at
    assert _adapter_bytes(work) == _adapter_bytes(reference)


def test_same_params_and_data_give_the_same_adapter_bytes(prepared, reference, tmp_path_factory,
                                                          tiny_llama_dir, corpus_file):
    work = _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, "again", **RESUME_OVERRIDES)
    torch.manual_seed(1234)  # the stage must seed itself, whatever state the process is in
    load_stage("train").main(_train_args(prepared, work))
    assert json.loads((work / "train.json").read_text())["resumed_from_step"] == 0
    assert _adapter_bytes(work) == _adapter_bytes(reference)


def test_a_finished_run_resumes_to_its_end_and_other_params_discard_the_checkpoint(
        prepared, reference, tmp_path_factory, tiny_llama_dir, corpus_file, caplog):
    work = _run_dir(tmp_path_factory, tiny_llama_dir, corpus_file, "rerun", **RESUME_OVERRIDES)
    shutil.copytree(reference / "checkpoints", work / "checkpoints")
    load_stage("train").main(_train_args(prepared, work))
    assert json.loads((work / "train.json").read_text())["resumed_from_step"] == 8
    assert _adapter_bytes(work) == _adapter_bytes(reference)
    assert (work / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert _live_files(work) == _live_files(reference)

    write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **{
        **RESUME_OVERRIDES, "training.max_steps": 2}))
    with caplog.at_level(logging.WARNING, logger="qlorapipe.train.checkpoints"):
        load_stage("train").main(_train_args(prepared, work))
    assert "made with different params, data or base model" in caplog.text
    metrics = json.loads((work / "train.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 2
    assert _checkpoint_steps(work) == [2]


def test_changing_only_the_checkpoint_interval_keeps_the_fingerprint(prepared):
    base, prep = prepared / "models/base", prepared / "data/prepared"
    every = [checkpoints.run_fingerprint(base, prep, training=parse_section("training", {"checkpoint_every_steps": n}))
             for n in (0, 5)]
    other = checkpoints.run_fingerprint(base, prep, training=parse_section("training", {"seed": 7}))
    assert every[0] == every[1] != other


def test_half_written_and_foreign_checkpoints_are_never_used(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    store = checkpoints.CheckpointStore(tmp_path, every_steps=3, run_fingerprint="abc")
    good = store.save(6, model, optimizer, {"note": "six"}, best=None)
    store.wait()
    # What kill -9 can leave behind: an unfinished temporary directory, and (copied by hand,
    # or from an older version) a step directory without its state file.
    (tmp_path / ".step-000009.tmp-x1y2").mkdir()
    (tmp_path / ".step-000009.tmp-x1y2" / "adapter.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "step-000012").mkdir()
    (tmp_path / "step-000012" / "adapter.safetensors").write_bytes(b"\0" * 10)
    foreign = checkpoints.CheckpointStore(tmp_path / "other", every_steps=3, run_fingerprint="xyz")
    written = foreign.save(9, model, optimizer, {}, best=None)
    foreign.wait()
    written.rename(tmp_path / "step-000009")

    with caplog.at_level(logging.INFO, logger="qlorapipe.train.checkpoints"):
        latest = store.latest()
    assert latest.path == good and latest.step == 6 and latest.state["note"] == "six"
    assert "step-000012: incomplete" in caplog.text and "step-000009: made with different params" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "other") == ["step-000006"]
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(latest.optimizer_state())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(restored.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert latest.adapter().keys() == {"weight", "bias"}


def _model_and_data(prepared: Path, lora_dropout: float = 0.0):
    from qlorapipe.params import LoraParams, QuantizationParams

    torch.manual_seed(0)
    quant = QuantizationParams(load_in="4bit", compute_dtype="float32")
    model, _ = modeling.load_base_model(prepared / "models/base", quant, CPU)
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, dropout=lora_dropout), True, False)
    splits = [data.load_split(prepared / "data/prepared", s) for s in (data.TRAIN_SPLIT, data.EVAL_SPLIT)]
    return model, *splits


def _training(**values):
    return parse_section("training", {"per_device_batch_size": 4, "learning_rate": 0.003, "optimizer": "adamw_torch",
                                      "warmup_steps": 0, "lr_scheduler": "constant", "max_eval_batches": None,
                                      "early_stopping_patience": 0, "checkpoint_every_steps": 0, **values})


def test_without_a_progress_bar_the_first_evaluated_and_last_steps_are_logged(prepared, monkeypatch, caplog):
    """A log file or CI gets no bar (it would show only at the end): the loop logs steps itself, the first,
    those that evaluated and the last always, the others at most every LOG_EVERY_SECONDS."""
    model, train_set, eval_set = _model_and_data(prepared)
    monkeypatch.setattr(training, "LOG_EVERY_SECONDS", 1e9)
    with caplog.at_level(logging.INFO, logger="qlorapipe.train.loop"):
        result = training.train(model, train_set, eval_set, _training(max_steps=5, eval_every_steps=2), CPU)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in logged] == ["1/5", "2/5", "4/5", "5/5"]
    assert logged == [result.log_lines[i] for i in (0, 1, 3, 4)]  # the training log holds every step

    caplog.clear()
    monkeypatch.setattr(training, "LOG_EVERY_SECONDS", 0.0)
    model, train_set, eval_set = _model_and_data(prepared)
    with caplog.at_level(logging.INFO, logger="qlorapipe.train.loop"):
        training.train(model, train_set, eval_set, _training(max_steps=3, eval_every_steps=100), CPU)
    assert sum(r.getMessage().startswith("step ") for r in caplog.records) == 3


def test_early_stopping_waits_patience_evaluations_and_keeps_the_best_adapter(prepared):
    # A min_delta no step can beat makes every evaluation after the first "no improvement".
    params = _training(max_steps=20, eval_every_steps=2, early_stopping_patience=2, early_stopping_min_delta=100.0)
    model, train_set, eval_set = _model_and_data(prepared)
    result = training.train(model, train_set, eval_set, params, CPU)
    assert result.steps == 6 and len(result.history) == 6
    assert [r.step for r in result.history if r.eval_loss is not None] == [2, 4, 6]
    assert result.best_step == 2 and "did not improve for 2 evaluations" in result.stop_reason
    assert result.final_eval_loss == result.history[1].eval_loss
    kept = checkpoints.trainable_state(model)

    two_steps, train_set, eval_set = _model_and_data(prepared)
    training.train(two_steps, train_set, eval_set, _training(max_steps=2, eval_every_steps=2), CPU)
    expected = checkpoints.trainable_state(two_steps)
    assert all(torch.equal(kept[name], expected[name]) for name in expected)

    last, train_set, eval_set = _model_and_data(prepared)
    no_best = training.train(last, train_set, eval_set, _training(
        max_steps=20, eval_every_steps=2, early_stopping_patience=2, early_stopping_min_delta=100.0,
        keep_best_adapter=False), CPU)
    assert no_best.steps == 6 and no_best.final_eval_loss == no_best.history[-1].eval_loss
    assert not all(torch.equal(checkpoints.trainable_state(last)[n], expected[n]) for n in expected)


def test_a_checkpoint_is_written_in_the_background_with_the_values_it_was_saved_with(tmp_path, monkeypatch, caplog):
    """save() copies the tensors and returns; training changes them while the files are written; the files hold
    what was saved. A write that fails is raised by wait(), leaving no directory behind and the checkpoint before."""
    import threading

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = {name: value.clone() for name, value in checkpoints.trainable_state(model).items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    store = checkpoints.CheckpointStore(tmp_path, every_steps=1, run_fingerprint="abc")
    release, write = threading.Event(), checkpoints._write_snapshot

    def slow_write(directory, snapshot):
        assert release.wait(30)
        write(directory, snapshot)

    monkeypatch.setattr(checkpoints, "_write_snapshot", slow_write)
    path = store.save(1, model, optimizer, {"note": "one"}, best=None)
    assert not path.exists()  # still being written
    model(torch.ones(1, 3)).sum().backward()  # training goes on
    optimizer.step()
    release.set()
    store.wait()
    latest = store.latest()
    assert latest.path == path and latest.state["note"] == "one"
    assert all(torch.equal(latest.adapter()[name], saved[name]) for name in saved)
    assert not torch.equal(model.weight.detach(), saved["weight"])
    assert torch.equal(latest.optimizer_state()["state"][0]["exp_avg"], moments)

    def failing_write(directory, snapshot):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_write_snapshot", failing_write)
    store.save(2, model, optimizer, {"note": "two"}, best=None)
    with pytest.raises(UserError, match=r"checkpoint .*step-000002 could not be written \(\[Errno 28\] No space "
                                        r"left on device\): free disk space or point --checkpoints elsewhere"):
        store.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    store.wait()  # raised once
    # A run that stops (divergence, an error) names the newest checkpoint really on disk, logging the failed write.
    failed = store.save(3, model, optimizer, {"note": "three"}, best=None)
    with caplog.at_level(logging.WARNING, logger="qlorapipe.train.checkpoints"):
        assert store.settle(failed) == path
    assert "step-000003 was not written: [Errno 28] No space left on device" in caplog.text
    assert store.settle(path) == path  # nothing being written


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    params = _training(max_steps=10, eval_every_steps=10, checkpoint_every_steps=1, learning_rate=1e30,
                       max_grad_norm=0.0)
    model, train_set, eval_set = _model_and_data(prepared)
    store = checkpoints.CheckpointStore(tmp_path, params.checkpoint_every_steps, "run")
    with pytest.raises(UserError, match=r"the training loss became (nan|inf) at step (\d+); likely cause: a learning "
                                        r"rate too high \(training.learning_rate=1e\+30") as error:
        training.train(model, train_set, eval_set, params, CPU, checkpoints=store)
    step = int(str(error.value).split(" at step ")[1].split(";")[0])
    assert step >= 2
    latest = store.latest()
    assert latest.step == step - 1 and str(latest.path) in str(error.value)
    assert all(torch.isfinite(t).all() for t in latest.adapter().values())


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_infinite_gradients_under_a_finite_loss_stop_before_the_optimizer_step(prepared, tmp_path, max_grad_norm):
    """A float16 backward can overflow while the loss stays finite: the step is refused, not applied as NaN."""
    params = _training(max_steps=6, eval_every_steps=10, checkpoint_every_steps=1, max_grad_norm=max_grad_norm,
                       gradient_accumulation_steps=2)
    model, train_set, eval_set = _model_and_data(prepared)
    calls = []
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    # the fourth step's second micro-batch: an infinite gradient, the loss untouched
    lora_b.register_hook(lambda grad: calls.append(1) or (grad * math.inf if len(calls) == 8 else grad))
    store = checkpoints.CheckpointStore(tmp_path, params.checkpoint_every_steps, "run")
    with pytest.raises(UserError, match=r"^the gradients' norm became (nan|inf) \(loss \d+\.\d{4}\) at step 4; "
                                        r"likely cause: a learning rate too high") as error:
        training.train(model, train_set, eval_set, params, CPU, checkpoints=store)
    latest = store.latest()
    assert latest.step == 3 and str(latest.path) in str(error.value)
    assert all(torch.isfinite(t).all() for t in latest.adapter().values())
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)  # no step applied


def test_accumulated_micro_batches_count_each_predicted_token_once(prepared):
    """A step's loss (and gradient) is the mean over all its predicted tokens, as one large batch's: a micro-batch
    that trains on 6 tokens does not weigh as much as one that trains on 62."""
    from qlorapipe.data import IGNORE_INDEX, Split

    model, train_set, _ = _model_and_data(prepared)
    rows = train_set[list(range(4))]
    labels = rows["labels"].clone()
    labels[0, :-3] = IGNORE_INDEX  # rows 0 and 1 predict their last 3 tokens, rows 2 and 3 all
    labels[1, :-3] = IGNORE_INDEX
    four = Split({**rows, "labels": labels})
    with torch.no_grad():
        large_batch = model(**data.model_inputs(four[:], CPU), labels=labels).loss.item()
    # A seed whose order puts rows 0 and 1 in one micro-batch, 2 and 3 in the other (their means differ by far).
    def grouped(seed):
        order = [sorted(index.tolist()) for _, (_, index) in zip(range(2), training.micro_batches(4, 2, seed=seed))]
        return sorted(order) == [[0, 1], [2, 3]]

    seed = next(seed for seed in range(100) if grouped(seed))
    result = training.train(model, four, four, _training(max_steps=1, per_device_batch_size=2,
                                                         gradient_accumulation_steps=2, eval_every_steps=1,
                                                         seed=seed), CPU)
    assert result.history[0].train_loss == pytest.approx(large_batch, rel=1e-5)
    full = 2 * (labels.shape[1] - 1)
    assert training.token_weights([labels[:2], labels[2:]], training.SingleProcess(CPU)) == pytest.approx(
        [6 / (6 + full), full / (6 + full)])


def test_the_divergence_message_blames_float16_when_it_computed_in_float16():
    message = training.divergence_message(float("inf"), 7, torch.float16, _training(), None)
    assert message.startswith("the training loss became inf at step 7; likely cause: float16 overflow")
    assert "quantization.compute_dtype" in message and "no checkpoint was written" in message


def test_a_resumed_stream_of_micro_batches_continues_where_it_stopped():
    full = training.micro_batches(10, 3, seed=5)
    expected = [next(full)[1].tolist() for _ in range(11)]
    resumed = training.micro_batches(10, 3, seed=5, start=6)
    assert [next(resumed)[1].tolist() for _ in range(5)] == expected[6:]


def test_without_max_steps_the_step_count_comes_from_epochs_over_the_micro_batches():
    def steps(**params):
        return training.total_steps(parse_section("training", params), n_train=10)

    # 10 rows in micro-batches of 4: 3 micro-batches an epoch (the last one short), 2 to an optimizer step
    assert steps(max_steps=0, epochs=2, per_device_batch_size=4, gradient_accumulation_steps=2) == 3
    assert steps(max_steps=0, epochs=3, per_device_batch_size=4, gradient_accumulation_steps=1) == 9
    assert steps(max_steps=0, epochs=0.2, per_device_batch_size=4, gradient_accumulation_steps=16) == 1  # at least one
    assert steps(max_steps=7, epochs=3, per_device_batch_size=4, gradient_accumulation_steps=1) == 7

"""Training on several processes: two gloo ranks on the CPU give the adapter one process gives.

The train stage relaunches itself through `accelerate launch` here exactly as it does under
`dvc exp run -S distributed.num_processes=2`; the ranks are real processes talking gloo.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, interruptible, load_stage, tiny_params, train_args, write_params

from qlorapipe.errors import UserError
from qlorapipe.params import DistributedParams, TrainingParams, parse_section
from qlorapipe.train import distributed
from qlorapipe.train.loop import micro_batches

# Global batch 4 = 2 per device x 2 accumulation x 1 process = 2 x 1 x 2 processes. float32 compute
# on every CPU (auto is bfloat16 on some): one process and two agree to float32's rounding.
BATCH = {"training.per_device_batch_size": 2, "training.gradient_accumulation_steps": 2,
         "training.max_steps": 4, "training.eval_every_steps": 2, "training.max_eval_batches": 2,
         "quantization.compute_dtype": "float32"}
OUTPUT_FILES = ["adapter", "checkpoints", "curves.png", "history.csv", "live", "log.txt", "train.json"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir, corpus_file) -> dict:
    work = tmp_path_factory.mktemp("distributed")
    params = write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file))
    paths = {"work": work, "base": work / "base", "prepared": work / "prepared"}
    load_stage("download").main(["--params", str(params), "--out", str(paths["base"])])
    load_stage("prepare").main(["--params", str(params), "--base", str(paths["base"]), "--out",
                                str(paths["prepared"]), "--report", str(work / "data.json"),
                                "--lengths", str(work / "lengths.csv"), "--lengths-plot", str(work / "lengths.png")])
    return paths


def _train(prepared: dict, tiny_llama_dir: Path, corpus_file: Path, name: str, **overrides) -> Path:
    """Run the train stage with ``overrides`` into <work>/<name>/; return that directory."""
    out = prepared["work"] / name
    out.mkdir()
    params = write_params(out.parent / f"{name}.yaml",
                          tiny_params(tiny_llama_dir, corpus_file, **{**BATCH, **overrides}))
    load_stage("train").main(train_args(params, prepared["base"], prepared["prepared"], out))
    return out


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_ranks_read_disjoint_shards_of_one_seeded_order_that_make_up_each_step():
    accumulation, steps = 4, 6
    single = list(itertools.islice(micro_batches(37, 3, seed=5), accumulation * steps))
    for n in (2, 4):
        ranks = [list(itertools.islice(distributed.shard(micro_batches(37, 3, seed=5), r, n), accumulation // n * steps))
                 for r in range(n)]
        for step in range(steps):
            want = single[step * accumulation : (step + 1) * accumulation]
            per_rank = accumulation // n
            got = [mb for rank in ranks for mb in rank[step * per_rank : (step + 1) * per_rank]]
            as_sets = lambda mbs: sorted(tuple(index.tolist()) for _, index in mbs)  # noqa: E731
            assert as_sets(got) == as_sets(want), f"{n} ranks, step {step}"
            # no chunk is read by two ranks within a step
            flat = [i for _, index in got for i in index.tolist()]
            assert len(flat) == len(set(flat))


def test_accumulation_is_split_among_processes_and_the_global_batch_kept():
    training = TrainingParams(per_device_batch_size=2, gradient_accumulation_steps=8)
    assert distributed.global_batch_size(training) == 16
    assert [distributed.per_process_accumulation(training, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(UserError, match=r"training.gradient_accumulation_steps \(8\) must be a multiple of "
                                        r"distributed.num_processes \(3\)"):
        distributed.per_process_accumulation(training, 3)


def test_distributed_params_are_validated():
    assert parse_section("distributed", {}) == DistributedParams(num_processes=1, strategy="ddp")
    with pytest.raises(UserError, match="distributed.num_processes must be at least 1.*main_process_port"):
        parse_section("distributed", {"num_processes": 0, "main_process_port": 70000})
    with pytest.raises(UserError, match="distributed.strategy: must be one of 'ddp', 'fsdp'"):
        parse_section("distributed", {"strategy": "deepspeed"})


def test_the_launch_runs_accelerate_on_the_stage_script():
    cmd = distributed.launch_command(DistributedParams(num_processes=2), Path("stages/train.py"), ["--x", "1"], 2950)
    assert cmd[1:3] == ["-m", "qlorapipe.launcher"]  # accelerate launch without the agent's failure report
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "2950"
    assert cmd[-3:] == ["stages/train.py", "--x", "1"]


def test_an_error_every_rank_meets_is_said_once_in_one_line(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(
        tiny_llama_dir, corpus_file, **{**BATCH, "distributed.num_processes": 2}))
    missing = tmp_path / "prepared"
    command = [sys.executable, str(ROOT / "stages/train.py"), *train_args(params, tmp_path / "base", missing,
                                                                           tmp_path / "out")]
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    (tmp_path / "tmp").mkdir()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path, "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 1
    stderr = " ".join(result.stderr.split())
    assert stderr.count(f"error: {missing / 'train'}: prepared data not found; run `dvc repro prepare`") == 1, stderr
    assert stderr.count("error:") == 1 and "Traceback" not in stderr and "FAILED" not in stderr, result.stderr
    assert not list((tmp_path / "tmp").glob("qlorapipe-ranks-*"))  # the ranks' reports are removed


def test_a_rank_killed_by_a_signal_is_named_in_the_stage_error(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import os, signal, time\n"
                      "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(60)\n")
    with pytest.raises(UserError, match=r"^the 2 training processes failed: rank 1 was killed by SIGKILL; "):
        distributed.relaunch(DistributedParams(num_processes=2), script, [])


def test_different_errors_of_the_ranks_are_each_said_with_their_ranks(tmp_path):
    for rank, message in enumerate(["out of memory", "data missing", "out of memory"]):
        (tmp_path / f"rank-{rank}.txt").write_text(message)
    assert distributed.failure_message(3, 1, tmp_path) == "ranks 0 and 2: out of memory; rank 1: data missing"
    assert distributed.failure_message(3, 1, tmp_path / "none") == \
        "the 3 training processes failed: the launcher exited with status 1; any message of its own is above"


def test_a_global_batch_that_does_not_divide_is_refused_before_anything_loads(tmp_path, tiny_llama_dir, corpus_file):
    params = write_params(tmp_path / "params.yaml", tiny_params(
        tiny_llama_dir, corpus_file, **{"training.gradient_accumulation_steps": 3, "distributed.num_processes": 2}))
    with pytest.raises(UserError, match="must be a multiple of distributed.num_processes"):
        load_stage("train").main(train_args(params, Path("nowhere"), Path("nowhere"), tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_fsdp_qlora_stores_4bit_weights_as_float32(prepared):
    """bnb_4bit_quant_storage = float32 (bitsandbytes PR #970): what lets FSDP flatten 4-bit layers
    with the float32 LoRA weights, whatever the compute dtype."""
    import torch

    from qlorapipe import modeling
    from qlorapipe.params import QuantizationParams

    cpu = torch.device("cpu")
    plain, _ = modeling.load_base_model(prepared["base"], QuantizationParams(compute_dtype="bfloat16"), cpu)
    shardable, dtype = modeling.load_base_model(prepared["base"], QuantizationParams(compute_dtype="bfloat16"), cpu,
                                                shardable_4bit=True)
    assert dtype == torch.bfloat16
    weight = dict(shardable.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.float32
    assert dict(plain.named_parameters())["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    # Same NF4 codes, only packed differently: both models compute the same logits.
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, shardable(input_ids=ids).logits, atol=1e-5)
    assert distributed.shards_weights(DistributedParams(num_processes=2, strategy="fsdp"))
    assert not distributed.shards_weights(DistributedParams(num_processes=2, strategy="ddp"))


@pytest.fixture(scope="module")
def one_process(prepared, tiny_llama_dir, corpus_file) -> Path:
    # Evaluation only after the last step: on CPUs with AVX512-BF16, bitsandbytes repacks the
    # 4-bit weights into a CPU layout at the first evaluation, which moves the later steps of one
    # process (and of DDP ranks) by ~1e-3 in loss; FSDP keeps the plain layout (fsdp_wrap).
    return _train(prepared, tiny_llama_dir, corpus_file, "one", **{"training.eval_every_steps": 4})


def _assert_same_training(one: Path, two: Path) -> None:
    """Two processes wrote what one process writes: the same files, batch, tokens, losses and adapter."""
    # Only rank 0 wrote, and only the declared outputs (no second copy, no leftover temp dirs).
    assert sorted(p.name for p in two.iterdir()) == OUTPUT_FILES
    assert sorted(p.name for p in (two / "adapter").iterdir()) == sorted(p.name for p in (one / "adapter").iterdir())
    metrics_one, metrics_two = (json.loads((d / "train.json").read_text()) for d in (one, two))
    assert (metrics_one["num_processes"], metrics_two["num_processes"]) == (1, 2)
    assert metrics_one["global_batch_size"] == metrics_two["global_batch_size"] == 4
    assert metrics_one["tokens_trained"] == metrics_two["tokens_trained"] == 4 * 4 * 32
    # Same chunks per step, gradients averaged over ranks: the same adapter up to float32
    # summation order (measured: identical bits here; 1e-5 is 0.1 % of the largest LoRA weight).
    a, b = _adapter(one), _adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    assert max(t.abs().max().item() for n, t in a.items() if "lora_B" in n) > 1e-3  # it did train
    history_one, history_two = ((d / "history.csv").read_text().splitlines() for d in (one, two))
    for row_one, row_two in zip(history_one[1:], history_two[1:], strict=True):
        loss_one, loss_two = float(row_one.split(",")[2]), float(row_two.split(",")[2])
        assert abs(loss_one - loss_two) < 1e-4


def test_ddp_on_two_gloo_processes_trains_the_adapter_one_process_trains(prepared, one_process, tiny_llama_dir,
                                                                         corpus_file):
    two = _train(prepared, tiny_llama_dir, corpus_file, "ddp2",
                 **{"distributed.num_processes": 2, "training.eval_every_steps": 4})
    _assert_same_training(one_process, two)
    assert "x 1 accumulation x 2 processes (ddp, " in (two / "log.txt").read_text()


def test_fsdp_on_two_gloo_processes_shards_the_4bit_base_and_trains_the_same_adapter(prepared, one_process,
                                                                                    tiny_llama_dir, corpus_file):
    two = _train(prepared, tiny_llama_dir, corpus_file, "fsdp2",
                 **{"distributed.num_processes": 2, "distributed.strategy": "fsdp", "training.eval_every_steps": 4})
    _assert_same_training(one_process, two)
    log = (two / "log.txt").read_text()
    assert "x 1 accumulation x 2 processes (fsdp, " in log
    # Each rank held about half of the model's parameters (the 4-bit weights included).
    held, total = (int(n.replace(",", "")) for n in log.split("parameters held by rank 0: ")[1].split()[0:3:2])
    assert 0.4 * total < held < 0.6 * total


def test_fsdp_training_is_not_changed_by_evaluations_between_steps(prepared, one_process, tiny_llama_dir,
                                                                    corpus_file):
    # Evaluating at step 2 must leave FSDP's sharded 4-bit weights as they were (see fsdp_wrap):
    # before that was handled, the adapter came out up to 3e-3 away from one process's.
    two = _train(prepared, tiny_llama_dir, corpus_file, "fsdp2-eval",
                 **{"distributed.num_processes": 2, "distributed.strategy": "fsdp", "training.eval_every_steps": 2})
    a, b = _adapter(one_process), _adapter(two)
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    evals = [row.split(",")[3] for row in (two / "history.csv").read_text().splitlines()[1:]]
    assert evals[1] and evals[3]  # it did evaluate at step 2 and at the end


def test_fsdp_with_bfloat16_compute_keeps_float32_lora_weights(prepared, tiny_llama_dir, corpus_file):
    """On GPUs the compute dtype is bfloat16; FSDP must still train float32 LoRA weights, as one
    process does (seen on two H200s before the fix: a bfloat16 adapter, 3.6e-3 away)."""
    # The plain path (peft computes LoRA in float32): with the fast LoRA forward's bfloat16 products,
    # one process and two differ by about as much as the bfloat16 adapter this test catches.
    bf16 = {"quantization.compute_dtype": "bfloat16", "training.eval_every_steps": 4,
            **{f"acceleration.{name}": False for name in ("keep_frozen_dtype", "lora_fast_forward",
                                                           "chunked_cross_entropy")}}
    one = _train(prepared, tiny_llama_dir, corpus_file, "one-bf16", **bf16)
    two = _train(prepared, tiny_llama_dir, corpus_file, "fsdp2-bf16",
                 **{**bf16, "distributed.num_processes": 2, "distributed.strategy": "fsdp"})
    a, b = _adapter(one), _adapter(two)
    assert {t.dtype for t in b.values()} == {t.dtype for t in a.values()} == {__import__("torch").float32}
    worst = max((a[name] - b[name]).abs().max().item() for name in a)
    assert worst < 1e-4, worst


# ---- resume with several processes ----------------------------------------------------------

# 12 steps, a checkpoint every 2, dropout and the 8-bit optimizer's state: everything a resume restores.
RESUME = {"training.max_steps": 12, "training.per_device_batch_size": 8, "training.checkpoint_every_steps": 2,
          "training.optimizer": "adamw_8bit", "training.eval_every_steps": 12, "lora.dropout": 0.1,
          "distributed.num_processes": 2}


def _stage_command(prepared: dict, out: Path, params: Path) -> list[str]:
    return [sys.executable, str(ROOT / "stages/train.py"), *train_args(params, prepared["base"], prepared["prepared"], out)]


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _kill_after_a_checkpoint_and_rerun(prepared: dict, tiny_llama_dir, corpus_file, name: str, **overrides) -> Path:
    """Start the train stage on two processes, SIGKILL the launcher and its ranks once a checkpoint is
    complete, check nothing but checkpoints and the live metrics was left, then run it again to the end."""
    out = prepared["work"] / name
    out.mkdir()
    params = write_params(prepared["work"] / f"{name}.yaml",
                          tiny_params(tiny_llama_dir, corpus_file, **{**BATCH, **RESUME, **overrides}))
    command = _stage_command(prepared, out, params)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own process group: the ranks die with it
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(out) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = _checkpoint_steps(out)[-1]
    assert 2 <= killed_at < 12
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "live"]  # live metrics are written in place
    assert json.loads((out / "live/metrics.json").read_text())["step"] >= killed_at
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert killed_at <= json.loads((out / "train.json").read_text())["resumed_from_step"] < 12
    return out


def test_ctrl_c_stops_the_launcher_and_its_ranks_in_one_line(prepared, tiny_llama_dir, corpus_file):
    out = prepared["work"] / "ctrl-c"
    out.mkdir()
    params = write_params(prepared["work"] / "ctrl-c.yaml",
                          tiny_params(tiny_llama_dir, corpus_file, **{**BATCH, **RESUME}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(_stage_command(prepared, out, params), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(out) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends the terminal's foreground process group
    stderr = process.communicate()[1]
    assert process.returncode == 130, "training finished before it could be interrupted"
    assert stderr.count("interrupted:") == 1, stderr
    assert "Traceback" not in stderr and "death signal" not in stderr, stderr
    assert _checkpoint_steps(out) and not (out / "adapter").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_killed_midway_resume_to_the_adapter_of_an_uninterrupted_run(
        prepared, tiny_llama_dir, corpus_file, strategy):
    whole = _train(prepared, tiny_llama_dir, corpus_file, f"{strategy}-whole",
                   **{**RESUME, "distributed.strategy": strategy})
    resumed = _kill_after_a_checkpoint_and_rerun(prepared, tiny_llama_dir, corpus_file, f"{strategy}-killed",
                                                 **{"distributed.strategy": strategy})
    # Same bytes, not merely close: weights, optimizer state, RNGs and data position were all restored.
    assert (resumed / "adapter/adapter_model.safetensors").read_bytes() == \
        (whole / "adapter/adapter_model.safetensors").read_bytes()
    assert (resumed / "history.csv").read_text() == (whole / "history.csv").read_text()
    assert _tree(resumed / "live") == _tree(whole / "live")
    assert _checkpoint_steps(resumed) == [12]
    ranks = sorted(p.name for p in (resumed / "checkpoints/step-000012").iterdir() if p.is_dir())
    assert ranks == (["rank-0", "rank-1"] if strategy == "fsdp" else ["rank-1"])
    # A layout that cannot resume the checkpoint is refused in one line before any process is launched, and
    # the checkpoint kept: the sharded state resumes only as it was written, the whole one not under FSDP.
    other = "ddp" if strategy == "fsdp" else "fsdp"
    again = write_params(prepared["work"] / f"{strategy}-as-{other}.yaml", tiny_params(
        tiny_llama_dir, corpus_file, **{**BATCH, **RESUME, "distributed.strategy": other}))
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(_stage_command(prepared, resumed, again), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    stderr = result.stderr.replace("\n", " ")
    assert result.returncode != 0
    assert stderr.count({
        "fsdp": "holds the training state sharded over 2 FSDP processes, this run needs it whole (one process or "
                "DDP): to resume it set distributed.strategy to fsdp and distributed.num_processes to 2",
        "ddp": "holds the training state whole (one process or DDP), this run needs it sharded over 2 FSDP "
               "processes: to resume it set distributed.strategy to ddp"}[strategy]) == 1, result.stderr
    assert "Launching" not in stderr and "Traceback" not in stderr, result.stderr
    assert _checkpoint_steps(resumed) == [12]
    if strategy == "ddp":
        # DDP ranks hold the whole state: one process resumes it (here: at its last step) to the same adapter.
        one = write_params(prepared["work"] / "ddp-as-one.yaml", tiny_params(
            tiny_llama_dir, corpus_file, **{**BATCH, **RESUME, "distributed.num_processes": 1}))
        shutil.rmtree(resumed / "adapter")
        load_stage("train").main(_stage_command(prepared, resumed, one)[2:])
        assert json.loads((resumed / "train.json").read_text())["resumed_from_step"] == 12
        assert (resumed / "adapter/adapter_model.safetensors").read_bytes() == \
            (whole / "adapter/adapter_model.safetensors").read_bytes()

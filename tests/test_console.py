"""Stage processes: quiet libraries without importing them."""

import logging
import os
import subprocess
import sys

import pytest
import torch

QUIET = ("from transformers.utils import logging as hf_logging; import datasets; "
         "from huggingface_hub.utils import are_progress_bars_disabled; "
         "print(hf_logging.get_verbosity() == hf_logging.ERROR, hf_logging.is_progress_bar_enabled(), "
         "are_progress_bars_disabled(), datasets.is_progress_bar_enabled())")


def _run(code: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin",  # none of the libraries' switches set by the caller; its import path kept
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.split()


def test_configure_logging_quiets_libraries_imported_later_without_importing_them():
    code = ("import sys; from qlorapipe.console import configure_logging; configure_logging(); "
            "print(any(m in sys.modules for m in ('transformers', 'datasets', 'torch'))); " + QUIET)
    assert _run(code) == ["False", "True", "False", "True", "False"]


def test_configure_logging_quiets_libraries_already_imported():
    code = "import transformers, datasets; from qlorapipe.console import configure_logging; configure_logging(); " + QUIET
    assert _run(code) == ["True", "False", "True", "False"]


STAGE = """
import atexit, logging, sys
from qlorapipe.console import run_stage
atexit.register(lambda: print("teardown", end=""))
def main(argv):
    logging.getLogger("stage").info("written")
    print("out", end="")  # no newline: only an explicit flush gets it out
    if argv == ["fail"]:
        from qlorapipe.errors import UserError
        raise UserError("training.max_steps must be positive")
    if argv and argv[0] == "ctrl-c":
        raise KeyboardInterrupt
    if argv and argv[0] == "oom":
        import torch
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.63 GiB of which 1.02 GiB "
            "is free. Including non-PyTorch memory, this process has 6.60 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    if argv and argv[0] == "gpu-oom":  # the real thing: more than any GPU has
        import torch
        torch.empty(2**50, dtype=torch.uint8, device="cuda")
    if argv and argv[0] == "kernel-oom":
        raise RuntimeError("CUDA error: out of memory\\nCUDA kernel errors might be asynchronously reported")
    if argv and argv[0] == "cublas":
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    if argv and argv[0] == "bug":
        raise RuntimeError("shape mismatch")
run_stage(main, sys.argv[1:], exit_when_done=sys.argv[-1] != "command")
"""


def _stage(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STAGE, *argv], check=False, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **env,  # no WORLD_SIZE from the caller
                               **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})


def test_a_stage_that_returned_exits_at_once_with_its_output_flushed():
    done = _stage()
    assert done.returncode == 0 and done.stdout == "out"  # flushed; the interpreter's teardown skipped
    assert "written" in done.stderr


def test_a_failing_stage_and_a_distributed_rank_exit_through_the_interpreter():
    failed = _stage("fail")
    assert failed.returncode == 1 and failed.stdout == "outteardown"
    assert "error: training.max_steps must be positive" in failed.stderr
    rank = _stage(WORLD_SIZE="2")
    assert rank.returncode == 0 and rank.stdout == "outteardown"


def test_ctrl_c_is_one_line_and_exit_status_130_for_a_stage_a_command_and_none_for_a_launched_rank(tmp_path):
    stage = _stage("ctrl-c")
    assert stage.returncode == 130 and "Traceback" not in stage.stderr
    assert stage.stderr.strip().splitlines()[1:] == [
        "interrupted: nothing half-written was kept; run it again (training resumes from its last checkpoint)"]
    command = _stage("ctrl-c", "command")
    assert command.returncode == 130 and command.stderr.strip().splitlines()[1:] == ["interrupted"]
    rank = _stage("ctrl-c", RANK="1", QLORAPIPE_RANK_REPORTS=str(tmp_path))  # its launching process says it
    assert rank.returncode == 130 and "interrupted" not in rank.stderr and not list(tmp_path.iterdir())


def test_a_named_phase_clock_logs_each_phase_as_it_ends(caplog):
    """A stage without a progress bar (merge, export; any stage in a log file) says where it is."""
    from qlorapipe.clock import PhaseClock

    clock = PhaseClock("merge")
    with caplog.at_level(logging.INFO, logger="qlorapipe.clock"):
        clock.lap("reference")
        clock.lap("write_q8_0")
        clock.lap("reference")
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" done")[0] for m in messages] == ["merge: reference", "merge: write_q8_0", "merge: reference"]
    assert list(clock.seconds) == ["reference", "write_q8_0"]  # a phase met twice adds up, and says so
    assert messages[2].startswith("merge: reference done again (") and messages[2].endswith(
        f" s; {clock.seconds['reference']:.1f} s in all)")
    assert clock.summary() == ", ".join(f"{name} {value:.1f} s" for name, value in clock.seconds.items())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorapipe.clock"):
        PhaseClock().lap("write")  # unnamed: seconds only
    assert not caplog.records


def test_the_gpu_out_of_memory_is_one_line_naming_the_budget_and_other_errors_keep_their_traceback(tmp_path):
    """A stage that runs out of GPU memory says what torch said of it and which settings to change, in one line;
    a rank of the train stage's own launch leaves that line for its launcher."""
    budget = ": set acceleration.memory_budget_gb to the GPU memory the stages may use"
    oom = _stage("oom")
    assert oom.returncode == 1 and "Traceback" not in oom.stderr
    assert oom.stderr.strip().splitlines()[1:] == [
        "error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
        "of 7.63 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 6.60 GiB memory in "
        "use)" + budget + " (every stage plans within it; null is 90% of the "
        "GPU's memory), end other processes on the GPU, or lower training.per_device_batch_size or "
        "data.max_length"]
    kernel = _stage("kernel-oom")  # a library's kernel: CUDA's own words, its first line
    assert kernel.returncode == 1 and "Traceback" not in kernel.stderr
    assert "error: the GPU ran out of memory (CUDA error: out of memory)" + budget in kernel.stderr
    rank = _stage("oom", RANK="1", QLORAPIPE_RANK_REPORTS=str(tmp_path))
    assert rank.returncode == 1 and "error" not in rank.stderr
    assert (tmp_path / "rank-1.txt").read_text().startswith("the GPU ran out of memory (CUDA out of memory.")
    cublas = _stage("cublas")  # cuBLAS could not allocate its workspace: the same thing
    assert cublas.returncode == 1 and "error: the GPU ran out of memory (CUDA error: CUBLAS_STATUS_ALLOC" in cublas.stderr
    bug = _stage("bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: shape mismatch" in bug.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_allocation_beyond_the_gpu_is_the_same_one_line():
    done = _stage("gpu-oom")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate ")
    assert "memory in use): set acceleration.memory_budget_gb" in line


def test_the_out_of_memory_line_keeps_who_holds_the_gpu_and_the_cap_and_drops_the_allocator_advice():
    from qlorapipe.console import out_of_memory

    said = ("CUDA out of memory. Tried to allocate 16.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which 73.08 GiB "
            "is free. Process 1219 has 612.00 MiB memory in use. Including non-PyTorch memory, this process has 5.48 "
            "GiB memory in use. 4.66 GiB allowed; Of the allocated memory 4.56 GiB is allocated by PyTorch, with 1.97 "
            "GiB allocated in private pools (e.g., CUDA Graphs), and 80.22 MiB is reserved by PyTorch but unallocated. "
            "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    line = out_of_memory(torch.cuda.OutOfMemoryError(said))  # a capped run's, on an H100
    assert line.startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate 16.00 MiB. GPU 0 has a "
                           "total capacity of 79.18 GiB of which 73.08 GiB is free. Process 1219 has 612.00 MiB memory "
                           "in use. Including non-PyTorch memory, this process has 5.48 GiB memory in use. 4.66 GiB "
                           "allowed): set acceleration.memory_budget_gb")
    assert out_of_memory(torch.cuda.OutOfMemoryError("")).startswith("the GPU ran out of memory: set ")
    assert out_of_memory(ValueError("CUDA out of memory")) is None and out_of_memory(RuntimeError("shape")) is None

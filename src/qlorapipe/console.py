"""Logging, progress and the error boundary shared by every stage script."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.logging import RichHandler

from qlorapipe.errors import UserError
from qlorapipe.outputs import write_text_atomic

console = Console(stderr=True)

# A folder where each rank of a train stage's own launch leaves its error for the launching process, which
# says it once (train.distributed.relaunch) instead of every rank printing it.
REPORTS_ENV = "QLORAPIPE_RANK_REPORTS"

INTERRUPTED = ("[bold yellow]interrupted:[/] nothing half-written was kept; run it again (training resumes from its "
               "last checkpoint)")

# Libraries that log at import or on every call; their messages are not the user's business.
_NOISY_LOGGERS = ("bitsandbytes", "httpx", "urllib3", "filelock", "datasets", "torch.distributed", "matplotlib",
                  "gguf")


def configure_logging(level: int = logging.INFO, tokenizer_threads: bool = False) -> None:
    """Send log records through rich, once per stage process.

    Args:
        level: the root log level.
        tokenizer_threads: let the fast tokenizers encode batches on all cores. Off by default
            (unless the environment says otherwise): a fork after their thread pool started
            can deadlock, and training forks dataloader and launcher processes.
    """
    if tokenizer_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # The CPU fallback of paged optimizers warns on every parameter; say it once ourselves.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    # peft still calls the transformers 4 names of the checkpointing switches.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(gradient|is_gradient)_checkpointing.*")
    quiet_libraries()


# Read by transformers, huggingface_hub and datasets when they are imported.
_QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                      "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def quiet_libraries() -> None:
    """transformers logs errors only; its, the hub's and datasets' tqdm bars are off (rich shows progress).

    Through the environment, for libraries a stage imports later (importing them here would cost a
    stage that never uses them over a second), and through their switches for those already imported.
    A value the user set in the environment wins.
    """
    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None,
              tokenizer_threads: bool = False, exit_when_done: bool = True) -> None:
    """Run a stage's main(): a UserError or the GPU out of memory becomes one red line and exit status 1, Ctrl-C one
    line and 130.

    With ``exit_when_done`` (stage scripts) a main that returned ends the process at once
    (:func:`exit_at_once`); a command others may call in-process (``qlorapipe-chat``) passes False.
    """
    from qlorapipe.startup import defer_bitsandbytes_compile, use_expandable_segments

    defer_bitsandbytes_compile()
    use_expandable_segments()
    configure_logging(tokenizer_threads=tokenizer_threads)
    try:
        main(argv)
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        # Every output is renamed into place whole or removed on the way out (outputs.py), and the train
        # stage's complete checkpoints stay: the traceback of wherever the signal landed says nothing more.
        # A rank of the stage's own launch was stopped by its launcher: the launching process says it.
        if rank_report() is None:
            console.print(INTERRUPTED if exit_when_done else "[bold yellow]interrupted[/]", highlight=False,
                          soft_wrap=True)  # a stage, or a console command
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except Exception as exc:  # the GPU out of memory is a setting to change too; anything else keeps its traceback
        if (message := out_of_memory(exc)) is None:
            raise
        fail(message)
    if exit_when_done and EXIT_AT_ONCE and os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        exit_at_once()


def fail(message: str) -> NoReturn:
    """Say ``message`` as one red line (or leave it for the launching process, on a rank of the train stage's own
    launch) and exit with status 1."""
    if (report := rank_report()) is not None:
        write_text_atomic(report, message)
    else:
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(1)


def out_of_memory(exc: BaseException) -> str | None:
    """The one line a stage says when the GPU ran out of memory (torch's ``OutOfMemoryError``, or a CUDA error
    saying so from a library's kernel); None for anything else."""
    if not isinstance(exc, RuntimeError):  # torch's OutOfMemoryError is one
        return None
    torch = sys.modules.get("torch")
    text = str(exc).strip()
    if not (torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
            or "CUDA" in text and "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text):
        return None
    # torch's first line says what was asked, what is free and which processes hold the GPU, then goes on about
    # its own allocator's split and settings, which every stage sets itself.
    said = re.split(r" Of the allocated memory| If reserved but unallocated| See documentation", text.split("\n")[0])
    said = said[0].rstrip(" .;")
    return (f"the GPU ran out of memory{f' ({said})' if said else ''}: set "
            "acceleration.memory_budget_gb to the GPU memory the stages may use (every stage plans within it; null "
            "is 90% of the GPU's memory), end other processes on the GPU, or lower training.per_device_batch_size "
            "or data.max_length")


def rank_report() -> Path | None:
    """Where this process, a rank of the train stage's own launch, leaves its error; None when it is not one."""
    folder = os.environ.get(REPORTS_ENV)
    return Path(folder) / f"rank-{os.environ['RANK']}.txt" if folder and "RANK" in os.environ else None


# A stage that returned has written its outputs (atomic directories renamed into place, files closed): what the
# interpreter does after that, collecting every module of torch, transformers and peft and freeing the CUDA
# context, took 1.4-1.5 s on a 2-core CPU (docs/benchmarks.md), and leaves nothing a user needs. A rank of a
# distributed run exits normally (its process group is torn down with it).
EXIT_AT_ONCE = True


def exit_at_once(status: int = 0) -> None:
    """Flush the logs and the console, then end the process with ``status`` without the interpreter's teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)

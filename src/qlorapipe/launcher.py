"""The launching process of a several-process train stage: ``accelerate launch`` without its failure report.

    python -m qlorapipe.launcher <accelerate launch arguments>

accelerate launches the ranks through torch.distributed.run, whose agent answers a failed rank
with an error log line and a 40-line ChildFailedError traceback that say nothing the rank did
not. Here the agent's logs are silenced and the failure becomes one line in the reports folder
the train stage gave (``REPORTS_ENV``): which rank failed first and how; the stage turns the
ranks' own reports and that line into its one error line (``distributed.failure_message``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qlorapipe.console import REPORTS_ENV
from qlorapipe.outputs import write_text_atomic

AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
FIRST_FAILURE = "first-failure.txt"  # the report of the launcher's line on the rank that failed first


def how_it_ended(rank: int, exitcode: int, signal_name: str) -> str:
    """``rank 1 was killed by SIGKILL`` or ``rank 0 exited with status 1``."""
    if exitcode < 0:
        return f"rank {rank} was killed by {signal_name}"
    return f"rank {rank} exited with status {exitcode}"


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent's loggers set levels of their own, some when first used: its records are dropped where torch
    # prints them (the handler of "torch.distributed", which does not propagate) and at the root.
    for handler in (*logging.getLogger("torch.distributed").handlers, *logging.getLogger().handlers):
        handler.addFilter(lambda record: not record.name.startswith(AGENT_LOGGERS))
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if os.environ.get(REPORTS_ENV):
            write_text_atomic(Path(os.environ[REPORTS_ENV]) / FIRST_FAILURE,
                              how_it_ended(rank, failure.exitcode, failure.signal_name()))
        sys.exit(1)
    except SignalException as exc:  # Ctrl-C, or the stage stopped: the ranks were stopped, the stage says so
        sys.exit(128 + exc.sigval)


if __name__ == "__main__":
    main()

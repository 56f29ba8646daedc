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

from qlorapipe.console import REPORTS_ENV, leave_report

FIRST_FAILURE = "first-failure"  # the report name of the launcher's line on the rank that failed first


def how_it_ended(rank: int, exitcode: int, signal_name: str) -> str:
    """``rank 1 was killed by SIGKILL`` or ``rank 0 exited with status 1``."""
    if exitcode < 0:
        return f"rank {rank} was killed by {signal_name}"
    return f"rank {rank} exited with status {exitcode}"


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if os.environ.get(REPORTS_ENV):
            leave_report(Path(os.environ[REPORTS_ENV]), FIRST_FAILURE,
                         how_it_ended(rank, failure.exitcode, failure.signal_name()))
        sys.exit(1)


if __name__ == "__main__":
    main()

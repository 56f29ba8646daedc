"""Live training metrics: each optimizer step published through dvclive as soon as it is done.

The live directory (dvc.yaml's ``train_live``) holds dvclive's files: ``metrics.json``, the
latest values, which dvc.yaml declares as metrics, so ``dvc exp show`` shows the step a run has
reached while ``dvc exp run`` trains (in the workspace, or in a queued run's temporary copy);
and ``plots/metrics/{train,eval}/*.tsv``, one history file per metric. dvclive also posts each
step to DVC Studio when a Studio token is set (``dvc studio login``) and tells the VS Code
extension a step completed. The CSV, PNG and log that ``dvc plots`` and people read stay
hand-written (``curves``, ``run``): dvclive writes neither one CSV of every metric nor a picture.

dvclive is told to leave dvc.yaml and the experiments alone (``dvcyaml=None``,
``save_dvc_exp=False``): dvc.yaml declares the live directory like every other output, and
experiments are made by ``dvc exp run``, never by a training run on its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qlorapipe.outputs import live_dir, write_json

if TYPE_CHECKING:
    from qlorapipe.train.loop import StepRecord

# transformers' names for these values; `dvc exp show` shows them as train.loss, eval.loss, ...,
# apart from metrics/train.json's final train_loss and eval_loss.
TRAIN_LOSS, EVAL_LOSS = "train/loss", "eval/loss"
LEARNING_RATE, EPOCH = "train/learning_rate", "train/epoch"


@contextlib.contextmanager
def publisher(path: Path) -> Iterator[Callable[[Sequence[StepRecord]], None]]:
    """Yield ``publish(records)``, which adds optimizer steps to the live directory ``path``.

    ``path`` starts empty; if the block fails, it is removed and the previous run's comes back
    (``outputs.live_dir``). Every file in it is whole at any moment: ``metrics.json`` is
    replaced through a temporary, and dvclive appends each TSV row with one write. The files
    depend only on the records published, so a run resumed from a checkpoint, which publishes
    the restored steps first, ends with the same files as an uninterrupted one.
    """
    from dvclive import Live

    class WholeSummaryLive(Live):
        def make_summary(self) -> None:
            # dvclive truncates metrics.json, then writes it: `dvc exp show`, which reads it while
            # the run trains, could find it empty, and so could the next run after a SIGKILL.
            if self.summary:  # as in dvclive: the step joins the summary once something is logged
                self.summary["step"] = self.step
            write_json(Path(self.metrics_file), self.summary)

        def post_data_to_studio(self) -> None:
            # dvclive re-reads every TSV for a Studio update at each step even when it will not
            # post one (no Studio token): 17 ms a step at step 1,500 and 25 ms at 2,000 on 2 CPU
            # cores, against a flat 3 ms without. It skips the post itself when "data" is in this set.
            if "data" not in self._studio_events_to_skip:
                super().post_data_to_studio()

    with live_dir(path) as directory, \
            WholeSummaryLive(str(directory), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def publish(records: Sequence[StepRecord]) -> None:
            if not records:
                return
            for record in records:
                live.step = record.step
                for name, value, plot in ((TRAIN_LOSS, record.train_loss, True),
                                          (LEARNING_RATE, record.learning_rate, True),
                                          (EPOCH, record.epoch, False),  # in metrics.json only
                                          (EVAL_LOSS, record.eval_loss, True)):
                    # dvclive would write NaN as the string "nan", which is not a number to DVC.
                    if value is not None and math.isfinite(value):
                        live.log_metric(name, value, plot=plot)
            live.next_step()  # once per call: writes metrics.json, posts to Studio, signals VS Code

        yield publish

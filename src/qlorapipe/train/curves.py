"""Training curves: a CSV for `dvc plots` and a PNG like the seed's training_curves.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qlorapipe.outputs import save_figure_atomic, write_text_atomic

HISTORY_COLUMNS = ("step", "epoch", "train_loss", "eval_loss", "learning_rate")


def write_history_csv(history, path: Path) -> None:
    """One row per optimizer step; eval_loss is empty on steps without evaluation."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for record in history:
        eval_loss = "" if record.eval_loss is None else f"{record.eval_loss:.6f}"
        writer.writerow([record.step, record.epoch, f"{record.train_loss:.6f}", eval_loss,
                         f"{record.learning_rate:.6e}"])
    write_text_atomic(path, buffer.getvalue())


def plot_training_curves(history, path: Path) -> None:
    """Left: train and eval loss against step. Right: learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r.step for r in history]
    evals = [(r.step, r.eval_loss) for r in history if r.eval_loss is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(steps, [r.train_loss for r in history], label="train loss", linewidth=1.2)
    if evals:
        left.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    left.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Loss")
    left.grid(alpha=0.3)
    left.legend()
    right.plot(steps, [r.learning_rate for r in history], color="tab:green")
    right.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    right.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)

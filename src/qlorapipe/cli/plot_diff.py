"""Training curves of several runs on one PNG, offline: `dvc plots diff` as a picture.

    qlorapipe-plot-diff HEAD workspace my-experiment      # writes dvc_plots/plots_diff.png
    python -m qlorapipe.plot_diff ...     # the same

Each REV is a git revision, a DVC experiment name, or ``workspace``; the per-step history
(dvc.yaml's train_history path by default) is read at that revision through dvc.api.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from qlorapipe.cli.paths import pipeline_path
from qlorapipe.errors import UserError


def read_history(path: str, rev: str, repo: str = ".") -> list[dict]:
    """Rows of the history CSV at ``rev`` (``workspace`` = the file on disk).

    Raises:
        UserError: the revision or the file does not exist.
    """
    if rev == "workspace":
        file = Path(repo) / path
        if not file.is_file():
            raise UserError(f"{file} not found in the workspace; run `dvc repro` first")
        text = file.read_text()
    else:
        import dvc.api

        try:
            text = dvc.api.read(path, repo=repo, rev=rev)
        except Exception as exc:  # dvc raises many types for a bad rev or a missing path
            raise UserError(f"cannot read {path} at revision '{rev}' ({exc.__class__.__name__}: {exc})") from None
    return list(csv.DictReader(io.StringIO(text)))


def plot_runs(histories: dict[str, list[dict]], out: Path) -> None:
    """Left: train loss (line) and eval loss (markers) per run. Right: learning rate per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i}"
        steps = [int(r["step"]) for r in rows]
        left.plot(steps, [float(r["train_loss"]) for r in rows], color=color, alpha=0.6, label=f"{name} train")
        evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
        if evals:
            left.plot(*zip(*evals), "o--", color=color, label=f"{name} eval")
        right.plot(steps, [float(r["learning_rate"]) for r in rows], color=color, label=name)
    left.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Loss")
    right.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="*", default=["HEAD", "workspace"], help="revisions or experiment names")
    parser.add_argument("--history", help="history CSV path inside the repo (default: dvc.yaml's train_history)")
    parser.add_argument("--out", type=Path, default=Path("dvc_plots/plots_diff.png"),
                        help="the PNG to write (default: beside dvc plots' HTML, which git ignores)")
    args = parser.parse_args(argv)
    history = args.history or str(pipeline_path("train_history"))
    plot_runs({rev: read_history(history, rev) for rev in args.revs}, args.out)
    print(f"wrote {args.out}")


def cli() -> None:
    """Console entry point (``qlorapipe-plot-diff``): a UserError is one red line and exit status 1."""
    from qlorapipe.console import run_stage

    run_stage(main, exit_when_done=False)  # a console command, callable in-process too


if __name__ == "__main__":
    cli()

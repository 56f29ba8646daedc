"""Gather what the exported model's card quotes from the stages' metrics: only figures a re-run reproduces.

    python stages/card.py --data-report metrics/data.json --train-metrics metrics/train.json \
        --eval-metrics metrics/eval.json --merge-metrics metrics/merge.json --out metrics/card.json

The export stage reads this file instead of the metrics themselves, whose seconds and memory change on
every run: a stage re-run that reproduces its figures does not run the export again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe.card import write_card_facts
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-report", type=Path, required=True)
    parser.add_argument("--train-metrics", type=Path, required=True)
    parser.add_argument("--eval-metrics", type=Path, required=True)
    parser.add_argument("--merge-metrics", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    inputs = (args.data_report, args.train_metrics, args.eval_metrics, args.merge_metrics)
    for path in inputs:
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro` to produce it")
    write_card_facts(*inputs, args.out)


if __name__ == "__main__":
    run_stage(main)

"""Read records, render and tokenize them, mask prompts, pack, and split train/eval.

    python stages/prepare.py --params params.yaml --base models/base \
        --out data/prepared --report metrics/data.json \
        --lengths metrics/data_lengths.csv --lengths-plot metrics/data_lengths.png

Reads the ``data`` section of params.yaml. Every record is checked before anything is
written: a bad one stops the stage with one line naming its file, row and the param that
fixes it, and data/prepared is left as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import prepare
from qlorapipe.console import run_stage
from qlorapipe.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True, help="model directory (its tokenizer is used)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the train and eval datasets")
    parser.add_argument("--report", type=Path, required=True, help="data report metrics (JSON)")
    parser.add_argument("--lengths", type=Path, required=True, help="length histogram CSV for dvc plots")
    parser.add_argument("--lengths-plot", type=Path, required=True, help="length histogram PNG")
    args = parser.parse_args(argv)
    outputs = prepare.Outputs(prepared=args.out, report=args.report, lengths=args.lengths,
                              lengths_plot=args.lengths_plot)
    prepare.run(load_section(args.params, "data"), args.base, outputs)


if __name__ == "__main__":
    # The fast tokenizer encodes a batch on all cores; this stage forks no workers.
    run_stage(main, tokenizer_threads=True)

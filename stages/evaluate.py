"""The 4-bit base with and without the adapter: held-out perplexity, task scores, stopping,
forgetting, lm-eval tasks and sample generations.

    python stages/evaluate.py --params params.yaml --base models/base --adapter models/adapter \
        --data data/prepared --metrics metrics/eval.json --samples metrics/samples.json \
        --scores-plot metrics/eval_scores.png

Reads the ``quantization`` and ``evaluate`` sections of params.yaml and the GPU memory budget
(``acceleration.memory_budget_gb``), checked before the model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import evaluate
from qlorapipe.console import run_stage
from qlorapipe.params import load_sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True, help="JSON with base and fine-tuned generations")
    parser.add_argument("--scores-plot", type=Path, required=True, help="PNG of the figures, base beside fine-tuned")
    args = parser.parse_args(argv)
    sections = load_sections(args.params, "quantization", "evaluate", "acceleration")
    evaluate.run(sections["quantization"], sections["evaluate"], args.base, args.adapter, args.data,
                 evaluate.Outputs(args.metrics, args.samples, args.scores_plot), sections["acceleration"].memory_budget_gb)


if __name__ == "__main__":
    run_stage(main)

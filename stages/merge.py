"""Merge the adapter into a standalone 16-bit model, and gate on its fidelity.

    python stages/merge.py --params params.yaml --base models/base --adapter models/adapter \
        --data data/prepared --out models/merged --metrics metrics/merge.json

Reads the ``quantization`` and ``merge`` sections of params.yaml, and the GPU memory budget
(``acceleration.memory_budget_gb``) every phase stays within. The base is dequantized
from 4-bit before merging, so the merged model computes what was trained; the stage
measures that on eval batches (and, for comparison, the naive merge into the original
16-bit base and, with merge.requantized_candidate, the merged model quantized again) and
fails when merge.max_logit_diff, merge.max_mean_logit_diff or merge.max_perplexity_change is
exceeded. It also times generation with base + adapter and with the merged model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import merge
from qlorapipe.console import run_stage
from qlorapipe.params import load_sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    sections = load_sections(args.params, "quantization", "merge", "acceleration")
    merge.run(sections["quantization"], sections["merge"], sections["acceleration"].memory_budget_gb, args.base,
              args.adapter, args.data, args.out, args.metrics)


if __name__ == "__main__":
    run_stage(main)

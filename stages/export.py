"""Write the deliverables chosen in export.formats: merged safetensors, GGUF files, ONNX models, the adapter alone.

    python stages/export.py --params params.yaml --merged models/merged --base models/base \
        --adapter models/adapter --data data/prepared --out models/export --metrics metrics/export.json \
        --card metrics/card.json

Reads the ``export`` section of params.yaml and the GPU memory budget
(``acceleration.memory_budget_gb``). Writes, in --out: the merged model with its
tokenizer and model card (safetensors), gguf/model-<type>.gguf for each gguf-<type> format
(k-quants quantized by llama.cpp), and adapter/ (the adapter alone). Each GGUF file runs in
llama.cpp: its logits on held-out rows are compared with the merged model's, its greedy
continuations of held-out prompts with base + adapter's; the figures go to --metrics, and a
file beyond the export section's gates fails the stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import export
from qlorapipe.console import run_stage
from qlorapipe.params import load_sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="each GGUF file measured in llama.cpp")
    parser.add_argument("--card", type=Path, required=True, help="what the model card quotes (the card stage's)")
    args = parser.parse_args(argv)
    inputs = export.Inputs(merged=args.merged, base=args.base, adapter=args.adapter, data=args.data, card=args.card)
    sections = load_sections(args.params, "export", "acceleration")
    export.run(sections["export"], inputs, args.out, args.metrics, sections["acceleration"].memory_budget_gb)


if __name__ == "__main__":
    run_stage(main)

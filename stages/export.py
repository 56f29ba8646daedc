"""Write the deliverables chosen in export.formats: merged safetensors, GGUF files, the adapter alone.

    python stages/export.py --params params.yaml --merged models/merged --adapter models/adapter \
        --data data/prepared --out models/export --metrics metrics/export.json \
        --data-report metrics/data.json --train-metrics metrics/train.json \
        --eval-metrics metrics/eval.json --merge-metrics metrics/merge.json

Reads the ``export`` section of params.yaml. Writes, in --out: the merged model with its
tokenizer and model card (safetensors), gguf/model-f16.gguf and gguf/model-q8_0.gguf, and
adapter/ (the adapter alone). Each GGUF file is read back with transformers and its logits
compared with the merged model's on eval batches; the differences go to --metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import export
from qlorapipe.console import run_stage
from qlorapipe.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="GGUF read-back fidelity")
    parser.add_argument("--data-report", type=Path, required=True)
    parser.add_argument("--train-metrics", type=Path, required=True)
    parser.add_argument("--eval-metrics", type=Path, required=True)
    parser.add_argument("--merge-metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    inputs = export.Inputs(merged=args.merged, adapter=args.adapter, data=args.data, data_report=args.data_report,
                           train_metrics=args.train_metrics, eval_metrics=args.eval_metrics,
                           merge_metrics=args.merge_metrics)
    export.run(load_section(args.params, "export"), inputs, args.out, args.metrics)


if __name__ == "__main__":
    run_stage(main)

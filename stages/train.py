"""Quantize-load the base model and train LoRA adapters on it (QLoRA).

    python stages/train.py --params params.yaml --base models/base --data data/prepared \
        --adapter models/adapter --metrics metrics/train.json \
        --history metrics/train_history.csv --curves metrics/training_curves.png \
        --log metrics/training_log.txt --checkpoints models/checkpoints --live metrics/train_live

Reads the ``quantization``, ``lora``, ``training``, ``acceleration`` and ``distributed`` sections
of params.yaml, and records ``data`` (the prompt template) with the adapter. Each step's metrics
go to --live through dvclive as soon as the step is done (``dvc exp show`` and DVC Studio follow
a run there); the other outputs are written when training ends. Killed midway, it
resumes from the last complete checkpoint in --checkpoints when run again with the same params,
data and base model (and discards checkpoints of any other run). With distributed.num_processes
> 1 it relaunches itself through ``accelerate launch`` on that many processes; only rank 0
writes the outputs, and all ranks write and resume each checkpoint together. On CUDA in one
process, each micro-batch's forward and backward is a CUDA graph replay, and with
acceleration.uncheckpointed_layers: auto the first micro-batch measures how many blocks can keep
their activations within acceleration.memory_budget_gb (see qlorapipe.train).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlorapipe import train
from qlorapipe.console import run_stage
from qlorapipe.params import load_sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory to write")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-step CSV for dvc plots")
    parser.add_argument("--curves", type=Path, required=True, help="training curves PNG")
    parser.add_argument("--log", type=Path, required=True, help="plain-text training log")
    parser.add_argument("--checkpoints", type=Path, required=True, help="persisted directory of resumable checkpoints")
    parser.add_argument("--live", type=Path, required=True, help="dvclive directory: each step's metrics as it is done")
    args = parser.parse_args(argv)
    sections = load_sections(args.params, "quantization", "lora", "training", "acceleration", "distributed", "data")
    outputs = train.Outputs(adapter=args.adapter, metrics=args.metrics, history=args.history, curves=args.curves,
                            log=args.log, checkpoints=args.checkpoints, live=args.live)
    relaunch = (Path(__file__), sys.argv[1:] if argv is None else argv)
    train.run(train.Sections(**sections), args.base, args.data, outputs, relaunch)


if __name__ == "__main__":
    run_stage(main)

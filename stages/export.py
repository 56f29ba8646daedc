"""Write the deliverable: the merged model in safetensors with its tokenizer and a model card.

    python stages/export.py --params params.yaml --merged models/merged --out models/export \
        --data-report metrics/data.json --train-metrics metrics/train.json \
        --eval-metrics metrics/eval.json --merge-metrics metrics/merge.json

Reads the ``export`` section of params.yaml.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlorapipe.adapters import ADAPTER_RECORD
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.model_card import render_model_card
from qlorapipe.outputs import atomic_dir, read_json
from qlorapipe.params import load_section

logger = logging.getLogger("export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-report", type=Path, required=True)
    parser.add_argument("--train-metrics", type=Path, required=True)
    parser.add_argument("--eval-metrics", type=Path, required=True)
    parser.add_argument("--merge-metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_section(args.params, "export")
    for path in (args.merged / "config.json", args.data_report, args.train_metrics, args.eval_metrics,
                 args.merge_metrics):
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro` to produce it")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.merged)  # keeps the saved dtype
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    record = read_json(args.merged / ADAPTER_RECORD)
    metrics = {"train": read_json(args.train_metrics), "eval": read_json(args.eval_metrics),
               "merge": read_json(args.merge_metrics)}
    with atomic_dir(args.out) as out:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=params.max_shard_size)
        tokenizer.save_pretrained(out)
        (out / ADAPTER_RECORD).write_text((args.merged / ADAPTER_RECORD).read_text())
        (out / "README.md").write_text(render_model_card(record, metrics, read_json(args.data_report)))
    logger.info("Exported %s (%s) to %s", record.get("base_model", {}).get("repo_id"), params.format, args.out)


if __name__ == "__main__":
    run_stage(main)

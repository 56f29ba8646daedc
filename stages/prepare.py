"""Tokenize the corpus into fixed-length causal-LM chunks with a seeded train/eval split.

    python stages/prepare.py --params params.yaml --base models/base \
        --out data/prepared --report metrics/data.json

Reads the ``data`` section of params.yaml.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlorapipe import data
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir, write_json
from qlorapipe.params import load_section

logger = logging.getLogger("prepare")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True, help="model directory (its tokenizer is used)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the train and eval datasets")
    parser.add_argument("--report", type=Path, required=True, help="data report metrics (JSON)")
    args = parser.parse_args(argv)
    params = load_section(args.params, "data")

    from transformers import AutoTokenizer

    documents = data.load_documents(params)
    train_texts, eval_texts = data.split_documents(documents.texts, params.eval_fraction, params.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    report = {"documents_empty_skipped": documents.empty_skipped, "max_length": params.max_length}
    with atomic_dir(args.out) as out:
        for split, texts in ((data.TRAIN_SPLIT, train_texts), (data.EVAL_SPLIT, eval_texts)):
            chunks, stats = data.tokenize_and_chunk(texts, tokenizer, params.max_length)
            if not chunks:
                raise UserError(
                    f"the {split} split has {stats['tokens']} tokens, fewer than data.max_length="
                    f"{params.max_length}: lower data.max_length or add data"
                )
            data.save_chunks(chunks, out / split)
            report[split] = stats
            logger.info("%s: %d documents, %d tokens, %d chunks of %d tokens, %d tokens dropped",
                        split, stats["documents"], stats["tokens"], stats["chunks"], params.max_length,
                        stats["tokens_dropped"])
    write_json(args.report, report)


if __name__ == "__main__":
    run_stage(main)

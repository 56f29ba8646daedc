"""Read the dataset, render its format, tokenize, mask prompts, pack, and split train/eval.

    python stages/prepare.py --params params.yaml --base models/base \
        --out data/prepared --report metrics/data.json \
        --lengths metrics/data_lengths.csv --lengths-plot metrics/data_lengths.png

Reads the ``data`` section of params.yaml. Every record is checked before anything is
written: a bad one stops the stage with one line naming its file, row and the param that
fixes it, and data/prepared is left as it was.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from qlorapipe import data, data_report, examples, sources
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
    parser.add_argument("--lengths", type=Path, required=True, help="length histogram CSV for dvc plots")
    parser.add_argument("--lengths-plot", type=Path, required=True, help="length histogram PNG")
    args = parser.parse_args(argv)
    params = load_section(args.params, "data")
    # The fast tokenizer encodes a batch on all cores. Stages turn that off by default (a
    # fork after the thread pool started can deadlock); this stage forks no workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    from transformers import AutoTokenizer

    records, origin = sources.load_records(params)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    concat = params.format == "text" and params.text_mode == "concat"
    if concat:
        all_examples, counts = examples.text_documents(records, tokenizer, params)
    else:
        all_examples, counts = examples.build_examples(records, tokenizer, params)
    if len(all_examples) < 2:
        raise UserError(f"{origin}: {len(all_examples)} usable example(s) out of {counts.records} records "
                        f"(empty {counts.empty_skipped}, duplicates {counts.duplicates}, dropped "
                        f"{counts.dropped_too_long + counts.dropped_all_masked}); need at least 2: add data "
                        "or check data.format and its column params")
    train_examples, eval_examples = examples.split(all_examples, params.eval_fraction, params.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = _counts_report(counts, params)
    with atomic_dir(args.out) as out:
        for split, split_examples in ((data.TRAIN_SPLIT, train_examples), (data.EVAL_SPLIT, eval_examples)):
            tail = 0
            if concat:
                rows, tail = examples.chunk_stream(split_examples, params.max_length)
            elif params.packing:
                rows = examples.pack_rows(split_examples, params.max_length, pad_id)
            else:
                rows = examples.pad_rows(split_examples, pad_id)
            if not rows.input_ids:
                tokens = sum(len(e.input_ids) for e in split_examples)
                raise UserError(f"the {split} split has {tokens} tokens, fewer than data.max_length="
                                f"{params.max_length}: lower data.max_length or add data")
            data.save_rows(rows.input_ids, rows.labels, rows.position_ids, out / split)
            report[split] = _split_report(split_examples, rows, tail)
            logger.info("%s: %d examples, %d tokens (%d trained) in %d rows of %d tokens, %.1f%% padding",
                        split, len(split_examples), report[split]["tokens"], report[split]["trained_tokens"],
                        len(rows.input_ids), len(rows.input_ids[0]), 100 * report[split]["padding_share"])
    histogram = data_report.length_histogram(counts.lengths, params.max_length)
    data_report.write_histogram_csv(histogram, args.lengths)
    data_report.plot_histogram(histogram, params.max_length, args.lengths_plot)
    write_json(args.report, report)


def _counts_report(counts: examples.Counts, params) -> dict:
    if counts.truncated or counts.dropped_too_long:
        logger.warning("%d examples longer than data.max_length=%d were %s (first: %s); see data.too_long",
                       counts.truncated or counts.dropped_too_long, params.max_length,
                       "truncated" if counts.truncated else "dropped", counts.first_too_long)
    if counts.dropped_all_masked:
        logger.warning("%d examples had every label masked and were dropped (first: %s)",
                       counts.dropped_all_masked, counts.first_all_masked)
    for what, n in (("blank", counts.empty_skipped), ("duplicate", counts.duplicates)):
        if n:
            logger.info("%d %s records skipped", n, what)
    kept = max(1, counts.examples + counts.dropped_too_long + counts.dropped_all_masked)
    return {
        "format": params.format,
        "max_length": params.max_length,
        "records": counts.records,
        "empty_skipped": counts.empty_skipped,
        "duplicates": counts.duplicates,
        "truncated": counts.truncated,
        "dropped_too_long": counts.dropped_too_long,
        "dropped_all_masked": counts.dropped_all_masked,
        "truncated_share": round(counts.truncated / kept, 5),
        "dropped_share": round((counts.dropped_too_long + counts.dropped_all_masked) / kept, 5),
    }


def _split_report(split_examples, rows, tail: int) -> dict:
    cells = len(rows.input_ids) * len(rows.input_ids[0])
    return {
        "examples": len(split_examples),
        "rows": len(rows.input_ids),
        "tokens": sum(len(e.input_ids) for e in split_examples),
        "trained_tokens": sum(1 for row in rows.labels for label in row[1:] if label != examples.IGNORE),
        "padding_share": round(rows.padding_tokens / cells, 5),
        "tokens_dropped": tail,
    }


if __name__ == "__main__":
    run_stage(main)

"""Prepare step: read records, render and tokenize them, mask prompts, pack, and split train/eval."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import data
from qlorapipe.errors import UserError
from qlorapipe.local_data import too_few_records
from qlorapipe.outputs import atomic_dir, write_json
from qlorapipe.params import DataParams
from qlorapipe.prepare import examples, report, rows, sources
from qlorapipe.records import read_source_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where the prepare step writes."""

    prepared: Path  # the train and eval datasets (data/prepared)
    report: Path  # the data report metrics (JSON)
    lengths: Path  # the length histogram CSV, for dvc plots
    lengths_plot: Path  # the length histogram PNG


# Tokenizer classes that are transformers' generic fast tokenizer under one name or another.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(base_dir: Path, trust_remote_code: bool = False):
    """The base's tokenizer, as ``AutoTokenizer`` loads it.

    One saved as the generic fast tokenizer, without code of its own, is loaded by that class
    directly: ``AutoTokenizer`` reads the model's config first, and importing the config classes
    imports torch, which nothing else in this stage needs (the tokenizer took 4.8 s to import and
    load that way on 2 CPU cores, 1.0 s this way; tests/test_data.py checks both give the same
    tokenizer). Every other tokenizer goes through ``AutoTokenizer``.
    """
    config_file = base_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in _GENERIC_TOKENIZERS and "auto_map" not in config:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(base_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)


def run(params: DataParams, base_dir: Path, out: Outputs) -> dict:
    """Turn the records ``params`` names into tokenized train and eval datasets.

    Every record is checked before anything is written: a bad one stops the step with one
    line naming its file, row and the param that fixes it, and ``out.prepared`` is left as it was.

    Args:
        params: the data section.
        base_dir: the base model directory (its tokenizer and chat template are used).
        out: the output paths.

    Returns:
        The data report written to ``out.report``.

    Raises:
        UserError: a bad record, too few examples, or a split shorter than one row.
    """
    records, origin = sources.load_records(params)
    concat = params.format == "text" and params.text_mode == "concat"
    if len(records) < 2 and not concat:  # one text document is still a stream to split (below)
        raise UserError(too_few_records(origin, len(records)))
    trust = read_source_record(base_dir).trust_remote_code
    tokenizer = load_tokenizer(base_dir, trust)
    if concat:
        all_examples, counts = examples.text_documents(records, tokenizer, params)
    else:
        all_examples, counts = examples.build_examples(records, tokenizer, params)
    minimum = 1 if concat else 2
    if len(all_examples) < minimum:
        raise UserError(f"{origin}: {len(all_examples)} usable example(s) out of {counts.records} records "
                        f"(empty {counts.empty_skipped}, duplicates {counts.duplicates}, dropped "
                        f"{counts.dropped_too_long + counts.dropped_all_masked}); need at least {minimum}: add data "
                        "or check data.format and its column params")
    if len(all_examples) == 1:  # one text document: its token stream is split instead
        train_part, held_out = rows.split_stream(all_examples[0], params.eval_fraction, params.max_length)
        train_examples, eval_examples = [train_part], [held_out]
    else:
        train_examples, eval_examples = rows.split(all_examples, params.eval_fraction, params.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_report = report.counts_report(counts, params)
    tasks = held_out_tasks(eval_examples, tokenizer.eos_token_id)
    with atomic_dir(out.prepared) as prepared:
        for split, split_examples in ((data.TRAIN_SPLIT, train_examples), (data.EVAL_SPLIT, eval_examples)):
            tail = 0
            if concat:
                split_rows, tail = rows.chunk_stream(split_examples, params.max_length)
            elif params.packing:
                split_rows = rows.pack_rows(split_examples, params.max_length, pad_id)
            else:
                split_rows = rows.pad_rows(split_examples, pad_id)
            if not split_rows.input_ids:
                tokens = sum(len(e.input_ids) for e in split_examples)
                raise UserError(f"the {split} split has {tokens} tokens, fewer than data.max_length="
                                f"{params.max_length}: lower data.max_length or add data")
            data.save_rows(split_rows.input_ids, split_rows.labels, split_rows.position_ids, prepared / split)
            if split == data.EVAL_SPLIT:
                data.save_tasks(tasks, prepared)
            stats = data_report[split] = report.split_report(split_examples, split_rows, tail)
            logger.info("%s: %d examples, %d tokens (%d trained) in %d rows of %d tokens, %.1f%% padding",
                        split, len(split_examples), stats["tokens"], stats["trained_tokens"],
                        len(split_rows.input_ids), len(split_rows.input_ids[0]), 100 * stats["padding_share"])
    data_report["eval"]["task_examples"] = len(tasks)
    if params.format != "text" and len(tasks) < len(eval_examples):
        logger.warning("%d of %d held-out examples have no prompt before their answer or a truncated answer: the "
                       "evaluate stage scores the other %d (raise data.max_length to keep long ones)",
                       len(eval_examples) - len(tasks), len(eval_examples), len(tasks))
    histogram = report.length_histogram(counts.lengths, params.max_length)
    report.write_histogram_csv(histogram, out.lengths)
    report.plot_histogram(histogram, params.max_length, out.lengths_plot)
    write_json(out.report, data_report)
    return data_report


def held_out_tasks(eval_examples: list[examples.Example], eos: int | None) -> list[dict]:
    """The held-out examples whose whole completion survived, as prompt and reference tokens.

    The reference ends before its first EOS (the model's signal to stop, not part of the answer).
    """
    tasks = []
    for example in eval_examples:
        if example.completion is None or example.completion[0] == 0:
            continue
        start, end = example.completion
        reference = example.input_ids[start:end]
        if eos in reference:
            reference = reference[: reference.index(eos)]
        tasks.append({"where": example.where, "prompt_ids": example.input_ids[:start], "reference_ids": reference})
    return tasks

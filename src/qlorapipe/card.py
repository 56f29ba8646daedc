"""What the exported model's card quotes, gathered from the stages' metrics (the ``card`` stage).

The metrics of train, evaluate and merge also hold what changes on every run (seconds, memory,
tokens per second, the machine). The card quotes only figures a re-run reproduces: losses,
perplexities, the merge's fidelity, the data's counts. Written to their own file, which is all the
export stage reads of the metrics, a stage re-run that reproduces them (a change of
``evaluate.max_new_tokens``, a merge diagnostic turned off) leaves the file byte for byte as it was,
and DVC does not run the export again.
"""

from __future__ import annotations

from pathlib import Path

from qlorapipe.outputs import read_json, write_json

TRAIN_FIGURES = ("train_loss", "eval_loss", "best_step", "steps", "stopped_early", "tokens_trained",
                 "trainable_params", "total_params", "global_batch_size")
DATA_FIGURES = ("format", "max_length")
SPLIT_FIGURES = ("rows", "examples")


def card_facts(data_report: dict, train: dict, evaluation: dict, merge: dict) -> dict:
    """The figures the model card quotes, from the four stages' metrics."""
    return {
        "data": {**{k: data_report.get(k) for k in DATA_FIGURES},
                 **{split: {k: data_report.get(split, {}).get(k) for k in SPLIT_FIGURES} for split in ("train", "eval")}},
        "train": {k: train.get(k) for k in TRAIN_FIGURES},
        "eval": {model: {k: evaluation.get(model, {}).get(k) for k in ("loss", "perplexity")}
                 for model in ("base", "finetuned")},
        "merge": {"dtype": merge.get("dtype"),
                  **{k: merge.get("merged", {}).get(k) for k in ("max_logit_diff", "perplexity_change")}},
    }


def write_card_facts(data_report: Path, train: Path, evaluation: Path, merge: Path, out: Path) -> dict:
    """Read the four metrics files and write what the card quotes to ``out`` (JSON)."""
    facts = card_facts(read_json(data_report), read_json(train), read_json(evaluation), read_json(merge))
    write_json(out, facts)
    return facts

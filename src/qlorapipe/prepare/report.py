"""The data report: counts of what was kept, dropped and trained on (metrics/data.json), and the
length histogram as a CSV for `dvc plots` and a PNG (offline viewing)."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from qlorapipe.data import IGNORE_INDEX
from qlorapipe.outputs import save_figure_atomic, write_text_atomic
from qlorapipe.params import DataParams
from qlorapipe.prepare.examples import Counts, Example
from qlorapipe.prepare.rows import Rows

logger = logging.getLogger(__name__)

N_BINS = 32


def length_histogram(lengths: list[int], max_length: int) -> list[tuple[int, int]]:
    """Counts of example lengths (tokens, before truncation) in equal-width bins.

    Returns:
        (bin upper edge in tokens, examples) pairs; the bins cover 1..max(longest, max_length).
    """
    top = max([max_length, *lengths])
    width = max(1, math.ceil(top / N_BINS))
    counts = [0] * math.ceil(top / width)
    for length in lengths:
        counts[min(len(counts) - 1, (length - 1) // width)] += 1
    return [((i + 1) * width, n) for i, n in enumerate(counts)]


def write_histogram_csv(histogram: list[tuple[int, int]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("length", "examples"))
    writer.writerows(histogram)
    write_text_atomic(path, buffer.getvalue())


def plot_histogram(histogram: list[tuple[int, int]], max_length: int, path: Path) -> None:
    """Bars of examples per length bin, with max_length marked (longer ones are truncated or dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = histogram[0][0]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([edge - width for edge, _ in histogram], [n for _, n in histogram], width=width, align="edge")
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"data.max_length = {max_length}")
    ax.set(xlabel="example length (tokens, before truncation)", ylabel="examples", title="Example lengths")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def counts_report(counts: Counts, params: DataParams) -> dict:
    """What happened to the records (kept, skipped, truncated, dropped), logged and as metrics."""
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


def split_report(split_examples: list[Example], rows: Rows, tail: int) -> dict:
    """One split's examples, rows, tokens (all and trained), padding share and dropped tail."""
    cells = len(rows.input_ids) * len(rows.input_ids[0])
    return {
        "examples": len(split_examples),
        "rows": len(rows.input_ids),
        "tokens": sum(len(e.input_ids) for e in split_examples),
        "trained_tokens": sum(1 for row in rows.labels for label in row[1:] if label != IGNORE_INDEX),
        "padding_share": round(rows.padding_tokens / cells, 5),
        "tokens_dropped": tail,
    }

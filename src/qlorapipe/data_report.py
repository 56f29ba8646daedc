"""The data report's length histogram: a CSV for `dvc plots` and a PNG (offline viewing)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from qlorapipe.outputs import write_text_atomic

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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # fixed metadata: identical bytes for identical data
    plt.close(fig)

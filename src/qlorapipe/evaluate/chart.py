"""The evaluate step's PNG: task scores and perplexities, base beside fine-tuned."""

from __future__ import annotations

from pathlib import Path

from qlorapipe.outputs import save_figure_atomic

# Task figures drawn on one 0-100 axis: shares are shown as percentages.
TASK_BARS = (("exact_match", "exact match %", 100), ("rouge_l", "ROUGE-L x100", 100), ("bleu", "BLEU", 1),
             ("chrf", "chrF", 1), ("stop_share", "stopped %", 100))


def plot_scores(metrics: dict, general_corpus: str | None, path: Path) -> None:
    """Grouped bars: task scores (when there are any) and held-out / general perplexity, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ("base", "finetuned")
    has_tasks = "task" in metrics["base"]
    fig, axes = plt.subplots(1, 2 if has_tasks else 1, figsize=(11 if has_tasks else 5.5, 4), squeeze=False)
    width = 0.38
    if has_tasks:
        ax = axes[0][0]
        for k, row in enumerate(rows):
            values = [metrics[row]["task"][key] * scale for key, _, scale in TASK_BARS]
            positions = [i + (k - 0.5) * width for i in range(len(TASK_BARS))]
            bars = ax.bar(positions, values, width, label=row)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(TASK_BARS)), [label for _, label, _ in TASK_BARS], fontsize=8)
        ax.set(ylim=(0, 105), title=f"Held-out answers ({metrics['task_examples']} examples)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    ax = axes[0][-1]
    groups = [("held-out", lambda row: metrics[row]["perplexity"])]
    if "general" in metrics["base"]:
        groups.append((f"general ({general_corpus})", lambda row: metrics[row]["general"]["perplexity"]))
    for k, row in enumerate(rows):
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(groups))], [value(row) for _, value in groups], width,
                      label=row)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set(ylabel="perplexity (lower is better)", title="Perplexity")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)

"""Command-line tools beside the pipeline: ``qlorapipe-chat`` (chat) and ``qlorapipe-plot-diff`` (plot_diff)."""

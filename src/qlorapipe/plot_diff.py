"""``python -m qlorapipe.plot_diff``: the documented spelling of ``qlorapipe-plot-diff`` (qlorapipe.cli.plot_diff)."""

if __name__ == "__main__":
    from qlorapipe.cli.plot_diff import cli

    cli()

"""Put the base model into a plain Hugging Face directory.

    python stages/download.py --params params.yaml --out models/base

Reads the ``model`` section of params.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import download
from qlorapipe.console import run_stage
from qlorapipe.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    args = parser.parse_args(argv)
    download.run(load_section(args.params, "model"), args.out)


if __name__ == "__main__":
    run_stage(main)

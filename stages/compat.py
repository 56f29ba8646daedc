"""Check that the base model can do what params.yaml asks, before any data is prepared.

    python stages/compat.py --params params.yaml --base models/base --out metrics/compat_check.txt

Reads the base model's config and tokenizer (no weights) and the sections whose values depend
on the model: GGUF formats for its architecture and tokenizer, LoRA targets among its modules,
data.max_length within its positions, chat templates it has. Prepare depends on --out, and every
later stage on prepare, so a param this model cannot honour stops `dvc repro` here, naming the
key, before DVC deletes any later stage's outputs. --out's text never changes, so a passing
check re-runs nothing downstream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe import compat
from qlorapipe.console import run_stage
from qlorapipe.outputs import write_text_atomic
from qlorapipe.params import load_sections
from qlorapipe.records import read_source_record

CHECKED = "The base model can do what params.yaml asks. Prepare depends on this file.\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True, help="the base model directory")
    parser.add_argument("--out", type=Path, required=True, help="the file that records the check passed")
    args = parser.parse_args(argv)
    sections = load_sections(args.params, "data", "quantization", "lora", "evaluate", "export")
    compat.check(args.base, read_source_record(args.base).trust_remote_code, **sections)
    write_text_atomic(args.out, CHECKED)


if __name__ == "__main__":
    run_stage(main)

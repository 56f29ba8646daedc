"""Check every section of params.yaml before any other stage runs.

    python stages/check.py --params params.yaml --out metrics/params_check.txt

Reads every section, and looks at the local files params name (model.local_path, data.path, a
general corpus given as a path). The download stage depends on --out, and every other stage on
download, so DVC runs this stage first whenever params.yaml changes: bad params stop `dvc repro`
here, with every problem in one message, before DVC deletes any other stage's outputs to run it.
--out's text never changes, so a passing check re-runs nothing downstream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.inputs import local_input_problems
from qlorapipe.outputs import write_text_atomic
from qlorapipe.params import load_sections

CHECKED = ("params.yaml passed every check. The pipeline depends on this file, so that bad params stop "
           "`dvc repro` before any output is touched.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="the file that records the check passed")
    args = parser.parse_args(argv)
    sections = load_sections(args.params, "model", "data", "quantization", "lora", "training", "acceleration",
                             "distributed", "evaluate", "merge", "export")
    problems = local_input_problems(sections)
    if problems:
        raise UserError("; ".join(problems))
    write_text_atomic(args.out, CHECKED)


if __name__ == "__main__":
    run_stage(main)

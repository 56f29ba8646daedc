"""Check every section of params.yaml before any other stage runs.

    python stages/check.py --params params.yaml --out metrics/params_check.txt

Reads every section, and looks at the local files params name (model.local_path, data.path and its
first records, a general corpus given as a path) and at evaluate.lm_eval_tasks (lm-eval's task index,
only when tasks are named). The download stage depends on --out, and every other stage on download,
so DVC runs this stage first whenever params.yaml changes: bad params stop `dvc repro` here, with
every problem in one message, before DVC deletes any other stage's outputs to run it. --out's text
never changes, so a passing check re-runs nothing downstream.

It refuses ONNX builder options that onnxruntime-genai's builder does not document (it would ignore
them) for the ONNX formats exported. It also warns, without stopping, about params that cannot act
(evaluate.min_stop_share without held-out answers, builder options for an ONNX format not exported) or
act where they may not be wanted (lora.dropout on PiSSA's principal components),
and about local inputs that are not among the deps of the stage reading them in dvc.yaml (DVC would
not re-run that stage when they change).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlorapipe import harness, onnx_builder
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.inputs import inert_gate_problem, local_input_problems, untracked_inputs
from qlorapipe.outputs import write_text_atomic
from qlorapipe.params import ExportParams, load_sections, pissa_dropout_problem

CHECKED = ("params.yaml passed every check. The pipeline depends on this file, so that bad params stop "
           "`dvc repro` before any output is touched.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="the file that records the check passed")
    parser.add_argument("--pipeline", type=Path, default=Path("dvc.yaml"),
                        help="dvc.yaml, whose stages' deps local inputs should be among")
    args = parser.parse_args(argv)
    try:
        sections = load_sections(args.params, "model", "data", "quantization", "lora", "training", "acceleration",
                                 "distributed", "evaluate", "merge", "export")
    except UserError as invalid:
        raise UserError("; ".join([str(invalid), *inputs_of_valid_sections(args.params)])) from None
    problems = local_input_problems(sections)
    try:
        harness.check_tasks(sections["evaluate"].lm_eval_tasks)
    except UserError as problem:
        problems.append(str(problem))
    export = sections["export"]
    onnx = [f.removeprefix("onnx-") for f in export.formats if f.startswith("onnx-")]
    if problem := onnx_builder.unknown_options_problem(export.onnx_builder_options, onnx):
        problems.append(problem)
    if problems:
        raise UserError("; ".join(problems))
    log = logging.getLogger("qlorapipe.check")
    for warning in [inert_gate_problem(sections["data"], sections["evaluate"]),
                    pissa_dropout_problem(sections["lora"]),
                    onnx_builder.unused_options_warning(export.onnx_builder_options, export.formats,
                                                        ExportParams().onnx_builder_options),
                    *untracked_inputs(sections, args.pipeline)]:
        if warning:
            log.warning(warning)
    write_text_atomic(args.out, CHECKED)


def inputs_of_valid_sections(params: Path) -> list[str]:
    """The local inputs' problems when the model, data and evaluate sections are valid on their own: reported
    with the params' problems, so that one run shows them all."""
    try:
        sections = load_sections(params, "model", "data", "evaluate")
    except UserError:
        return []
    return local_input_problems(sections)


if __name__ == "__main__":
    run_stage(main)

"""Run a stage script with its GPU memory capped, as on a GPU with that much free for torch.

    python benchmarks/capped_stage.py CAP_GB stages/train.py --params ... (the stage's own arguments)

``torch.cuda.set_per_process_memory_fraction`` at CAP_GB (the caching allocator's reserve included): when a
stage reaches it, the allocator frees what it has cached and retries, then runs out of memory. The CUDA context
and what libraries allocate beside torch are outside the cap, as they are outside ``memory_budget_gb``. The
allocator's settings are the stage's own (``use_expandable_segments``), made before the cap initializes CUDA. On
an out of memory the traceback and the allocator's summary are printed before the stage's one line. Used by
``train_stage_time.py --gpu-cap`` and ``pipeline_gpu.py --gpu-cap``.
"""

import runpy
import sys
from pathlib import Path


def interpreter_args(cap_gb: float) -> list[str]:
    """What follows the interpreter, before a stage script and its arguments, to run that stage capped at
    ``cap_gb``: this script and the cap."""
    return [str(Path(__file__).resolve()), str(cap_gb)]


def main() -> None:
    from qlorapipe.startup import use_expandable_segments

    use_expandable_segments()  # before anything initializes CUDA
    import torch

    cap_gb, sys.argv = float(sys.argv[1]), sys.argv[2:]
    if torch.cuda.is_available():
        cap(cap_gb)
    runpy.run_path(sys.argv[0], run_name="__main__")  # without a GPU there is nothing to cap


def cap(cap_gb: float) -> None:
    """Cap this process's GPU memory at ``cap_gb`` and make the stage's out-of-memory line say where it ran out."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total))
    from qlorapipe import console

    said = console.out_of_memory

    def out_of_memory(exc):  # where it ran out and the allocator's figures, before the stage's one line
        line = said(exc)
        if line is not None:
            import traceback

            traceback.print_exception(exc, limit=-12)
            print(str(exc), torch.cuda.memory_summary(abbreviated=True), sep="\n", file=sys.stderr)
        return line

    console.out_of_memory = out_of_memory


if __name__ == "__main__":
    main()

"""Rules that span sections of params.yaml: every one lives here, none in the steps.

A section's ``check()`` sees only its own values; a rule here reads two or more sections and
applies when all of them are loaded together (``load_sections``). Each rule is also a
function of its own, so code that holds the sections can ask the same question and get the
same message.
"""

from __future__ import annotations

from typing import Any

from qlorapipe.params.sections import TrainingParams


def accumulation_problem(training: TrainingParams, num_processes: int) -> str | None:
    """Why ``training.gradient_accumulation_steps`` cannot be split among ``num_processes``, or None.

    Each process accumulates its share of the step's micro-batches, so the global batch
    (per-device batch x accumulation x processes) stays what params.yaml says whatever the
    number of processes.
    """
    accumulation = training.gradient_accumulation_steps
    if accumulation % num_processes == 0:
        return None
    return (
        f"training.gradient_accumulation_steps ({accumulation}) must be a multiple of "
        f"distributed.num_processes ({num_processes}) so the global batch of "
        f"{training.per_device_batch_size} x {accumulation} chunks stays the same on {num_processes} processes: "
        f"set training.gradient_accumulation_steps to {num_processes * max(1, accumulation // num_processes)} "
        f"(and lower training.per_device_batch_size to keep the global batch)"
    )


def cross_section_problems(sections: dict[str, Any]) -> list[str]:
    """Every problem between the sections in ``sections`` (name to dataclass); rules whose
    sections are not all there are skipped."""
    problems = []
    if "training" in sections and "distributed" in sections:
        training, processes = sections["training"], sections["distributed"].num_processes
        # Values the sections' own checks refuse are reported there, not here again.
        if processes >= 1 and training.gradient_accumulation_steps >= 1:
            problems.append(accumulation_problem(training, processes))
    return [p for p in problems if p]

"""Typed, validated sections of params.yaml.

Each section of params.yaml loads into one frozen dataclass (sections.py). The dataclass is
the schema: its fields are the allowed keys, their annotations the allowed types, its
defaults params.yaml's values, and ``check()`` lists the problems among the section's own
values. Rules between sections (training with distributed, lora with quantization) live in
rules.py. Loading (loading.py) reports every problem of every section asked for in one message: unknown
sections and keys, with the nearest valid name suggested so a typo never silently falls back
to a default; values of the wrong type; failed checks; and broken rules between sections.
"""

from qlorapipe.params.loading import load_section, load_sections, parse_section, read_params_file
from qlorapipe.params.rules import (
    accumulation_problem,
    cross_section_problems,
    lora_init_distributed_problem,
    lora_init_problem,
    pissa_dropout_problem,
)
from qlorapipe.params.sections import (
    CHAT_ROLES,
    EXPORT_FORMATS,
    SECTIONS,
    AccelerationParams,
    DataParams,
    DistributedParams,
    EvaluateParams,
    ExportParams,
    LoraParams,
    MergeParams,
    ModelParams,
    QuantizationParams,
    TrainingParams,
)

__all__ = [
    "CHAT_ROLES",
    "EXPORT_FORMATS",
    "SECTIONS",
    "AccelerationParams",
    "DataParams",
    "DistributedParams",
    "EvaluateParams",
    "ExportParams",
    "LoraParams",
    "MergeParams",
    "ModelParams",
    "QuantizationParams",
    "TrainingParams",
    "accumulation_problem",
    "cross_section_problems",
    "load_section",
    "load_sections",
    "lora_init_distributed_problem",
    "lora_init_problem",
    "pissa_dropout_problem",
    "parse_section",
    "read_params_file",
]

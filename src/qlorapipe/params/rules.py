"""Rules that span sections of params.yaml: every one lives here, none in the steps.

A section's ``check()`` sees only its own values; a rule here reads two or more sections and
applies when all of them are loaded together (``load_sections``). Each rule is also a
function of its own, so code that holds the sections can ask the same question and get the
same message.
"""

from __future__ import annotations

from typing import Any

from qlorapipe.params.sections import (
    DistributedParams,
    LoraParams,
    QuantizationParams,
    TrainingParams,
)


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


def general_corpus_problem(data_source: str, general_corpus: str | None) -> str | None:
    """Why ``evaluate.general_corpus`` cannot measure forgetting with this training data, or None."""
    if general_corpus is None or general_corpus != data_source:
        return None
    other = "builtin:python-docs" if general_corpus == "builtin:chatterbot" else "builtin:chatterbot"
    return (f"evaluate.general_corpus is the training data ({general_corpus}), so it cannot show what was "
            f"forgotten: set it to {other}, a local .txt file, or null")


def lora_init_problem(lora: LoraParams, quantization: QuantizationParams) -> str | None:
    """Why ``lora.init`` cannot start from the base ``quantization.load_in`` loads, or None."""
    if lora.init == "pissa" and quantization.load_in != "none":
        # peft's pissa_init refuses quantized weights: it subtracts B A from the base weight itself.
        return (f"lora.init pissa needs a 16-bit base but quantization.load_in is {quantization.load_in}: set "
                "quantization.load_in: none, or use lora.init: loftq with quantization.load_in: 4bit")
    if lora.init == "loftq" and quantization.load_in != "4bit":
        return (f"lora.init loftq fits the adapter to a 4-bit base's quantization error but quantization.load_in is "
                f"{quantization.load_in}: set quantization.load_in: 4bit, or lora.init: default "
                "(pissa for load_in: none)")
    return None


def pissa_dropout_problem(lora: LoraParams) -> str | None:
    """A line when lora.dropout acts on PiSSA's principal components (docs/training.md): the training loss
    then starts above the base's and is noisier."""
    if lora.init != "pissa" or not lora.dropout:
        return None
    return (f"lora.dropout {lora.dropout:g} acts on PiSSA's principal components: the training loss starts above the "
            "base's and is noisier (evaluation has no dropout); the PiSSA paper trains with lora.dropout: 0")


def lora_init_distributed_problem(lora: LoraParams, distributed: DistributedParams) -> str | None:
    """Why ``lora.init`` cannot train on these processes, or None.

    A PiSSA adapter is converted to a plain LoRA when it is saved (peft's save_pretrained with
    path_initial_model_for_weight_conversion), which needs the whole adapter in one process; under
    FSDP each rank holds a shard and the adapter is written from gathered tensors instead.
    """
    if lora.init == "pissa" and distributed.strategy == "fsdp" and distributed.num_processes > 1:
        return ("lora.init pissa is not supported with distributed.strategy fsdp (the adapter is converted to a "
                "plain LoRA from the whole model when saved): set distributed.strategy: ddp, or "
                "distributed.num_processes: 1")
    return None


def fsdp_adapter_problem(lora: LoraParams, distributed: DistributedParams) -> str | None:
    """Why FSDP cannot save this adapter whole, or None: its ranks gather the LoRA matrices into the saved adapter
    (``distributed.AcceleratedProcesses.adapter_state_dict``), not trained biases or modules_to_save copies."""
    if distributed.strategy != "fsdp" or distributed.num_processes <= 1:
        return None
    extra = [f"lora.bias {lora.bias}"] if lora.bias != "none" else []
    extra += [f"lora.modules_to_save {list(lora.modules_to_save)}"] if lora.modules_to_save else []
    if not extra:
        return None
    return (f"{' and '.join(extra)} with distributed.strategy fsdp: the saved adapter would lack them (FSDP saves "
            "the LoRA matrices); set distributed.strategy: ddp, or lora.bias: none and lora.modules_to_save: null")


def fsdp_quantization_problem(quantization: QuantizationParams, distributed: DistributedParams) -> str | None:
    """Why FSDP cannot shard this base, or None: its 8-bit weights are int8 tensors, which FSDP does not
    flatten beside float ones (4-bit weights are stored as float32 elements for it: ``modeling.load_base_model``'s
    ``shardable_4bit``)."""
    if quantization.load_in == "8bit" and distributed.strategy == "fsdp" and distributed.num_processes > 1:
        return ("quantization.load_in 8bit cannot be sharded by distributed.strategy fsdp (FSDP flattens no int8 "
                "weights): use quantization.load_in: 4bit, or distributed.strategy: ddp")
    return None


def cross_section_problems(sections: dict[str, Any]) -> list[str]:
    """Every problem between the sections in ``sections`` (name to dataclass); rules whose
    sections are not all there are skipped."""
    problems = []
    if "training" in sections and "distributed" in sections:
        training, processes = sections["training"], sections["distributed"].num_processes
        # Values the sections' own checks refuse are reported there, not here again.
        if processes >= 1 and training.gradient_accumulation_steps >= 1:
            problems.append(accumulation_problem(training, processes))
    if "lora" in sections and "quantization" in sections:
        problems.append(lora_init_problem(sections["lora"], sections["quantization"]))
    if "lora" in sections and "distributed" in sections:
        problems.append(lora_init_distributed_problem(sections["lora"], sections["distributed"]))
        problems.append(fsdp_adapter_problem(sections["lora"], sections["distributed"]))
    if "quantization" in sections and "distributed" in sections:
        problems.append(fsdp_quantization_problem(sections["quantization"], sections["distributed"]))
    if "data" in sections and "evaluate" in sections:
        problems.append(general_corpus_problem(sections["data"].source, sections["evaluate"].general_corpus))
    return [p for p in problems if p]

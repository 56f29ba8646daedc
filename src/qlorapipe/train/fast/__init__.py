"""Fast paths for QLoRA training that compute the same function as the plain recipe.

The plain recipe (transformers + peft + bitsandbytes with ``prepare_model_for_kbit_training``)
is launch- and copy-bound on a GPU, not FLOP-bound: it upcasts the frozen norms and embeddings
to float32, so activations flip between float32 and bfloat16 around every layer; peft casts
each LoRA input to the adapter's float32 and clones every base output; and the loss
materialises full-vocabulary float32 logits (the largest activation with a 152k vocabulary).
Each lever here removes one of those costs and has a switch in the ``acceleration`` params
section. None changes what is computed beyond bfloat16 rounding (benchmarks/train_speed.py
checks loss and LoRA gradients against the plain recipe). On the CPU four of them apply, whose
CPU paths are plain PyTorch (the frozen dtype, the LoRA forward with its cheaper dropout draw, the
chunked loss, the lean recomputation), and ``memory_plan`` keeps the activations of the blocks
host memory holds instead of recomputing them; the rest need CUDA.

Each lever is one module here; this package is the switchboard that applies them (``apply``,
``training_params``) and undoes them (``remove``):

- ``frozen_dtype``: frozen norms and embeddings stay in the compute dtype (``keep_frozen_dtype``).
- ``lora_forward``: peft's LoRA forward as one autograd function (``lora_fast_forward``), with
  ``fused_lora`` and its Triton kernels (``triton_kernels``).
- ``chunked_loss``: the loss without full-vocabulary logits (``chunked_cross_entropy``).
- ``fused_kernels``: liger-kernel's RMSNorm, SwiGLU and RoPE (``fused_kernels``; ``liger``
  says whether liger-kernel is there).
- ``checkpointing``: selective gradient checkpointing (``uncheckpointed_layers``), and
  ``memory_plan``: how many blocks fit in the memory budget (``uncheckpointed_layers: auto``).
- ``lean_recompute``: a checkpointed block's recomputation without its last projection's base
  matmul (``lean_recompute``).
- ``offload``: checkpointed blocks' inputs in host memory (``offload_checkpoints``), and whole
  blocks' activations there instead of recomputed (``host_kept_layers``).
- ``regional_compile``: torch.compile of each block (``compile_layers``).
- ``cuda_graphs``: the micro-batch step as a CUDA graph (``cuda_graphs``).
- ``training_params`` here: the unpaged optimizer (``unpaged_optimizer``).
"""

from __future__ import annotations

import logging

from qlorapipe.params import AccelerationParams, TrainingParams
from qlorapipe.train.fast import (
    checkpointing,
    chunked_loss,
    frozen_dtype,
    fused_kernels,
    lean_recompute,
    lora_forward,
    offload,
    regional_compile,
)
from qlorapipe.train.fast.cuda_graphs import graphed_step
from qlorapipe.train.fast.memory_plan import plan_uncheckpointed_layers
from qlorapipe.train.fast.offload import host_kept, offloaded

__all__ = ["apply", "graphed_step", "host_kept", "offloaded", "plan_uncheckpointed_layers", "remove",
           "training_params"]

logger = logging.getLogger(__name__)


def apply(model, params: AccelerationParams, device, compute_dtype) -> list[str]:
    """Switch on the levers ``params`` enables: on CUDA all of them, on the CPU the first four
    (frozen dtype, LoRA forward, chunked loss, lean recompute), whose CPU paths are plain PyTorch.

    Args:
        model: the PEFT model ``modeling.add_lora`` returned.
        params: the acceleration section.
        device: where the model lives.
        compute_dtype: the dtype the base was loaded in (``modeling.load_base_model``).

    Returns:
        The names of the levers applied.
    """
    applied = []
    if params.keep_frozen_dtype and frozen_dtype.keep_frozen_dtype(model, compute_dtype):
        applied.append("keep_frozen_dtype")
    if params.lora_fast_forward and lora_forward.use_fast_lora_forward(model):
        applied.append("lora_fast_forward")
    if params.chunked_cross_entropy and chunked_loss.use_chunked_loss(model):
        applied.append("chunked_cross_entropy")
    # before offload_checkpoints, which wraps the checkpoint function this wraps; a compiled block (CUDA
    # only) would bake in the recomputation flag this reads, so not with compile_layers there
    compiled = params.compile_layers and device.type == "cuda"
    if params.lean_recompute and not compiled and lean_recompute.lean_recompute(model):
        applied.append("lean_recompute")
    if device.type == "cuda":  # the rest are Triton, liger-kernel, CUDA graphs and pinned host copies
        applied += _cuda_levers(model, params, device, compute_dtype)
    logger.info("Acceleration: %s", ", ".join(applied) or "none")
    return applied


def _cuda_levers(model, params: AccelerationParams, device, compute_dtype) -> list[str]:
    """``apply``'s levers that need CUDA; the names of those applied."""
    applied = []
    if params.fused_kernels and fused_kernels.use_fused_kernels(model, compute_dtype):
        applied.append("fused_kernels")
    # auto needs a batch to measure: plan_uncheckpointed_layers takes it after apply.
    layers = params.uncheckpointed_layers
    if layers != "auto" and layers and checkpointing.skip_checkpointing(model, layers):
        applied.append(f"uncheckpointed_layers={layers}")
    if params.offload_checkpoints and offload.offload_checkpoints(model, device):
        applied.append("offload_checkpoints")
    # host_kept_layers: auto is timed on a batch, as uncheckpointed_layers: auto is measured (before it).
    if params.host_kept_layers not in (0, "auto") and offload.keep_in_host_memory(model, device,
                                                                                params.host_kept_layers):
        applied.append(f"host_kept_layers={offload.host_kept(model)}")
    if params.compile_layers and regional_compile.compile_layers(model):
        applied.append("compile_layers")
    return applied


def training_params(params: TrainingParams, fast_paths: AccelerationParams, device) -> TrainingParams:
    """The training section to run with: on CUDA, paged 8-bit AdamW becomes its unpaged twin.

    Paging keeps optimizer states in unified memory so they can spill to the host under
    memory pressure (bitsandbytes paged optimizers). LoRA's states are tens of MB, so paging
    buys nothing here; AdamW8bit and PagedAdamW8bit run the same update, only where the
    states live differs. A paged optimizer also synchronises with the GPU once per step,
    which stalls the host while a CUDA graph replays: on an H100, unpaged was 6% (3B, seq
    1024 x 4) to 38% (seq 512 x 1) faster (docs/benchmarks.md).

    Returns:
        ``params``, or a copy with the unpaged optimizer.
    """
    import dataclasses

    if device.type == "cuda" and fast_paths.unpaged_optimizer and params.optimizer == "paged_adamw_8bit":
        return dataclasses.replace(params, optimizer="adamw_8bit")
    return params


def remove(model, upcast_dtype=None) -> None:
    """Undo every lever (benchmarks and tests compare each against the plain path on one model).

    Args:
        model: a model ``apply`` changed.
        upcast_dtype: cast frozen non-quantized float params back to this dtype (float32 is
            what ``prepare_model_for_kbit_training`` leaves); None leaves dtypes alone.
    """
    checkpointing.checkpoint_again(model.modules())
    for module in model.modules():
        # lora_forward, chunked_loss and fused_kernels set an instance's forward and mark it.
        # vars(), not getattr(): peft's wrappers forward unknown attributes to the model inside.
        if vars(module).pop("_qlorapipe_patched", False):
            del module.forward  # the instance attribute; the class's forward shows again
        regional_compile.uncompile(module)
        offload.remove(module)  # before lean_recompute's: offload wraps the function lean_recompute wrapped
        lean_recompute.remove(module)
        fused_kernels.remove_fused_rope(module)
    if upcast_dtype is not None:
        frozen_dtype.upcast_frozen_params(model, upcast_dtype)

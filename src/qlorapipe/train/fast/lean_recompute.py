"""A checkpointed block's recomputation without its last projection (``acceleration.lean_recompute``).

A checkpointed block runs its forward pass again in the backward pass, only to rebuild what
its autograd nodes saved. The last projection of a Llama-family block, the MLP's
``down_proj``, saves its input and its rank-r LoRA activation; its output only feeds the
residual add that ends the block, whose backward pass reads no values. So the recomputation
needs everything of ``down_proj`` but its base matmul (with the 4-bit weight's dequantization):
22 % (Llama-2-7B) to 29 % (Qwen2.5-3B) of a block's projection FLOPs.

The block's checkpoint function is wrapped so that the second call of the block's forward (the
recomputation; torch's checkpoint calls the same function again) runs with ``recomputing()``
true, and the LoRA functions (``fused_lora``) skip the base matmul of a layer marked here while
it is. What they save is the same, so the gradients are the same bits.
"""

from __future__ import annotations

import functools
import threading

from qlorapipe.train.fast.checkpointing import decoder_layers

# Blocks whose MLP output goes only into the residual add that ends them (transformers' own code for
# these: no norm or other saved op after ``mlp``); others, and remote code of the same names, are left alone.
BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")

# Marks a LoRA layer whose output a recomputation does not read.
UNREAD = "_qlorapipe_unread_when_recomputed"

# Set while a wrapped block is recomputed (per thread: autograd runs the recomputation in its own thread).
_STATE = threading.local()


def recomputing() -> bool:
    """Whether a block wrapped by ``lean_recompute`` is being recomputed in this thread."""
    return getattr(_STATE, "on", False)


def output_unread(layer) -> bool:
    """Whether ``layer``'s output goes unread now: a marked layer, inside a recomputation."""
    return recomputing() and vars(layer).get(UNREAD, False)


def lean_recompute(model) -> bool:
    """Mark the last projection of each checkpointed Llama-family block and wrap its checkpoint
    function so that recomputations skip that projection's base matmul. Only where that projection
    runs through the fused LoRA functions (``lora_fast_forward`` applied first, a plain adapter on
    a 4-bit or 16-bit base): elsewhere nothing would be skipped. Undone by ``remove``.

    Returns:
        True when any block was changed.
    """
    from qlorapipe.train.fast import fused_lora

    changed = False
    for layer in decoder_layers(model):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        known = type(layer).__name__ in BLOCKS and type(layer).__module__.startswith("transformers.models.")
        if (not known or down is None or checkpoint is None or "_qlorapipe_lean" in vars(layer)
                or not vars(down).get("_qlorapipe_patched") or fused_lora.lora_parts(down) is None):
            continue
        layer._qlorapipe_lean = checkpoint
        layer._gradient_checkpointing_func = functools.partial(_lean, checkpoint)
        setattr(down, UNREAD, True)
        changed = True
    return changed


def _lean(checkpoint, function, *args, **kwargs):
    """``checkpoint(function, ...)``, with ``recomputing()`` true from the function's second call on."""
    calls = []

    def run(*inner, **inner_kwargs):
        before = recomputing()
        _STATE.on = bool(calls)
        calls.append(None)
        try:
            return function(*inner, **inner_kwargs)
        finally:  # torch's checkpoint stops a recomputation early by raising once it has what it needs
            _STATE.on = before

    return checkpoint(run, *args, **kwargs)


def remove(module) -> None:
    """Undo ``lean_recompute`` on one module (a module it did not change is left alone, and so is
    one whose checkpoint function was wrapped again on top: undo that wrapper first)."""
    # vars(), not getattr(): peft's wrappers forward unknown attributes to the model inside.
    current = vars(module).get("_gradient_checkpointing_func")
    if "_qlorapipe_lean" not in vars(module) or getattr(current, "func", None) is not _lean:
        return
    module._gradient_checkpointing_func = vars(module).pop("_qlorapipe_lean")
    down = module.mlp.down_proj
    if UNREAD in vars(down):
        delattr(down, UNREAD)

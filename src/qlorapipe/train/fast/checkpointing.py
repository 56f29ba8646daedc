"""Selective gradient checkpointing (``acceleration.uncheckpointed_layers``).

peft's ``prepare_model_for_kbit_training`` checkpoints every transformer block; these keep
the last blocks' activations instead, and put checkpointing back.
"""

from __future__ import annotations


def decoder_layers(model) -> list:
    """The transformer blocks, in order (those gradient checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def skip_checkpointing(model, n_layers: int) -> bool:
    """Keep the activations of the last ``n_layers`` blocks instead of recomputing them.

    Selective checkpointing: each un-checkpointed block saves a forward pass in the backward
    pass at the price of its activations; checkpoint only as many as the memory needs. Blocks kept
    in host memory (``offload.keep_in_host_memory``) are not recomputed already: they are left alone.

    Returns:
        True when any block was changed.
    """
    layers = recomputed_layers(model)
    for layer in layers[len(layers) - min(n_layers, len(layers)) :]:
        layer.gradient_checkpointing = False
        layer._qlorapipe_uncheckpointed = True
    return bool(layers) and n_layers > 0


def recomputed_layers(model) -> list:
    """The blocks that run again in the backward pass: checkpointed, and not kept in host memory."""
    return [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)
            and "_qlorapipe_host_kept" not in vars(layer)]


def checkpoint_again(modules) -> None:
    """Undo ``skip_checkpointing`` on ``modules`` (those it did not change are left alone)."""
    for module in modules:
        if vars(module).pop("_qlorapipe_uncheckpointed", False):
            module.gradient_checkpointing = True


def uncheckpointed_count(model) -> int:
    """How many blocks ``skip_checkpointing`` took out of gradient checkpointing."""
    return sum(bool(vars(layer).get("_qlorapipe_uncheckpointed")) for layer in decoder_layers(model))

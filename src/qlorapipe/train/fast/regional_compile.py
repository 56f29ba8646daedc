"""torch.compile of each transformer block (``acceleration.compile_layers``)."""

from __future__ import annotations

from qlorapipe.train.fast.checkpointing import decoder_layers


def compile_layers(model) -> bool:
    """torch.compile each transformer block (regional compilation: one graph, reused).

    Returns:
        True when any block was compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
        layer._qlorapipe_compiled = True
    return bool(layers)


def uncompile(module) -> None:
    """Undo ``compile_layers`` on ``module`` (a module it did not compile is left alone)."""
    # vars(), not getattr(): peft's wrappers forward unknown attributes to the model inside.
    if vars(module).pop("_qlorapipe_compiled", False):
        module._compiled_call_impl = None

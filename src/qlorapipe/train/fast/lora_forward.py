"""peft's LoRA linear forward without its casts and clones (``acceleration.lora_fast_forward``).

Each LoRA linear layer's forward becomes ``_fast_lora_forward``: one autograd function
(``fused_lora.LoraLinear``) where it can compute peft's function exactly, else
``_unfused_fast_lora_forward``, else peft's own forward.
"""

from __future__ import annotations

import types


def _fast_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA forward for one plain adapter as one autograd function (fused_lora.LoraLinear).

    Same function as peft's ``Linear4bit.forward`` / ``Linear.forward``: base(x) + B(A(drop(x)))
    * scaling. Differences, all exact up to bfloat16 rounding: the small adapter weights are
    cast to the activations' dtype instead of the activations to the weights' float32 (the
    float32 master weights stay the ones the optimizer updates); the scaling is folded into
    B; the LoRA product is added in place into the base output (no clone); and the backward
    pass keeps only the input, drawing the dropout mask again from a seed instead of keeping
    the dropped-out copy and the mask. Layers it cannot compute exactly run peft's forward.
    A block's recomputation skips the base matmul of a layer whose output it does not read
    (``lean_recompute``).
    """
    from qlorapipe.train.fast import fused_lora, lean_recompute

    name = None if (args or kwargs) else fused_lora.plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    parts = fused_lora.lora_parts(self) if x.numel() < fused_lora.MAX_ELEMENTS else None
    if parts is not None:
        return fused_lora.LoraLinear.apply(x, *parts, lean_recompute.output_unread(self))
    return _unfused_fast_lora_forward(self, x, name)


def _unfused_fast_lora_forward(self, x, name: str):
    """The same function for layers the fused one does not take (8-bit bases, other dropouts):
    adapter weights cast to the activations' dtype, the scaling folded into B, the add fused
    into the second matmul (addmm) and no clone of the base output."""
    import torch

    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    result = self.base_layer(x)
    dtype = result.dtype
    hidden = torch.nn.functional.linear(self.lora_dropout[name](x).to(dtype), lora_a.weight.to(dtype))
    scaled_b = (lora_b.weight * self.scaling[name]).to(dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), scaled_b.t())
    return out.view(result.shape)


def use_fast_lora_forward(model) -> bool:
    """Give every peft LoRA linear layer ``_fast_lora_forward``.

    Returns:
        True when any layer was patched.
    """
    from peft.tuners.lora import LoraLayer

    patched = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
                continue
            # Patched on the instance, not replaced by a wrapper module: peft's adapter bookkeeping and
            # the state-dict names hold these very layer objects.
            module.forward = types.MethodType(_fast_lora_forward, module)
            module._qlorapipe_patched = True
            patched = True
    return patched

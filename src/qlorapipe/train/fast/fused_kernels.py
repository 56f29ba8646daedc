"""liger-kernel's fused RMSNorm, SwiGLU and RoPE kernels (``acceleration.fused_kernels``).

Each replaces several PyTorch kernels (and their saved activations) of a Llama-family block
with one Triton kernel computing the same function; see ``use_fused_kernels`` for where.
"""

from __future__ import annotations

import functools
import logging
import threading
import types

from qlorapipe import modeling
from qlorapipe.train.fast import liger

logger = logging.getLogger(__name__)


def _fused_rms_norm_forward(self, hidden_states):
    """Llama-style RMSNorm (float32 statistics, weight applied in the input dtype) in one Triton kernel."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, "llama" casting: the function of LlamaRMSNorm / Qwen2RMSNorm; the gradient
    # buffer is reused in place, as liger-kernel's own patch for these models does.
    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True, None)


def _fused_swiglu_forward(self, x):
    """down(silu(gate(x)) * up(x)) with the activation and product in one Triton kernel.

    With ``lora_fast_forward`` on the LoRA ``down_proj``, the product and the down projection
    are one autograd function (fused_lora.SwigluLoraLinear) that recomputes the product in
    the backward pass instead of keeping it.
    """
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from qlorapipe.train.fast import fused_lora, lean_recompute

    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if vars(down).get("_qlorapipe_patched") and gate.numel() < fused_lora.MAX_ELEMENTS:
        parts = fused_lora.lora_parts(down)
        if parts is not None:
            return fused_lora.SwigluLoraLinear.apply(gate, up, *parts, lean_recompute.output_unread(down))
    return down(LigerSiLUMulFunction.apply(gate, up))


def use_fused_kernels(model, compute_dtype) -> bool:
    """Give the RMSNorm, SwiGLU MLP and RoPE of Llama-family models liger-kernel's fused kernels.

    Only where the function is exactly the same: Llama-style norms whose weight is already in
    the compute dtype (``keep_frozen_dtype``; an upcast float32 weight would change the output
    dtype), MLPs whose activation is SiLU, and the rotary embedding of their attention
    modules (``use_fused_rope``: a module global becomes a dispatcher that changes nothing
    outside the marked instances). The module instances are patched.

    Returns:
        True when any module was patched.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in modeling.PLAIN_HEAD_FAMILIES:
        return False
    error = liger.missing()
    if error is not None:
        logger.info("acceleration.fused_kernels needs liger-kernel (%s): skipped", error)
        return False
    patched = use_fused_rope(model)
    for module in model.modules():
        # Patched on the instance, not replaced by a module: the blocks hold these very objects
        # (and peft's adapter bookkeeping the MLPs' LoRA layers), as do the state-dict names.
        name = type(module).__name__
        if (name.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and getattr(module, "weight", None) is not None and module.weight.dtype == compute_dtype):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
        elif (name.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
              and getattr(getattr(module, "config", config), "hidden_act", None) in ("silu", "swish")):
            module.forward = types.MethodType(_fused_swiglu_forward, module)
        else:
            continue
        module._qlorapipe_patched = True
        patched = True
    return patched


# Set while a module with the fused RoPE runs its forward (per thread: checkpointed blocks are
# recomputed in autograd's thread, where the module's hooks set it again).
_FUSED_ROPE = threading.local()


def _rope_dispatcher(original):
    """``apply_rotary_pos_emb`` of a transformers modeling module, taking liger-kernel's RoPE
    kernel inside attention modules ``_use_fused_rope`` marked, and ``original`` elsewhere."""

    from qlorapipe.train.fast import fused_lora

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (getattr(_FUSED_ROPE, "depth", 0) and fused_lora.on_triton(q) and not args and not kwargs
                and cos.shape[-1] == q.shape[-1] and q.dim() == 4):
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._qlorapipe_original = original
    return apply_rotary_pos_emb


def use_fused_rope(model) -> bool:
    """Run the rotary embedding of each attention module as one Triton kernel (liger-kernel's).

    Returns:
        True when any attention module was marked.
    """
    return any([_use_fused_rope(m) for m in model.modules() if type(m).__name__.endswith("Attention")])


def _use_fused_rope(attention) -> bool:
    """Run ``attention``'s rotary embedding as one Triton kernel (liger-kernel's) for q and k.

    transformers' attention calls its module's global ``apply_rotary_pos_emb`` (q * cos +
    rotate_half(q) * sin: six kernels and two copies, and the same again backward). That global
    becomes a dispatcher (once per modeling module) which takes the fused kernel only while a
    marked attention module runs: forward hooks on this instance mark it, so other models in
    the process keep transformers' function.
    """
    import sys

    module = sys.modules.get(type(attention).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or not hasattr(module, "rotate_half"):
        return False
    if not liger.available():
        return False
    if not hasattr(original, "_qlorapipe_original"):
        module.apply_rotary_pos_emb = _rope_dispatcher(original)

    def enter(*_):
        _FUSED_ROPE.depth = getattr(_FUSED_ROPE, "depth", 0) + 1

    def leave(*_):
        _FUSED_ROPE.depth -= 1

    attention._qlorapipe_rope_hooks = (attention.register_forward_pre_hook(enter),
                                       attention.register_forward_hook(leave, always_call=True))
    return True


def remove_fused_rope(attention) -> None:
    """Undo ``_use_fused_rope`` on ``attention`` (a module it did not mark is left alone); the
    dispatcher stays, taking transformers' function outside marked modules."""
    # vars(), not getattr(): peft's wrappers forward unknown attributes to the model inside.
    for hook in vars(attention).pop("_qlorapipe_rope_hooks", ()):
        hook.remove()

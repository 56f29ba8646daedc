"""A LoRA linear layer (and a SwiGLU MLP's down projection) as one autograd function each.

peft computes ``base(x) + B(A(dropout(x))) * scaling`` with separate autograd nodes, so every
LoRA layer keeps, for its backward pass, the dropped-out copy of its input and the dropout
mask: for a 3B model at 4,096 tokens per micro-batch that is about 0.3 GB per decoder block,
more than everything else the block keeps. These functions compute the same thing and keep
only the input itself, which the other projections of the block already keep (q, k and v
read the same normed input), plus the rank-r ``A(dropout(x))``. The dropout mask is drawn
from a seed and drawn again in the backward pass instead of being stored: the seed comes
from torch's generator on the device, so CUDA graph replays draw fresh masks and a
checkpointed block's recomputation draws the same ones.

``SwigluLoraLinear`` goes one step further for a SwiGLU MLP: ``down(silu(gate) * up)`` keeps
``gate`` and ``up`` (which the SiLU backward needs anyway) and recomputes the product in the
backward pass instead of keeping it (another 0.1 GB per block at that size).

Gradients are the ones of the unfused graph up to bfloat16 rounding, and the mask is a
different draw than ``torch.nn.Dropout``'s (tests/test_fused_lora.py checks both). On CUDA
the dropout and SwiGLU run as Triton kernels (the latter liger-kernel's); for inputs with a
multiple of 128 features the dropout is drawn inside the rank-r matmuls themselves
(``lora_down`` and its two gradients, ``triton_kernels.py``), so the dropped-out input is
never written. Elsewhere everything runs as plain PyTorch, which the CPU tests use (and
Triton's interpreter, for the kernels).
"""

from __future__ import annotations

import math
import os

import torch

MAX_ELEMENTS = 2**31 - 1  # the dropout kernel indexes elements with 32-bit offsets


def on_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``tensor``: on CUDA, or anywhere under Triton's
    interpreter (``TRITON_INTERPRET=1``, which the CPU tests use to check the kernels)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _dropout_kernel():
    from qlorapipe.train.fast import triton_kernels

    return triton_kernels.dropout_kernel


def new_seed(device) -> torch.Tensor:
    """A dropout seed drawn from torch's generator on ``device`` (graph-safe on CUDA)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def dropout(x: torch.Tensor | None, p: float, seed: torch.Tensor, grad: torch.Tensor | None = None,
            into: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x * mask / (1 - p)`` with the mask that ``seed`` draws; also adds ``grad * mask / (1 - p)``
    into ``into`` in place when both are given.

    The same seed, shape and ``p`` give the same mask, so a backward pass applies the forward
    pass's mask by calling this again, for the dropped input and the input's gradient at
    once (one draw of the mask). Tensors must be contiguous and of one shape.

    Returns:
        The dropped-out ``x``, or None when ``x`` is None.
    """
    scale = 1.0 / (1.0 - p)
    shaped = x if x is not None else grad
    if on_triton(shaped):
        out = torch.empty_like(x) if x is not None else None
        n = shaped.numel()
        block = 2048
        _dropout_kernel()[((n + block - 1) // block,)](
            x if x is not None else grad, out if out is not None else into, grad if grad is not None else x,
            into if into is not None else out, seed, n, p, scale,
            DROP_X=x is not None, ADD_G=grad is not None, BLOCK=block)
        return out
    keep = _keep_mask(shaped.shape, p, seed, shaped.device, shaped.dtype)
    if grad is not None:  # in float32, rounded once into ``into`` (a bfloat16 add_ would round alpha first)
        into.addcmul_(grad, keep, value=scale)
    return None if x is None else x.mul(keep).mul_(scale)


def _keep_mask(shape, p: float, seed: torch.Tensor, device, dtype=torch.bool) -> torch.Tensor:
    """Which elements dropout keeps, drawn from torch's generator seeded with ``seed``: 16-bit
    uniforms, kept at or above ``_threshold(p)`` (the rate the kernels draw, p to 1/65536).

    Each 64-bit draw gives four uniforms: for a 1,024 x 576 bool mask on the CPU 0.70 ms, against 1.84 ms
    for ``torch.rand`` and 2.97 ms for a Bernoulli draw as ``torch.nn.Dropout``'s (docs/benchmarks.md).
    ``dtype``: the mask as 0 and 1 in that dtype, written by the comparison itself (0.10 ms instead of
    0.27 ms into a bool tensor); on the CPU a multiply by a bool mask converts it first, which took
    longer than the multiply.
    """
    threshold = _threshold(p) - 32768
    if threshold > 32767:  # p within 1/131072 of 1: every element is dropped (an int16 compare would wrap)
        return torch.zeros(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(int(seed.item()))
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    uniform = bits.view(torch.int16)[:count].view(shape)  # -32768 to 32767, each equally likely
    return torch.ge(uniform, threshold, out=torch.empty(shape, dtype=dtype, device=device))


# The fused LoRA-dropout kernels: inputs with a multiple of 128 columns, ranks tl.dot takes.
FUSED_GROUP = 128
FUSED_RANKS = (16, 32, 64, 128)
_TARGET_PROGRAMS = 264  # about two per multiprocessor of an H100 / H200
# Rows per program, warps and pipeline stages of each kernel: the fastest of
# benchmarks/lora_kernels_speed.py --sweep on an H200 (sum over 512 and 4,096 rows, 2,048 and
# 11,008 columns, rank 16, timed as CUDA graph replays).
KERNEL_CONFIGS = {
    "lora_down": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 4},
    "lora_down_grad": {"BLOCK_M": 32, "num_warps": 8, "num_stages": 3},
    "lora_input_grad": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1},
}


def fuses_dropout(x2: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether ``lora_down`` and its gradients take the fused kernels for this input and rank:
    the dropout mask drawn inside the rank-r matmuls, the dropped-out input never stored."""
    sixteen_bit = x2.dtype in (torch.bfloat16, torch.float16) or not x2.is_cuda  # tl.dot: no tf32 for float32
    return (on_triton(x2) and sixteen_bit and x2.dim() == 2 and x2.is_contiguous()
            and x2.shape[1] % FUSED_GROUP == 0 and a.shape[0] in FUSED_RANKS and x2.numel() < MAX_ELEMENTS)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _threshold(p: float) -> int:
    """The fused kernels keep an element when its 16-bit uniform is at least this (rate p to 1/65536)."""
    return round(p * 65536)


def lora_down(x2: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``dropout(x2) @ a.T`` (fused kernels; see ``fuses_dropout``), in x2's dtype."""
    from qlorapipe.train.fast import triton_kernels

    (m, k), r = x2.shape, a.shape[0]
    config = KERNEL_CONFIGS["lora_down"]
    groups = k // FUSED_GROUP
    n_m = _cdiv(m, config["BLOCK_M"])
    per_split = _cdiv(groups, max(1, min(groups, _cdiv(_TARGET_PROGRAMS, n_m))))
    splits = _cdiv(groups, per_split)
    partial = torch.empty(splits, m, r, device=x2.device, dtype=torch.float32)
    triton_kernels.lora_down_kernel[(n_m, splits)](x2, a.contiguous(), partial, seed, m, k, per_split,
                                                   _threshold(p), 1.0 / (1.0 - p), R=r, **config)
    return (partial[0] if splits == 1 else partial.sum(0)).to(x2.dtype)


def lora_down_grad(grad_hidden: torch.Tensor, x2: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``grad_hidden.T @ dropout(x2)`` in float32: the gradient of A (fused kernels)."""
    from qlorapipe.train.fast import triton_kernels

    (m, k), r = x2.shape, grad_hidden.shape[1]
    config = KERNEL_CONFIGS["lora_down_grad"]
    block_m = config["BLOCK_M"]
    groups = k // FUSED_GROUP
    per_split = _cdiv(_cdiv(m, max(1, min(_cdiv(m, block_m), _cdiv(_TARGET_PROGRAMS, groups)))), block_m) * block_m
    splits = _cdiv(m, per_split)
    partial = torch.empty(splits, r, k, device=x2.device, dtype=torch.float32)
    triton_kernels.lora_down_grad_kernel[(groups, splits)](grad_hidden.contiguous(), x2, partial, seed, m, k,
                                                           per_split, _threshold(p), 1.0 / (1.0 - p), R=r,
                                                           **config)
    return partial[0] if splits == 1 else partial.sum(0)


def lora_input_grad_(grad_x: torch.Tensor, grad_hidden: torch.Tensor, a: torch.Tensor, p: float,
                     seed: torch.Tensor) -> None:
    """``grad_x += dropout(grad_hidden @ a)`` in place, with the mask of ``lora_down`` (fused kernels)."""
    from qlorapipe.train.fast import triton_kernels

    (m, k), r = grad_x.shape, a.shape[0]
    config = KERNEL_CONFIGS["lora_input_grad"]
    triton_kernels.lora_input_grad_kernel[(_cdiv(m, config["BLOCK_M"]), k // FUSED_GROUP)](
        grad_hidden.contiguous(), a.contiguous(), grad_x, seed, m, k, _threshold(p), 1.0 / (1.0 - p), R=r,
        **config)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as LlamaMLP computes it (SiLU rounded to the input dtype first)."""
    if gate.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(gate, up)[2]
    return torch.nn.functional.silu(gate) * up


def swiglu_backward_(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """Gradients of ``swiglu`` for ``gate`` and ``up``, written into their buffers (they are not needed after)."""
    if gate.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_backward

        return swiglu_backward(gate, up, grad)
    g = gate.float()
    sigmoid = torch.sigmoid(g)
    silu = g * sigmoid
    grad_f = grad.float()
    grad_gate = grad_f * (silu * (1 - sigmoid) + sigmoid) * up.float()
    gate.copy_(grad_gate)
    up.copy_(grad_f * silu)
    return gate, up


def frozen_weight(base, dtype) -> torch.Tensor:
    """The base layer's (out, in) weight in ``dtype``: bitsandbytes 4-bit weights dequantized."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None and type(base).__name__ == "Linear4bit":
        # FSDP's gathered weight is a plain tensor; bitsandbytes keeps the state on the module too
        state = getattr(base, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as F

        if getattr(state, "packing_format_for_cpu", False):  # see merge/merging.py's _float_weight
            raise RuntimeError("a 4-bit layer bitsandbytes repacked for CPU inference (at an eval-mode forward) "
                               "cannot be dequantized: its scales were re-rounded")
        return F.dequantize_4bit(weight.data, state).to(dtype)
    return weight.to(dtype)


# Wide projections (more outputs than inputs: a SwiGLU MLP's gate and up) fold their adapter into the base
# matmul's depth: [x | dropout(x) A^T] @ [W | B * scaling]^T, one matmul of depth K + r, instead of writing
# the rank-r product (M x N) and reading it back in the base matmul's epilogue. The 4-bit weight is
# dequantized straight into the first K columns of the wider buffer (``dequantize_into``).
JOIN_WIDE = True
_DEQUANTIZE_BLOCK = 1024  # packed bytes per program


def _nf4_state(base):
    """The bitsandbytes quant state of an NF4 base layer, or None."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None and state.quant_type == "nf4" else None


def dequantize_into(base, out: torch.Tensor) -> None:
    """Dequantize an NF4 base layer's (N, K) weight into ``out``, an (N, K) view whose rows may be
    strided (the first K columns of a wider buffer); the values ``frozen_weight`` gives, in out's dtype."""
    import bitsandbytes.functional as F

    from qlorapipe.train.fast import triton_kernels

    state = _nf4_state(base)
    absmax = state.absmax
    if state.nested:  # as bitsandbytes' dequantize_4bit undoes its double quantization
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    n, k = state.shape
    n_bytes = n * k // 2
    triton_kernels.nf4_dequantize_kernel[(_cdiv(n_bytes, _DEQUANTIZE_BLOCK),)](
        base.weight.data, absmax.float(), state.code.to(out.device), out, n_bytes, k, out.stride(0),
        BLOCKSIZE=state.blocksize, BLOCK=_DEQUANTIZE_BLOCK)


def joins(x2: torch.Tensor, base, b: torch.Tensor) -> bool:
    """Whether ``_forward`` folds the adapter into the base matmul (see ``JOIN_WIDE``)."""
    (n, r), k = b.shape, x2.shape[1]
    if not (JOIN_WIDE and on_triton(x2) and n > k and k % 2 == 0 and (k + r) % 8 == 0
            and n * (k + r) < MAX_ELEMENTS):  # the dequantization kernel's 32-bit offsets
        return False
    state = _nf4_state(base)
    return state is not None and tuple(state.shape) == (n, k)


def _forward(x2, base, lora_a, lora_b, scaling: float, p: float, unread: bool = False):
    """base(x2) + (dropout(x2) @ A^T) @ (B * scaling)^T, and the tensors the backward pass needs.

    The rank-r product is computed first and the base matmul accumulates onto it (cuBLAS
    reads it in its epilogue), instead of a rank-r ``addmm_`` that reads and writes the whole
    output once more after the base matmul; a wide NF4 projection (``joins``) instead runs one
    matmul with the adapter as K's last r columns. ``unread``: nothing reads the output (a block's
    recomputation, ``lean_recompute``), so only the tensors the backward pass needs are
    computed and the output is left unwritten.
    """
    a = lora_a.to(x2.dtype)
    b = (lora_b * scaling).to(x2.dtype)
    seed = new_seed(x2.device) if p > 0 else None
    fused = p > 0 and fuses_dropout(x2, a)
    if fused:
        hidden = lora_down(x2, a, p, seed)
    else:
        hidden = (dropout(x2, p, seed) if p > 0 else x2) @ a.t()
    if unread:
        return x2.new_empty(x2.shape[0], b.shape[0]), (hidden, a, b, seed), fused
    bias = base.bias
    if joins(x2, base, b):
        (m, k), (n, r) = x2.shape, b.shape
        weight, joined = x2.new_empty(n, k + r), x2.new_empty(m, k + r)
        dequantize_into(base, weight[:, :k])
        weight[:, k:] = b
        joined[:, :k], joined[:, k:] = x2, hidden
        out = joined @ weight.t() if bias is None else torch.addmm(bias.to(x2.dtype), joined, weight.t())
        return out, (hidden, a, b, seed), fused
    out = hidden @ b.t() if bias is None else torch.addmm(bias.to(x2.dtype), hidden, b.t())
    out.addmm_(x2, frozen_weight(base, x2.dtype).t())
    return out, (hidden, a, b, seed), fused


def _backward(ctx, grad2, x2, hidden, a, b, seed):
    """Gradients for x2, A and B of ``_forward``."""
    needs_x, needs_a, needs_b = ctx.needs_lora
    grad_hidden = grad2 @ b
    grad_a = grad_b = grad_x = None
    if needs_b:
        grad_b = (grad2.t() @ hidden).float().mul_(ctx.scaling)
    if needs_x:
        grad_x = grad2 @ frozen_weight(ctx.base, grad2.dtype)
    if ctx.fused:  # the mask drawn inside the kernels, as in the forward pass
        if needs_x:
            lora_input_grad_(grad_x, grad_hidden, a, ctx.p, seed)
        if needs_a:
            grad_a = lora_down_grad(grad_hidden, x2, ctx.p, seed)
        return grad_x, grad_a, grad_b
    if ctx.p > 0 and (needs_a or needs_x):
        # One mask draw for both the dropped input (A's gradient) and the input's gradient.
        dropped = dropout(x2 if needs_a else None, ctx.p, seed, grad_hidden @ a if needs_x else None, grad_x)
    else:
        dropped = x2
        if needs_x:
            grad_x.addmm_(grad_hidden, a)
    if needs_a:
        grad_a = (grad_hidden.t() @ dropped).float()
    return grad_x, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    """``base(x) + lora_B(lora_A(dropout(x))) * scaling`` keeping only x (and the rank-r activation)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, unread: bool = False):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out, (hidden, a, b, seed), ctx.fused = _forward(x2, base, lora_a, lora_b, scaling, p, unread)
        ctx.save_for_backward(x2, hidden, a, b, seed)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        ctx.needs_lora = ctx.needs_input_grad[:3]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, hidden, a, b, seed = ctx.saved_tensors
        grad2 = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        grad_x, grad_a, grad_b = _backward(ctx, grad2, x2, hidden, a, b, seed)
        if grad_x is not None:
            grad_x = grad_x.view(grad_out.shape[:-1] + (x2.shape[-1],))
        return grad_x, grad_a, grad_b, None, None, None, None


class SwigluLoraLinear(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a LoRA ``down``, keeping gate and up but not their product."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, base, scaling: float, p: float, unread: bool = False):
        gate2 = gate.reshape(-1, gate.shape[-1]).contiguous()
        up2 = up.reshape(-1, up.shape[-1]).contiguous()
        product = swiglu(gate2, up2)
        out, (hidden, a, b, seed), ctx.fused = _forward(product, base, lora_a, lora_b, scaling, p, unread)
        ctx.save_for_backward(gate2, up2, hidden, a, b, seed)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        ctx.needs_lora = (any(ctx.needs_input_grad[:2]), *ctx.needs_input_grad[2:4])
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        gate2, up2, hidden, a, b, seed = ctx.saved_tensors
        grad2 = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        product = swiglu(gate2, up2) if ctx.needs_lora[1] else None
        grad_product, grad_a, grad_b = _backward(ctx, grad2, product, hidden, a, b, seed)
        del product
        grad_gate = grad_up = None
        if grad_product is not None:
            grad_gate, grad_up = swiglu_backward_(gate2, up2, grad_product)
            grad_gate = grad_gate.view(grad_out.shape[:-1] + (gate2.shape[-1],))
            grad_up = grad_up.view(grad_out.shape[:-1] + (up2.shape[-1],))
        return grad_gate, grad_up, grad_a, grad_b, None, None, None, None


def plain_adapter(layer) -> str | None:
    """The name of a peft LoRA layer's one active plain adapter, or None.

    Plain: the only active adapter, no DoRA or other variant, not merged, no LoRA bias.
    """
    adapters = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(adapters) != 1:
        return None
    name = adapters[0]
    if name in getattr(layer, "lora_variant", {}) or name not in layer.lora_A or layer.lora_B[name].bias is not None:
        return None
    return name


def lora_parts(layer):
    """(lora_A weight, lora_B weight, base layer, scaling, dropout p) of a peft LoRA linear layer
    that the fused functions compute exactly, or None.

    Exactly: a ``plain_adapter``, a torch or bitsandbytes 4-bit base with no trained bias (``lora.bias: all``
    or ``lora_only`` trains the base layers' biases, which the fused functions treat as constants), and dropout
    that is ``torch.nn.Dropout`` or none.
    """
    if type(layer).__name__ not in ("Linear", "Linear4bit") or not hasattr(layer, "lora_A"):
        return None
    name = plain_adapter(layer)
    base = layer.base_layer
    if name is None or type(base).__name__ not in ("Linear", "Linear4bit"):
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    drop = layer.lora_dropout[name]
    if isinstance(drop, torch.nn.Dropout):
        p = drop.p if drop.training else 0.0
    elif isinstance(drop, torch.nn.Identity):
        p = 0.0
    else:
        return None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, base, float(layer.scaling[name]), float(p)

"""Triton kernels of the fused LoRA layers (imported on first use: CUDA, or Triton's interpreter).

Kept in a module of their own so that ``TRITON_INTERPRET=1`` set before the import (the CPU
tests do, then reload this module) runs them on CPU tensors: the interpreter needs
``triton.language`` as a global of the kernel's module.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_kernel(x_ptr, out_ptr, g_ptr, acc_ptr, seed_ptr, n, p, scale,
                   DROP_X: tl.constexpr, ADD_G: tl.constexpr, BLOCK: tl.constexpr):
    """out = x * keep * scale (DROP_X) and acc += g * keep * scale (ADD_G), keep = uniform >= p.

    One Philox call gives four uniforms: each program covers BLOCK elements as four contiguous
    quarters, one per output, so the generator runs once per four elements. The uniform of an
    element depends only on the seed and the element's index: the same seed redraws the mask.
    """
    quarter: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    uniforms = tl.rand4x(tl.load(seed_ptr), pid * quarter + tl.arange(0, quarter))
    for i in tl.static_range(4):
        offsets = pid * BLOCK + i * quarter + tl.arange(0, quarter)
        inside = offsets < n
        keep = uniforms[i] >= p
        if DROP_X:
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty), mask=inside)
        if ADD_G:
            g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            acc = tl.load(acc_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            acc += tl.where(keep, g * scale, 0.0)
            tl.store(acc_ptr + offsets, acc.to(acc_ptr.dtype.element_ty), mask=inside)

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


# LoRA's rank-r matmuls with the dropout mask drawn inside them (inputs with a multiple of 128
# columns). The mask of element (m, k) is a function of the seed and (m, k) alone, the same in
# all three kernels: column k is in group k // 128, quarter (k % 128) // 32, half (k % 32) // 16
# and lane k % 16; the Philox counter is m * K / 8 + group * 16 + lane, the quarter picks one of
# its four 32-bit outputs and the half one 16-bit half of it, compared with round(p * 65536).
# Eight 16-bit uniforms per Philox call (as FlashAttention draws 8-bit ones): the generator,
# not memory, bounded these kernels with one uniform per element.
GROUP = 128
LANES = 32


@triton.jit
def _bits(r, BLOCK_M: tl.constexpr):
    """(BLOCK_M, 16) 32-bit randoms -> (BLOCK_M, 32) 16-bit ones: columns 0-15 the low halves."""
    halves = tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)  # (BLOCK_M, 16, 2)
    return tl.reshape(tl.permute(halves, (0, 2, 1)), (BLOCK_M, 32))


@triton.jit
def _uniforms(seed, rows, group, K, BLOCK_M: tl.constexpr):
    lanes = tl.arange(0, 16)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * (K // 8) + group * 16 + lanes[None, :])
    return _bits(r0, BLOCK_M), _bits(r1, BLOCK_M), _bits(r2, BLOCK_M), _bits(r3, BLOCK_M)


@triton.jit
def lora_down_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, groups_per_split, threshold, scale,
                     R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[split, m, :] = sum over this split's column groups of dropout(x)[m, k] * a[:, k]."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < M
    lanes = tl.arange(0, 32)
    ranks = tl.arange(0, R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    first = split * groups_per_split
    last = tl.minimum(first + groups_per_split, K // 128)
    for group in range(first, last):
        uniforms = _uniforms(seed, rows, group, K, BLOCK_M)
        for i in tl.static_range(4):
            cols = group * 128 + i * 32 + lanes
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside[:, None], other=0.0)
            dropped = tl.where(uniforms[i] >= threshold, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None])
            acc = tl.dot(dropped, a, acc)
    tl.store(out_ptr + split * M * R + rows[:, None] * R + ranks[None, :], acc, mask=inside[:, None])


@triton.jit
def lora_down_grad_kernel(g_ptr, x_ptr, out_ptr, seed_ptr, M, K, rows_per_split, threshold, scale,
                          R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[split, :, k] = sum over this split's rows of g[m, :] * dropout(x)[m, k] (A's gradient)."""
    group, split = tl.program_id(0), tl.program_id(1)
    lanes = tl.arange(0, 32)
    ranks = tl.arange(0, R)
    seed = tl.load(seed_ptr)
    acc0 = tl.zeros((R, 32), dtype=tl.float32)
    acc1 = tl.zeros((R, 32), dtype=tl.float32)
    acc2 = tl.zeros((R, 32), dtype=tl.float32)
    acc3 = tl.zeros((R, 32), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for row0 in range(start, stop, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        inside = rows < stop
        g_t = tl.load(g_ptr + rows[None, :] * R + ranks[:, None], mask=inside[None, :], other=0.0)
        uniforms = _uniforms(seed, rows, group, K, BLOCK_M)
        for i in tl.static_range(4):
            cols = group * 128 + i * 32 + lanes
            x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside[:, None], other=0.0)
            dropped = tl.where(uniforms[i] >= threshold, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            if i == 0:
                acc0 = tl.dot(g_t, dropped, acc0)
            elif i == 1:
                acc1 = tl.dot(g_t, dropped, acc1)
            elif i == 2:
                acc2 = tl.dot(g_t, dropped, acc2)
            else:
                acc3 = tl.dot(g_t, dropped, acc3)
    out = out_ptr + split * R * K + ranks[:, None] * K + group * 128 + lanes[None, :]
    tl.store(out, acc0)
    tl.store(out + 32, acc1)
    tl.store(out + 64, acc2)
    tl.store(out + 96, acc3)


@triton.jit
def lora_input_grad_kernel(g_ptr, a_ptr, grad_ptr, seed_ptr, M, K, threshold, scale, R: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """grad[m, k] += dropout mask[m, k] * scale * (g @ a)[m, k] (the input's gradient through LoRA)."""
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < M
    lanes = tl.arange(0, 32)
    ranks = tl.arange(0, R)
    g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=inside[:, None], other=0.0)
    uniforms = _uniforms(tl.load(seed_ptr), rows, group, K, BLOCK_M)
    for i in tl.static_range(4):
        cols = group * 128 + i * 32 + lanes
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :])
        lora = tl.dot(g, a)
        where = grad_ptr + rows[:, None] * K + cols[None, :]
        grad = tl.load(where, mask=inside[:, None], other=0.0).to(tl.float32)
        grad += tl.where(uniforms[i] >= threshold, lora * scale, 0.0)
        tl.store(where, grad.to(grad_ptr.dtype.element_ty), mask=inside[:, None])

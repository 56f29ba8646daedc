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
# all three kernels. Columns come in groups of 128; in group g, column c = 8 * lane + j
# (lane 0-15) takes Philox counter m * K / 8 + 16 * g + lane, and j picks one of the eight
# 16-bit halves of its four 32-bit outputs (``_group_uniforms``), compared with
# round(p * 65536). Eight 16-bit uniforms per Philox call (as FlashAttention draws 8-bit ones):
# with one uniform per element the generator, not memory, bounded these kernels. Each kernel
# works on whole (rows x 128) tiles, so each row's 256 contiguous bytes are one load and each
# group is one tensor-core dot of depth 128.
@triton.jit
def _halves(r):
    """(M, 16) 32-bit randoms -> (M, 16, 2): their low and high 16 bits."""
    return tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)


@triton.jit
def _group_uniforms(seed, rows, group, K, BLOCK_M: tl.constexpr):
    """(BLOCK_M, 128) 16-bit uniforms (as int32) of column group ``group`` of ``rows``."""
    lanes = tl.arange(0, 16)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * (K // 8) + group * 16 + lanes[None, :])
    bits = tl.join(tl.join(_halves(r0), _halves(r1)), tl.join(_halves(r2), _halves(r3)))  # (M, 16, 2, 2, 2)
    return tl.reshape(bits, (BLOCK_M, 128))


@triton.jit
def _dropped_tile(x_ptr, seed, rows, inside, group, K, threshold, scale, BLOCK_M: tl.constexpr):
    """dropout(x)[rows, 128 * group : 128 * group + 128] in x's dtype (rows outside: zeros)."""
    cols = group * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside[:, None], other=0.0)
    keep = _group_uniforms(seed, rows, group, K, BLOCK_M) >= threshold
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)


@triton.jit
def lora_down_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, groups_per_split, threshold, scale,
                     R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[split, m, :] = sum over this split's column groups of dropout(x)[m, k] * a[:, k]."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < M
    ranks = tl.arange(0, R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    first = split * groups_per_split
    last = tl.minimum(first + groups_per_split, K // 128)
    for group in range(first, last):
        dropped = _dropped_tile(x_ptr, seed, rows, inside, group, K, threshold, scale, BLOCK_M)
        a = tl.load(a_ptr + ranks[None, :] * K + (group * 128 + tl.arange(0, 128))[:, None])  # (128, R)
        acc = tl.dot(dropped, a, acc)
    tl.store(out_ptr + split * M * R + rows[:, None] * R + ranks[None, :], acc, mask=inside[:, None])


@triton.jit
def lora_down_grad_kernel(g_ptr, x_ptr, out_ptr, seed_ptr, M, K, rows_per_split, threshold, scale,
                          R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[split, :, k] = sum over this split's rows of g[m, :] * dropout(x)[m, k] (A's gradient)."""
    group, split = tl.program_id(0), tl.program_id(1)
    ranks = tl.arange(0, R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((R, 128), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for row0 in range(start, stop, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        inside = rows < stop
        g_t = tl.load(g_ptr + rows[None, :] * R + ranks[:, None], mask=inside[None, :], other=0.0)
        dropped = _dropped_tile(x_ptr, seed, rows, inside, group, K, threshold, scale, BLOCK_M)
        acc = tl.dot(g_t, dropped, acc)
    tl.store(out_ptr + split * R * K + ranks[:, None] * K + group * 128 + tl.arange(0, 128)[None, :], acc)


@triton.jit
def lora_input_grad_kernel(g_ptr, a_ptr, grad_ptr, seed_ptr, M, K, threshold, scale, R: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """grad[m, k] += dropout mask[m, k] * scale * (g @ a)[m, k] (the input's gradient through LoRA)."""
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < M
    ranks = tl.arange(0, R)
    cols = group * 128 + tl.arange(0, 128)
    g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=inside[:, None], other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :])
    lora = tl.dot(g, a)
    keep = _group_uniforms(tl.load(seed_ptr), rows, group, K, BLOCK_M) >= threshold
    where = grad_ptr + rows[:, None] * K + cols[None, :]
    grad = tl.load(where, mask=inside[:, None], other=0.0).to(tl.float32)
    grad += tl.where(keep, lora * scale, 0.0)
    tl.store(where, grad.to(grad_ptr.dtype.element_ty), mask=inside[:, None])


@triton.jit
def nf4_dequantize_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, K, out_stride,
                          BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """bitsandbytes' blockwise 4-bit dequantization into rows of ``out_stride`` elements.

    Byte i of ``q`` holds elements 2i (high nibble) and 2i + 1 (low nibble) of the row-major (N, K)
    weight; element e's value is ``code[nibble] * absmax[e // BLOCKSIZE]`` in float32, rounded once to
    out's dtype, as bitsandbytes computes it. Written at ``(e // K) * out_stride + e % K``: the weight can
    land in the first K columns of a wider buffer.
    """
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_bytes
    packed = tl.load(q_ptr + offsets, mask=inside, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + (offsets * 2) // BLOCKSIZE, mask=inside, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 15)) * scale
    values = tl.interleave(high, low)
    elements = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + (elements // K) * out_stride + elements % K,
             values.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=elements < 2 * n_bytes)

"""Whether liger-kernel's Triton kernels can be used: the one guarded import of it here.

liger-kernel is a Linux-only dependency (pyproject.toml). The fused RMSNorm, SwiGLU and RoPE
(``fused_kernels``) and the chunked loss's cross-entropy kernel (``chunked_loss``) ask
``missing()`` first; without it those levers are skipped and the chunked loss runs its
plain-PyTorch chunks. Their own ``from liger_kernel.ops... import`` lines then only run once
this import succeeded.
"""

from __future__ import annotations

import functools


@functools.cache
def missing() -> str | None:
    """Why liger-kernel's ops cannot be imported (the ImportError's message), or None when they can."""
    try:
        import liger_kernel.ops.cross_entropy  # noqa: F401
        import liger_kernel.ops.rms_norm  # noqa: F401
        import liger_kernel.ops.rope  # noqa: F401
        import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def available() -> bool:
    """Whether liger-kernel's ops can be imported."""
    return missing() is None

"""What a stage process sets up before the libraries it imports: their import-time costs it can defer, and
torch's CUDA allocator settings (``use_expandable_segments``).

bitsandbytes wraps a few of its CPU fallback ops (4-bit and blockwise dequantization) in
``torch.compile`` when it is imported; building those wrappers imports torch's inductor: importing
peft and bitsandbytes took 1.8 s more with it on this project's 2-core CPU machine (median of five), and
on an H200 the inductor was 1.3-1.4 s of bitsandbytes' 2.4-2.6 s (docs/benchmarks.md), though
compiling happens only at a first call either way. ``defer_bitsandbytes_compile`` has the wrappers built at that first call instead: the
same ``torch.compile`` with the same arguments, the same fallback when it fails, later.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys

BITSANDBYTES_COMPILED_OPS = "bitsandbytes.backends.default.ops"
# torch's allocator settings a stage runs with unless the user set their own (read at the first CUDA allocation):
# segments that grow in place instead of new fixed-size ones. On an H100 the train stage of the 3B shape within
# a 5 GB budget reserved 5.39 GB instead of 5.87 (5.14 instead of 5.48 without CUDA graphs), at the same
# tokens/s (docs/benchmarks.md).
ALLOCATOR_SETTINGS = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def allocator_variable(torch_version: str | None = None) -> str:
    """The variable torch's CUDA allocator takes ``expandable_segments`` from: ``PYTORCH_ALLOC_CONF`` from torch
    2.11 (2.9 and 2.10 read the name but ignore that setting there on CUDA, pytorch/pytorch#183387), the older
    ``PYTORCH_CUDA_ALLOC_CONF`` before (which 2.9 and later read too, with a deprecation warning)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in (torch_version or version("torch")).split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ALLOCATOR_VARIABLES[1]
    return ALLOCATOR_VARIABLES[0] if (major, minor) >= (2, 11) else ALLOCATOR_VARIABLES[1]


def use_expandable_segments() -> None:
    """Run torch's CUDA allocator with expandable segments, unless ``PYTORCH_ALLOC_CONF`` or
    ``PYTORCH_CUDA_ALLOC_CONF`` already says how; launched ranks inherit it."""
    if not set(ALLOCATOR_VARIABLES) & set(os.environ):
        os.environ[allocator_variable()] = ALLOCATOR_SETTINGS


def defer_bitsandbytes_compile() -> None:
    """Build bitsandbytes' import-time ``torch.compile`` wrappers at their first call (idempotent)."""
    if not any(isinstance(finder, _DeferringFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder())


def lazy_compile(compile_fn):
    """``compile_fn`` (``torch.compile``) that compiles a function when it is first called, not when wrapped."""

    def deferred(fn=None, **options):
        if fn is None:  # used as @torch.compile(**options)
            return lambda function: deferred(function, **options)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Runs bitsandbytes' compiled-ops module with ``torch.compile`` deferred, and only that module."""

    def find_spec(self, name, path, target=None):
        if name != BITSANDBYTES_COMPILED_OPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            import torch

            compile_fn = torch.compile
            torch.compile = lazy_compile(compile_fn)
            try:
                run_module(module)
            finally:
                torch.compile = compile_fn

        spec.loader.exec_module = exec_module
        return spec

"""What a stage process defers at start: bitsandbytes' import-time torch.compile wrappers (qlorapipe.startup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qlorapipe.startup import lazy_compile


def test_a_deferred_compile_compiles_once_at_the_first_call_with_the_same_options():
    calls = []

    def compile_fn(fn, **options):
        calls.append(options)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    deferred = lazy_compile(compile_fn)

    def double(x):
        return 2 * x

    wrapped = deferred(double, dynamic=False)
    decorated = deferred(dynamic=True)(double)
    assert calls == [] and wrapped.__name__ == "double"  # wrapping compiles nothing
    assert wrapped(3) == ("compiled", 6) and wrapped(4) == ("compiled", 8)
    assert decorated(5) == ("compiled", 10)
    assert calls == [{"dynamic": False}, {"dynamic": True}]  # once each, with its own options


def test_a_stage_imports_peft_and_bitsandbytes_without_torchs_inductor_and_dequantizes_as_before():
    code = """
import sys
from qlorapipe.startup import defer_bitsandbytes_compile
defer_bitsandbytes_compile()
from peft import PeftModel
import torch, bitsandbytes.functional as F
print("torch._inductor.compile_fx" in sys.modules)
torch.manual_seed(0)
weights = torch.randn(64, 128)
packed, state = F.quantize_4bit(weights, blocksize=64, quant_type="nf4")
again = F.dequantize_4bit(packed, state)
print(again.shape == weights.shape, float((again - weights).abs().max() / weights.abs().max()) < 0.2)
"""
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split() == ["False", "True", "True"]


def test_a_stage_runs_torchs_allocator_with_expandable_segments_unless_the_user_set_its_settings():
    """In a stage process of its own (the settings stay there): the variable this torch reads, unless the user set
    either name."""
    from qlorapipe.startup import allocator_variable

    code = """
import json, os
from qlorapipe.console import run_stage
run_stage(lambda argv: print(json.dumps({k: v for k, v in os.environ.items() if k.endswith("ALLOC_CONF")})), [],
          exit_when_done=False)
"""
    clean = {k: v for k, v in os.environ.items() if not k.endswith("ALLOC_CONF")}
    for preset, expected in (({}, {allocator_variable(): "expandable_segments:True"}),
                             ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}, None),
                             ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:32"}, None)):
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                               env={**clean, **preset})
        assert found.returncode == 0, found.stderr[-2000:]
        assert json.loads(found.stdout.strip().splitlines()[-1]) == (expected or preset)


def test_the_allocator_variable_follows_the_torch_version():
    from qlorapipe.startup import allocator_variable

    assert allocator_variable("2.13.0+cpu") == allocator_variable("2.11.0+cu130") == "PYTORCH_ALLOC_CONF"
    assert allocator_variable("2.10.1") == allocator_variable("2.6.0") == "PYTORCH_CUDA_ALLOC_CONF"

"""Merging a QLoRA adapter into a standalone 16-bit model that computes what was trained.

The adapter was trained against the *quantized* base, W_q = dequant(quant(W)). Merging it
into the original 16-bit W gives W + BA, which differs from the trained W_q + BA by the
quantization error of every layer; that is the usual "my merged model behaves differently"
report (peft#1043, transformers#31293, LLaMA-Factory#5625). Dequantizing the 4-bit base
first and merging into W_q gives W_q + BA: the trained function, up to the rounding of the
output dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qlorapipe import modeling
from qlorapipe.params import QuantizationParams

logger = logging.getLogger(__name__)


def dequantized_merge(base_dir: Path, adapter_dir: Path, quant: QuantizationParams, dtype, device,
                      trust_remote_code: bool = False):
    """Load the base quantized as in training, dequantize it, then merge the adapter.

    Returns:
        A plain transformers model in ``dtype`` with the adapter merged in.
    """
    import torch
    from peft import PeftModel

    model, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust_remote_code)
    if quant.load_in != "none":
        # Dequantize to float32 so the merge itself adds no rounding; cast once at the end.
        model = model.dequantize(dtype=torch.float32)
    model = model.to(torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged.to(dtype)


def naive_merge(base_dir: Path, adapter_dir: Path, dtype, device, trust_remote_code: bool = False):
    """Merge into the original 16-bit base: what most scripts do, kept as a reference point."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": device},
                                                 trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().to(dtype)

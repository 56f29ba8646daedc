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
import math
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import modeling
from qlorapipe.params import QuantizationParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    """How far a candidate model's logits are from the reference (base + adapter as trained)."""

    max_logit_diff: float
    mean_logit_diff: float
    perplexity: float
    reference_perplexity: float

    @property
    def perplexity_change(self) -> float:
        """Relative change, e.g. 0.01 = 1 % higher perplexity than the reference."""
        return self.perplexity / self.reference_perplexity - 1

    def as_metrics(self) -> dict:
        return {
            "max_logit_diff": round(self.max_logit_diff, 5),
            "mean_logit_diff": round(self.mean_logit_diff, 6),
            "perplexity": round(self.perplexity, 5),
            "perplexity_change": round(self.perplexity_change, 6),
        }


def dequantized_merge(base_dir: Path, adapter_dir: Path, quant: QuantizationParams, dtype, device):
    """Load the base quantized as in training, dequantize it, then merge the adapter.

    Returns:
        A plain transformers model in ``dtype`` with the adapter merged in.
    """
    import torch
    from peft import PeftModel

    model, _ = modeling.load_base_model(base_dir, quant, device)
    if quant.load_in != "none":
        # Dequantize to float32 so the merge itself adds no rounding; cast once at the end.
        model = model.dequantize(dtype=torch.float32)
    model = model.to(torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged.to(dtype)


def naive_merge(base_dir: Path, adapter_dir: Path, dtype, device):
    """Merge into the original 16-bit base: what most scripts do, kept as a reference point."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": device})
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().to(dtype)


def eval_batches(dataset, batch_size: int, n_batches: int) -> list:
    return [dataset[i : i + batch_size]["input_ids"] for i in range(0, min(len(dataset), batch_size * n_batches),
                                                                      batch_size)]


def logits_on(model, batches, device) -> list:
    """float32 logits for each batch, kept on the CPU."""
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=b.to(device)).logits.float().cpu() for b in batches]


def compare(reference_logits: list, candidate_logits: list, batches: list) -> Fidelity:
    """Logit differences and perplexities of a candidate against the reference on the same batches."""
    max_diff, diff_sum, count = 0.0, 0.0, 0
    ref_nll, cand_nll, tokens = 0.0, 0.0, 0
    for ref, cand, ids in zip(reference_logits, candidate_logits, batches):
        diff = (ref - cand).abs()
        max_diff = max(max_diff, float(diff.max()))
        diff_sum += float(diff.sum())
        count += diff.numel()
        targets = ids[:, 1:].reshape(-1).long()
        ref_nll += _summed_nll(ref, targets)
        cand_nll += _summed_nll(cand, targets)
        tokens += targets.numel()
    return Fidelity(
        max_logit_diff=max_diff,
        mean_logit_diff=diff_sum / count,
        perplexity=math.exp(cand_nll / tokens),
        reference_perplexity=math.exp(ref_nll / tokens),
    )


def _summed_nll(logits, targets) -> float:
    import torch

    flat = logits[:, :-1].reshape(-1, logits.size(-1))
    return torch.nn.functional.cross_entropy(flat, targets, reduction="sum").item()

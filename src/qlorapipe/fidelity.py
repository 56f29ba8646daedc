"""How far a candidate model's logits are from a reference's, on the same eval batches.

The merge stage compares the merged model with base + adapter as trained (its gate), and the
export stage compares each GGUF file read back with the merged model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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


def eval_batches(dataset, batch_size: int, n_batches: int) -> list:
    """The first ``n_batches`` batches of ``batch_size`` rows of input ids."""
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

"""The merge fidelity gate: the merged model must compute what was trained, within params bounds."""

from __future__ import annotations

from qlorapipe.errors import UserError
from qlorapipe.fidelity import Fidelity
from qlorapipe.params import MergeParams


def problems(fidelity: Fidelity, params: MergeParams) -> list[str]:
    """Every bound in ``params`` that ``fidelity`` exceeds, one phrase each naming the param.

    A figure that is not a number (NaN: logits that overflowed ``merge.dtype``'s range) exceeds
    every bound: each comparison is written so that NaN fails it.
    """
    found = []
    if not fidelity.max_logit_diff <= params.max_logit_diff:
        found.append(f"max logit difference {fidelity.max_logit_diff:.4f} > merge.max_logit_diff "
                     f"{params.max_logit_diff}")
    if not fidelity.mean_logit_diff <= params.max_mean_logit_diff:
        found.append(f"mean logit difference {fidelity.mean_logit_diff:.4f} > merge.max_mean_logit_diff "
                     f"{params.max_mean_logit_diff}")
    if not abs(fidelity.perplexity_change) <= params.max_perplexity_change:
        found.append(f"perplexity change {fidelity.perplexity_change:+.4f} exceeds merge.max_perplexity_change "
                     f"{params.max_perplexity_change}")
    return found


def check(fidelity: Fidelity, params: MergeParams, load_in: str = "4bit") -> None:
    """Refuse a merged model outside the bounds.

    Args:
        load_in: ``quantization.load_in`` of the base that was trained (what to try depends on it).

    Raises:
        UserError: naming every bound exceeded and what to try.
    """
    found = problems(fidelity, params)
    if found:
        raise UserError("the merged model does not compute what was trained: " + "; ".join(found)
                        + f" ({hint(params, load_in)})")


def hint(params: MergeParams, load_in: str) -> str:
    """What to try when the gate refuses, given what is set already."""
    if load_in == "8bit":
        # LLM.int8() rounds each matmul's input to 8 bits (outlier columns aside): base + adapter as trained computes
        # with that rounding, the merged 16-bit model without it, however exactly the weights are merged.
        return ("with quantization.load_in 8bit the trained model rounds every matmul's input to int8 and the merged "
                "model does not, so its logits differ by more than a 4-bit merge's: raise merge.max_logit_diff and "
                "merge.max_mean_logit_diff if the perplexity change is small enough")
    if params.dtype != "float32":
        return "try merge.dtype: float32, or raise the threshold if this is expected"
    return "raise the threshold if this is expected"

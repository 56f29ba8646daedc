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


def check(fidelity: Fidelity, params: MergeParams) -> None:
    """Refuse a merged model outside the bounds.

    Raises:
        UserError: naming every bound exceeded and what to try.
    """
    found = problems(fidelity, params)
    if found:
        hint = ("try merge.dtype: float32, or raise the threshold if this is expected" if params.dtype != "float32"
                else "raise the threshold if this is expected")
        raise UserError("the merged model does not compute what was trained: " + "; ".join(found) + f" ({hint})")

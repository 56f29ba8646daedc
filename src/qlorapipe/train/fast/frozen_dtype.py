"""Keep the frozen norms and embeddings in the compute dtype (``acceleration.keep_frozen_dtype``).

Undoes the float32 upcast of ``prepare_model_for_kbit_training`` for the frozen,
non-quantized params only; ``upcast_frozen_params`` puts it back (``fast.remove``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _frozen_float_params(model):
    for param in model.parameters():
        if param.requires_grad or type(param).__name__ in ("Params4bit", "Int8Params"):
            continue
        if param.is_floating_point():
            yield param


def keep_frozen_dtype(model, compute_dtype) -> bool:
    """Cast the frozen, non-quantized params (norms, embeddings) back to the compute dtype.

    ``prepare_model_for_kbit_training`` upcasts them to float32 for numerical stability
    (peft/utils/other.py). The RMSNorm variance is computed in float32 anyway
    (LlamaRMSNorm.forward), so the upcast only turns every norm's output, and with it the
    residual stream and every LoRA input, into float32: twice the activation memory and a
    dtype conversion around every bitsandbytes matmul. Trainable (LoRA) params stay float32.

    Left off when ``lora.modules_to_save`` trains a linear layer (``lm_head``, say): its float32
    copy would take the compute-dtype output of a norm, and a linear layer does not mix dtypes. Or an
    embedding (``embed_tokens``): its float32 output would carry float32 activations to the frozen
    compute-dtype ``lm_head``.

    Returns:
        True when any param was cast.
    """
    import torch

    saved = [name for name, module in model.named_modules()
             if type(module).__name__ == "ModulesToSaveWrapper"
             and isinstance(getattr(module, "original_module", None), (torch.nn.Linear, torch.nn.Embedding))]
    if saved and compute_dtype != torch.float32:
        logger.info("keep_frozen_dtype: off, lora.modules_to_save trains float32 layers (%s) that meet the frozen "
                    "ones' compute dtype", ", ".join(saved))
        return False
    changed = False
    for param in _frozen_float_params(model):
        if param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
            changed = True
    if changed and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return changed


def upcast_frozen_params(model, upcast_dtype) -> None:
    """Undo ``keep_frozen_dtype``: cast the frozen, non-quantized float params to ``upcast_dtype``
    (float32 is what ``prepare_model_for_kbit_training`` leaves)."""
    import torch

    for param in _frozen_float_params(model):
        if param.dtype != upcast_dtype:
            param.data = param.data.to(upcast_dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

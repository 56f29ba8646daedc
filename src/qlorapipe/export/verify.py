"""Reading a GGUF file back and comparing it with the model it was written from."""

from __future__ import annotations

import logging
from pathlib import Path

from qlorapipe import fidelity
from qlorapipe.export.gguf import load_gguf

logger = logging.getLogger(__name__)


def verify_gguf(gguf_file: Path, tokenizer, reference: list, batches: list) -> dict:
    """Read a GGUF file back with transformers; compare its logits and its tokenizer with the merged model's.

    Args:
        gguf_file: the file written.
        tokenizer: the merged model's tokenizer.
        reference: the merged model's float32 logits on ``batches`` (``fidelity.logits_on``).
        batches: the eval batches of input ids.

    Returns:
        The fidelity metrics, the file size (MB) and whether the tokenizer read back splits the
        eval text into the same ids.
    """
    import torch

    model, gguf_tokenizer = load_gguf(gguf_file, dtype=torch.float32)
    result = fidelity.compare(reference, fidelity.logits_on(model, batches, torch.device("cpu")), batches)
    texts = [tokenizer.decode(b[0], skip_special_tokens=True) for b in batches]
    same_ids = all(tokenizer(t)["input_ids"] == gguf_tokenizer(t)["input_ids"] for t in texts)
    if not same_ids:
        logger.warning("%s: the tokenizer read back from GGUF splits eval text differently", gguf_file.name)
    logger.info("%s read back: max logit diff %.4f, perplexity change %+.3f%% against the merged model",
                gguf_file.name, result.max_logit_diff, 100 * result.perplexity_change)
    return {**result.as_metrics(), "size_mb": round(gguf_file.stat().st_size / 1e6, 2),
            "tokenizer_matches": same_ids}

"""Token-weighted mean loss and perplexity over a dataset of chunks."""

from __future__ import annotations

import math

from qlorapipe.data import model_inputs


def mean_token_loss(model, dataset, batch_size: int, device, max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token cross-entropy over ``dataset``, weighted by predicted tokens.

    Returns:
        (mean loss in nats, number of predicted tokens)
    """
    import torch

    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            if max_batches is not None and start // batch_size >= max_batches:
                break
            batch = dataset[start : start + batch_size]
            labels = batch["labels"].to(device).long()
            # Loss over shifted labels, ignoring -100, computed in float32.
            logits = model(**model_inputs(batch, device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total_loss += loss.item()
            total_tokens += int((shift_labels != -100).sum())
    model.train(was_training)
    if total_tokens == 0:
        return float("nan"), 0
    return total_loss / total_tokens, total_tokens


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 50 else float("inf")

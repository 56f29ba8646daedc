"""Token-weighted mean loss and perplexity over a dataset of chunks."""

from __future__ import annotations

import math

from qlorapipe import modeling
from qlorapipe.data import IGNORE_INDEX, model_inputs
from qlorapipe.memory import LOSS_CHUNK_ELEMENTS


def mean_token_loss(model, dataset, batch_size: int, device, max_batches: int | None = None,
                    chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> tuple[float, int]:
    """Mean next-token cross-entropy over ``dataset``, weighted by predicted tokens.

    The loss is computed in float32 on chunks of ``chunk_elements`` logits at a time. For a model whose
    logits are its output head applied to the last hidden states (``modeling.plain_head_causal_lm``) no
    batch's logits exist whole: the head runs on the hidden states of the predicted positions only, a chunk
    at a time (Qwen2.5's 152k vocabulary at 4 x 2,048 tokens would be 2.5 GB of 16-bit logits, more than a
    training step needs beside the weights). Other models compute a batch's logits whole and only the
    float32 upcast is chunked (upcasting, shifting and log-softmaxing them whole kept three float32 copies
    of the largest activation: Qwen2.5-3B at 4 x 1,024 tokens peaked at 11.25 GB on an H200 that way,
    against 3.79 GB for a training step).

    The model evaluates in eval mode and is put back in the mode it was in. Its 4-bit layers compute as in
    training (``modeling.load_base_model`` keeps bitsandbytes' CPU inference repacking out), so an
    evaluation between training steps leaves the next step as it would have been.

    Returns:
        (mean loss in nats, number of predicted tokens)
    """
    import torch

    was_training = model.training
    model.eval()
    causal_lm = modeling.plain_head_causal_lm(model)
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            if max_batches is not None and start // batch_size >= max_batches:
                break
            batch = dataset[start : start + batch_size]
            labels = batch["labels"].to(device).long()
            targets = labels[:, 1:]  # position t predicts label t + 1
            predicted = targets != IGNORE_INDEX
            if causal_lm is not None:
                hidden = causal_lm.model(**model_inputs(batch, device)).last_hidden_state
                loss = _summed_loss(hidden[:, :-1][predicted], targets[predicted], causal_lm.lm_head,
                                    causal_lm.lm_head.out_features, chunk_elements)
                del hidden
            else:
                logits = model(**model_inputs(batch, device)).logits  # (rows, seq, vocab), compute dtype
                loss = sum(_summed_loss(logits[row, :-1], targets[row], None, logits.shape[-1], chunk_elements)
                           for row in range(logits.shape[0]))
                del logits
            total_loss += float(loss)
            total_tokens += int(predicted.sum())
    model.train(was_training)
    if total_tokens == 0:
        return float("nan"), 0
    return total_loss / total_tokens, total_tokens


def _summed_loss(inputs, targets, head, vocab: int, chunk_elements: int):
    """Summed float32 cross-entropy of ``head(inputs)`` (``inputs`` themselves with no head) against
    ``targets``, ``chunk_elements`` logits at a time."""
    import torch

    step = max(1, chunk_elements // vocab)
    loss = torch.zeros((), device=inputs.device, dtype=torch.float32)
    for first in range(0, inputs.shape[0], step):
        logits = inputs[first : first + step] if head is None else head(inputs[first : first + step])
        loss += torch.nn.functional.cross_entropy(logits.float(), targets[first : first + step],
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    return loss


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 50 else float("inf")

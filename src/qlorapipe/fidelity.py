"""How far a candidate model's logits are from a reference's, on the same eval batches.

The merge stage compares the merged model with base + adapter as trained (its gate), and the
export stage compares each GGUF file read back with the merged model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlorapipe import modeling


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


def scored_positions(dataset, batch_size: int, n_batches: int) -> list:
    """For ``eval_batches``' rows, the positions whose next token is a training target (its label is not
    ``IGNORE_INDEX``): the tokens training and the evaluate stage score. Logits elsewhere (a row's padding,
    prompts, the position before a packed example's first token) are not compared: what a model predicts
    after its padding is nothing anyone runs, and there a quantized file and the merged model may part."""
    from qlorapipe.data import IGNORE_INDEX

    found = []
    for i in range(0, min(len(dataset), batch_size * n_batches), batch_size):
        labels = dataset[i : i + batch_size]["labels"]
        scored = labels.new_zeros(labels.shape, dtype=bool)
        scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        found.append(scored)
    return found


# Float32 logit elements compared at once (64 MiB), whatever the vocabulary: a row of Qwen2.5's
# 151,936-token logits at 512 tokens is 311 MB in float32, and the comparison needs several such
# temporaries (both sides, their difference, the log-softmax).
CHUNK_ELEMENTS = 2**24


def logits_on(model, batches, device, rows_at_once: int | None = None) -> list:
    """float32 logits for each batch, kept on the CPU.

    ``rows_at_once`` runs the model on that many rows at a time (None: the whole batch), so the
    GPU only ever holds that many rows of logits.
    """
    model.eval()
    return _by_rows(batches, rows_at_once, lambda rows: model(input_ids=rows.to(device)).logits)


def _by_rows(batches, rows_at_once: int | None, logits_of) -> list:
    """``logits_of`` each batch, ``rows_at_once`` rows at a time (None: the whole batch), as float32 on the CPU."""
    import torch

    from qlorapipe.memory import to_host

    found = []
    with torch.no_grad():
        for batch in batches:
            step = rows_at_once or batch.shape[0]
            parts = [to_host(logits_of(batch[i : i + step]), torch.float32) for i in range(0, batch.shape[0], step)]
            found.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return found


# Vocabulary rows of the output head ``float32_logits`` upcasts at once (134 MB at a hidden size of 2,048).
HEAD_ROWS = 16384


def float32_logits(model, batches, device, rows_at_once: int | None = None, head_rows: int = HEAD_ROWS) -> list:
    """The logits a float32 copy of ``model`` computes, from ``model`` itself in 16 bits on ``device``.

    Only one block is ever in float32: each decoder block's weights are upcast for its forward and
    rounded back after (exact: a 16-bit value survives the round trip), the embeddings are looked up in
    16 bits and upcast (the same values), and the output head multiplies in float32 ``head_rows``
    vocabulary rows at a time. For a family in ``modeling.PLAIN_HEAD_FAMILIES`` only (``computes_plain_logits``).

    Returns:
        float32 logits for each batch, on the CPU (as ``logits_on``).
    """
    import torch

    decoder, embed, head = model.get_decoder(), model.get_input_embeddings(), model.get_output_embeddings()
    blocks = _upcast_blocks(model)
    dtypes = {id(p): p.dtype for p in model.parameters()}

    def upcast(module, args):
        for param in module.parameters():
            param.data = param.data.float()

    def restore(module, args, output):
        for param in module.parameters():
            param.data = param.data.to(dtypes[id(param)])

    handles = [hook for block in blocks  # always_call: rounded back even when the block's forward raises
               for hook in (block.register_forward_pre_hook(upcast),
                            block.register_forward_hook(restore, always_call=True))]
    def logits_of(rows):
        hidden = decoder(inputs_embeds=embed(rows.to(device)).float(), use_cache=False).last_hidden_state
        logits = torch.empty((*hidden.shape[:2], head.weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for first in range(0, head.weight.shape[0], head_rows):
            bias = None if head.bias is None else head.bias[first : first + head_rows].float()
            logits[..., first : first + head_rows] = torch.nn.functional.linear(
                hidden, head.weight[first : first + head_rows].float(), bias)
        return logits

    model.eval()
    try:
        return _by_rows(batches, rows_at_once, logits_of)
    finally:
        for handle in handles:
            handle.remove()


def _upcast_blocks(model) -> list:
    """The modules ``float32_logits`` upcasts one at a time: the decoder's blocks and its other modules with
    weights (the final norm), the embeddings aside."""
    import torch

    decoder, embed = model.get_decoder(), model.get_input_embeddings()
    blocks = []
    for child in decoder.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks += list(child)
        elif child is not embed and any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


def computes_plain_logits(model) -> bool:
    """Whether ``float32_logits`` computes what ``model`` does: a plain bias-free linear head on the decoder's last
    hidden state (``modeling.plain_head_causal_lm``)."""
    return modeling.plain_head_causal_lm(model) is not None


def float32_working_bytes(model, length: int, head_rows: int = HEAD_ROWS) -> tuple[float, float]:
    """What ``float32_logits`` needs on the GPU beside ``model``'s 16-bit weights: (fixed, per row).

    Fixed: the largest block in float32 and one slice of the head; per row: its float32 logits, the
    hidden states and MLP intermediates of one block, and a full attention score matrix (the math path).
    """
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    vocab, heads = model.get_output_embeddings().weight.shape[0], config.num_attention_heads
    largest = max((sum(p.numel() for p in block.parameters()) for block in _upcast_blocks(model)), default=0)
    fixed = 4.0 * (largest + min(head_rows, vocab) * hidden)
    per_row = 4.0 * length * (vocab + 4 * hidden + 3 * intermediate + heads * length)
    return fixed, per_row


class Comparison:
    """Logit differences and next-token losses of a candidate against a reference, accumulated chunk by chunk.

    Sums are kept in float64, so the figures do not depend on how the logits were chunked.
    """

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS):
        self.chunk_elements = chunk_elements
        self.max_diff, self.diff_sum, self.count = 0.0, 0.0, 0
        self.ref_nll, self.cand_nll, self.tokens = 0.0, 0.0, 0

    def add(self, reference, candidate, ids, scored=None) -> None:
        """One batch: ``reference`` and ``candidate`` logits (rows, length, vocab) of ``ids`` (rows, length), at
        the positions ``scored`` (rows, length; ``scored_positions``) holds true; None: at every position.

        The two may be on different devices and in any float dtype; each chunk is compared in
        float32 on the candidate's device.
        """
        import torch

        device = candidate.device
        rows, length, vocab = candidate.shape
        step = max(1, self.chunk_elements // vocab)
        for row in range(rows):
            for first in range(0, length, step):
                last = min(first + step, length)
                positions = torch.arange(first, last)
                if scored is None:  # every position's logits; all but the row's last predict a token (t -> t + 1)
                    compared, predicting = slice(None), positions[positions < length - 1]
                else:
                    predicting = positions[scored[row, first:last].cpu()]
                    if not len(predicting):
                        continue
                    compared = (predicting - first).to(device)
                ref = reference[row, first:last].to(device, torch.float32)[compared]
                cand = candidate[row, first:last].to(torch.float32)[compared]
                diff = (ref - cand).abs()
                chunk_max = float(diff.max())  # torch's max is NaN where any difference is; Python's max skips it
                self.max_diff = chunk_max if math.isnan(chunk_max) else max(self.max_diff, chunk_max)
                self.diff_sum += float(diff.sum(dtype=torch.float64))
                self.count += diff.numel()
                del diff
                if not len(predicting):
                    continue
                targets = ids[row, (predicting + 1).to(ids.device)].to(device).long()
                self.ref_nll += _summed_nll(ref[: len(predicting)], targets)
                self.cand_nll += _summed_nll(cand[: len(predicting)], targets)
                self.tokens += len(predicting)

    def result(self) -> Fidelity:
        """The figures so far (NaN, which fails every gate, where nothing was scored)."""
        if not self.tokens:
            return Fidelity(math.nan, math.nan, math.nan, math.nan)
        return Fidelity(
            max_logit_diff=self.max_diff,
            mean_logit_diff=self.diff_sum / self.count,
            perplexity=math.exp(self.cand_nll / self.tokens),
            reference_perplexity=math.exp(self.ref_nll / self.tokens),
        )


def each_batch(scored: list | None, batches: list) -> list:
    """``scored`` (``scored_positions``), or None for each of ``batches`` (every position compared)."""
    return [None] * len(batches) if scored is None else scored


def compare(reference_logits: list, candidate_logits: list, batches: list, scored: list | None = None) -> Fidelity:
    """Logit differences and perplexities of a candidate against the reference on the same batches, at the
    ``scored`` positions of each (None: every position)."""
    comparison = Comparison()
    for ref, cand, ids, mask in zip(reference_logits, candidate_logits, batches, each_batch(scored, batches)):
        comparison.add(ref, cand, ids, mask)
    return comparison.result()


def compare_model(reference_logits: list, model, batches: list, device, rows_at_once: int = 1,
                  scored: list | None = None) -> Fidelity:
    """``compare`` with the candidate's logits computed ``rows_at_once`` rows at a time and compared where they are."""
    import torch

    model.eval()
    comparison = Comparison()
    with torch.no_grad():
        for ref, ids, mask in zip(reference_logits, batches, each_batch(scored, batches)):
            for i in range(0, ids.shape[0], rows_at_once):
                rows = ids[i : i + rows_at_once]
                comparison.add(ref[i : i + rows_at_once], model(input_ids=rows.to(device)).logits, rows,
                               None if mask is None else mask[i : i + rows_at_once])
    return comparison.result()


def _summed_nll(logits, targets) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(logits, targets, reduction="none").sum(dtype=torch.float64))

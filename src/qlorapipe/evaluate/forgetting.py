"""Forgetting: perplexity on a general corpus that is not the training data.

A fine-tune that lowers the held-out loss of its own task can raise the loss on everything
else; measuring base and fine-tuned on a different corpus shows how much. The corpus is cut
like the text data the pipeline trains on: documents joined with EOS, cut into rows of the
prepared rows' length.
"""

from __future__ import annotations

from qlorapipe.errors import UserError


def general_rows(texts: list[str], tokenizer, row_length: int, n_rows: int, source: str) -> list[list[int]]:
    """The first ``n_rows`` rows of ``row_length`` tokens of the corpus stream (one shorter row when it is short).

    Raises:
        UserError: the corpus has fewer than two tokens.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) >= row_length * n_rows:
            break
    if len(stream) < 2:
        raise UserError(f"evaluate.general_corpus '{source}' holds {len(stream)} token(s): name a larger corpus, "
                        "or null to skip the forgetting figures")
    if len(stream) < row_length:
        return [stream]
    return [stream[i : i + row_length] for i in range(0, len(stream) - row_length + 1, row_length)][:n_rows]


def as_dataset(rows: list[list[int]]):
    """Rows as the split ``perplexity.mean_token_loss`` reads (every token predicted)."""
    from qlorapipe import data

    return data.rows_split({"input_ids": rows, "labels": rows})

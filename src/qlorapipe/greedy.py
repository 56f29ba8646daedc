"""Greedy generation from token-id prompts in left-padded batches (evaluate's answers, export's references).

A 4-bit model with adapters generates one token per forward pass, and on a GPU (or the CPU's
dequantizing 4-bit path) a pass costs about as much for a batch as for one prompt: batching the
prompts divides the passes by the batch size. Prompts of similar length go together (less
padding); positions follow the attention mask, so a padded prompt gets the tokens it gets alone
(tests compare the two).
"""

from __future__ import annotations


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end generation: the generation config's EOS ids (end of turn included) and the tokenizer's."""
    ids = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device, stop_ids: set[int],
             pad_id: int | None, advance=None, adapter_names: list[str] | None = None) -> list[list[int]]:
    """The new tokens of each prompt's greedy continuation, in the prompts' order: up to ``max_new_tokens``,
    ending with padding after a stop token when a row stopped before the others.

    Args:
        pad_id: the id that fills the left of shorter prompts (None: the smallest stop id).
        advance: called with the number of prompts done after each batch (progress).
        adapter_names: for a peft model, the adapter each prompt runs with (``"__base__"``: none), so
            base and fine-tuned answers share the batches (peft's mixed-adapter batches).
    """
    import torch

    pad = pad_id if pad_id is not None else min(stop_ids, default=0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    new_tokens: list[list[int]] = [[] for _ in prompts]
    model.eval()
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        mixed = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in batch]}
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                       eos_token_id=sorted(stop_ids) or None, use_cache=True, **mixed)
        for row, i in enumerate(batch):
            new_tokens[i] = generated[row, width:].tolist()
        if advance is not None:
            advance(len(batch))
    return new_tokens

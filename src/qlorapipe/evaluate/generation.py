"""Greedy sample generations, so base and fine-tuned outputs can be compared side by side."""

from __future__ import annotations

from qlorapipe import greedy
from qlorapipe.data import chat_prompt_ids
from qlorapipe.evaluate import tasks


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, chat_template: bool,
             stop_ids: set[int]) -> dict[str, list[str]]:
    """Greedy continuations of ``prompts`` by the base (``"base"``) and base + adapter (``"finetuned"``),
    deterministic so diffs between runs mean something.

    Both models' continuations go in one left-padded batch (peft's mixed-adapter batches: the base
    rows skip the adapter), half the forward passes of two batches; on the CPU that about halves the time
    (benchmarks/samples_speed.py). Each stops at ``stop_ids`` (the stop token is not part of the text)."""
    encoded = []
    for prompt in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            encoded.append(chat_prompt_ids(tokenizer, text))  # as training examples begin
        else:
            encoded.append(tokenizer(prompt)["input_ids"])
    names = [greedy.BASE] * len(encoded) + [model.active_adapter] * len(encoded)
    answers = tasks.generate_answers(model, tokenizer, encoded + encoded, max_new_tokens, max(len(names), 1), device,
                                     stop_ids, adapter_names=names)
    texts = [tokenizer.decode(answer.ids, skip_special_tokens=True) for answer in answers]
    return {"base": texts[: len(encoded)], "finetuned": texts[len(encoded):]}

"""Greedy sample generations, so base and fine-tuned outputs can be compared side by side."""

from __future__ import annotations

from qlorapipe.evaluate import tasks


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, chat_template: bool,
             stop_ids: set[int]) -> list[str]:
    """Greedy continuations of ``prompts`` (deterministic, so diffs between runs mean something), all in
    one left-padded batch: a 4-bit model on a GPU takes about as long for a batch as for one prompt.
    Each stops at ``stop_ids`` (the stop token is not part of the text)."""
    encoded = []
    for prompt in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            encoded.append(tokenizer(prompt)["input_ids"])
    answers = tasks.generate_answers(model, tokenizer, encoded, max_new_tokens, max(len(encoded), 1), device, stop_ids)
    return [tokenizer.decode(answer.ids, skip_special_tokens=True) for answer in answers]

"""Greedy sample generations, so base and fine-tuned outputs can be compared side by side."""

from __future__ import annotations


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, chat_template: bool) -> list[str]:
    """Greedy continuations of ``prompts`` (deterministic, so diffs between runs mean something)."""
    import torch

    outputs = []
    model.eval()
    for prompt in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = tokenizer(prompt, return_tensors="pt")
        encoded = {k: v.to(device) for k, v in encoded.items()}
        with torch.no_grad():
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                use_cache=True,
            )
        new_tokens = generated[0, encoded["input_ids"].shape[1] :]
        outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return outputs

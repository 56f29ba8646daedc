"""Evaluate's samples: base and fine-tuned one after the other against both in one mixed-adapter batch.

    PYTHONPATH=src python benchmarks/samples_speed.py --base models/base --adapter models/adapter --repeats 3

Loads the base as the evaluate stage does (params.yaml's quantization) with the adapter, then, after
a two-token warm-up, times per repeat: the base (adapter disabled) and base + adapter generating
``evaluate.prompts`` one model after the other, as the stage did before, and both in one batch, as
``generation.generate`` does now (plain prompts, no chat template). Prints both seconds and whether every row's tokens are the same.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlorapipe import greedy, modeling
    from qlorapipe.evaluate import generation
    from qlorapipe.params import load_sections

    sections = load_sections(args.params, "quantization", "evaluate")
    quant, params = sections["quantization"], sections["evaluate"]
    device = modeling.pick_device()
    base, _ = modeling.load_base_model(args.base, quant, device)
    model = PeftModel.from_pretrained(base, args.adapter)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    stops = greedy.stop_token_ids(model, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in params.prompts]
    batch = max(len(prompts), 1)
    greedy.generate(model, prompts, 2, batch, device, stops, tokenizer.pad_token_id)
    for _ in range(args.repeats):
        started = time.perf_counter()
        with model.disable_adapter():
            base_alone = greedy.generate(model, prompts, params.max_new_tokens, batch, device, stops,
                                         tokenizer.pad_token_id)
        tuned_alone = greedy.generate(model, prompts, params.max_new_tokens, batch, device, stops,
                                      tokenizer.pad_token_id)
        separate = time.perf_counter() - started
        started = time.perf_counter()
        both = generation.generate(model, tokenizer, params.prompts, params.max_new_tokens, device, False, stops)
        together = time.perf_counter() - started
        same = (texts(tokenizer, base_alone, stops), texts(tokenizer, tuned_alone, stops)) == (both["base"],
                                                                                               both["finetuned"])
        print(f"one model after the other {separate:.2f} s, both in one batch {together:.2f} s, same text: {same}")


def texts(tokenizer, rows: list[list[int]], stops: set[int]) -> list[str]:
    """Each row's new tokens up to its stop token, as text (what generation.generate returns)."""
    cut = [next((row[:k] for k, token in enumerate(row) if token in stops), row) for row in rows]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in cut]


if __name__ == "__main__":
    main()

"""Greedy decoding on a GPU: transformers' generate against the static-cache decoder with CUDA graphs.

    PYTHONPATH=src python benchmarks/decode_speed.py --base models/base --adapter models/adapter --repeats 3

Loads the base as the evaluate stage does (params.yaml's quantization) with the adapter, then, after
a two-token warm-up of each decoder, times per repeat:
- evaluate's samples: ``evaluate.prompts`` for base and fine-tuned (``evaluate.max_new_tokens``),
  by ``generate`` in one mixed-adapter batch and by the static decoder (one batch per adapter);
- merge's speed figure: one row of 16 prompt tokens and ``merge.speed_new_tokens`` new ones
  (``merge.speed.measure_speed``'s tokens per second) by each decoder, base + adapter.
Prints seconds, the ratio, and whether both decoders chose the same tokens.
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

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlorapipe import greedy, modeling
    from qlorapipe.params import load_sections

    sections = load_sections(args.params, "quantization", "evaluate", "merge")
    quant, params, merge = sections["quantization"], sections["evaluate"], sections["merge"]
    device = modeling.pick_device()
    started = time.perf_counter()
    base, _ = modeling.load_base_model(args.base, quant, device)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    print(f"loaded in {time.perf_counter() - started:.1f} s; static decoder used by default: "
          f"{greedy.uses_static_decoder(model, device)}")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    stops = greedy.stop_token_ids(model, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in params.prompts]
    rows = prompts + prompts
    names = [greedy.BASE] * len(prompts) + [model.active_adapter] * len(prompts)
    one = [list(range(100, 116))]

    def timed(function):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begun = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - begun, result

    def samples(count, static):
        return greedy.generate(model, rows, count, len(rows), device, stops, tokenizer.pad_token_id,
                               adapter_names=names, static=static)

    for static in (False, True):  # warm-up of each
        seconds, _ = timed(lambda static=static: samples(2, static))
        print(f"warm-up (2 tokens) {'static' if static else 'generate'}: {seconds:.2f} s")
    for _ in range(args.repeats):
        figures = {static: timed(lambda static=static: samples(params.max_new_tokens, static))
                   for static in (False, True)}
        (slow, slow_tokens), (fast, fast_tokens) = figures[False], figures[True]
        print(f"samples ({len(rows)} rows x {params.max_new_tokens} tokens): generate {slow:.2f} s, static "
              f"{fast:.2f} s, ratio {slow / fast:.2f}x, same tokens: {slow_tokens == fast_tokens}")
        speed = {static: timed(lambda static=static: greedy.generate(model, one, merge.speed_new_tokens, 1, device,
                                                                     set(), 0, static=static))
                 for static in (False, True)}
        (slow, slow_tokens), (fast, fast_tokens) = speed[False], speed[True]
        print(f"one row x {merge.speed_new_tokens} tokens: generate {merge.speed_new_tokens / slow:.1f} tok/s, "
              f"static {merge.speed_new_tokens / fast:.1f} tok/s, ratio {slow / fast:.2f}x, "
              f"same tokens: {slow_tokens == fast_tokens}")
    if device.type == "cuda":
        print(f"peak allocated {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

"""Held-out perplexity of the 4-bit base with and without the adapter, and sample generations.

    python stages/evaluate.py --params params.yaml --base models/base --adapter models/adapter \
        --data data/prepared --metrics metrics/eval.json --samples metrics/samples.json

Reads the ``quantization`` and ``evaluate`` sections of params.yaml.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from qlorapipe import data, generation, modeling
from qlorapipe.adapters import check_adapter_matches_base
from qlorapipe.console import run_stage
from qlorapipe.outputs import write_json
from qlorapipe.params import load_section
from qlorapipe.perplexity import mean_token_loss, perplexity

logger = logging.getLogger("evaluate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True, help="JSON with base and fine-tuned generations")
    args = parser.parse_args(argv)
    quant = load_section(args.params, "quantization")
    params = load_section(args.params, "evaluate")
    eval_set = data.load_split(args.data, data.EVAL_SPLIT)
    check_adapter_matches_base(args.adapter, args.base)

    from peft import PeftModel
    from transformers import AutoTokenizer

    device = modeling.pick_device()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base, _ = modeling.load_base_model(args.base, quant, device)
    model = PeftModel.from_pretrained(base, args.adapter)
    metrics = {}
    samples = {"prompts": params.prompts, "base": [], "finetuned": []}
    for name, adapter_on in (("base", False), ("finetuned", True)):
        started = time.perf_counter()
        if adapter_on:
            loss, tokens = mean_token_loss(model, eval_set, params.batch_size, device, params.max_eval_batches)
            samples[name] = generation.generate(model, tokenizer, params.prompts, params.max_new_tokens, device,
                                                params.chat_template)
        else:
            with model.disable_adapter():
                loss, tokens = mean_token_loss(model, eval_set, params.batch_size, device, params.max_eval_batches)
                samples[name] = generation.generate(model, tokenizer, params.prompts, params.max_new_tokens,
                                                    device, params.chat_template)
        metrics[name] = {"loss": round(loss, 5), "perplexity": round(perplexity(loss), 4)}
        logger.info("%s: eval loss %.4f, perplexity %.3f over %d tokens (%.1f s)", name, loss, perplexity(loss),
                    tokens, time.perf_counter() - started)
    metrics["eval_tokens"] = tokens
    metrics["perplexity_reduction"] = round(1 - metrics["finetuned"]["perplexity"] / metrics["base"]["perplexity"], 5)
    write_json(args.metrics, metrics)
    write_json(args.samples, samples)


if __name__ == "__main__":
    run_stage(main)

"""Merge the adapter into a standalone 16-bit model, and gate on its fidelity.

    python stages/merge.py --params params.yaml --base models/base --adapter models/adapter \
        --data data/prepared --out models/merged --metrics metrics/merge.json

Reads the ``quantization`` and ``merge`` sections of params.yaml. The base is dequantized
from 4-bit before merging, so the merged model computes what was trained; the stage
measures that on eval batches (and, for comparison, the naive merge into the original
16-bit base and, with merge.requantized_candidate, the merged model quantized again) and
fails when merge.max_logit_diff, merge.max_mean_logit_diff or merge.max_perplexity_change is
exceeded. It also times generation with base + adapter and with the merged model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from qlorapipe import data, merging, modeling, speed
from qlorapipe.adapters import ADAPTER_RECORD, check_adapter_matches_base
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir, write_json
from qlorapipe.params import load_section

logger = logging.getLogger("merge")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="merged model directory to write")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    quant = load_section(args.params, "quantization")
    params = load_section(args.params, "merge")
    eval_set = data.load_split(args.data, data.EVAL_SPLIT)
    check_adapter_matches_base(args.adapter, args.base)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = modeling.pick_device()
    dtype = getattr(torch, params.dtype)
    batches = merging.eval_batches(eval_set, batch_size=4, n_batches=params.fidelity_batches)

    # The reference: base + adapter exactly as trained.
    base, _ = modeling.load_base_model(args.base, quant, device)
    with_adapter = PeftModel.from_pretrained(base, args.adapter)
    reference = merging.logits_on(with_adapter, batches, device)
    timings = {}
    # Serving cost of the dynamic adapter against the merged model, on the first eval tokens.
    speed_prompt = batches[0][:1, :16]
    if params.speed_new_tokens:
        with_adapter.config.use_cache = True
        timings["base_plus_adapter"] = speed.measure_speed(with_adapter, speed_prompt, params.speed_new_tokens, device)
    del base, with_adapter

    naive = merging.compare(reference, merging.logits_on(
        merging.naive_merge(args.base, args.adapter, dtype, device), batches, device), batches)

    with atomic_dir(args.out) as out:
        merged = merging.dequantized_merge(args.base, args.adapter, quant, dtype, device)
        merged.config.dtype = params.dtype
        merged.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(args.base).save_pretrained(out)
        shutil.copy2(args.adapter / ADAPTER_RECORD, out / ADAPTER_RECORD)
        del merged
        # Measure the model as saved: reload it from disk, as users will.
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map={"": device})
        fidelity = merging.compare(reference, merging.logits_on(reloaded, batches, device), batches)
        if params.speed_new_tokens:
            timings["merged"] = speed.measure_speed(reloaded, speed_prompt, params.speed_new_tokens, device)
        del reloaded
        metrics = {
            "merged": fidelity.as_metrics(),
            "naive_merge_into_16bit_base": naive.as_metrics(),
            "reference_perplexity": round(fidelity.reference_perplexity, 5),
            "dtype": params.dtype,
            "eval_tokens": sum(b.numel() for b in batches),
        }
        if timings:
            metrics["speed"] = timings
        if params.requantized_candidate and quant.load_in != "none":
            # What users get when they serve the merged model quantized again: the merged weights are
            # rounded to the quantization grid a second time, so this differs more than the merge itself.
            requantized, _ = modeling.load_base_model(out, quant, device)
            metrics[f"merged_requantized_{quant.load_in}"] = merging.compare(
                reference, merging.logits_on(requantized, batches, device), batches).as_metrics()
            del requantized
        logger.info("merged vs base+adapter: max logit diff %.4f, perplexity change %+.3f%% "
                    "(naive merge into the 16-bit base: %.4f, %+.3f%%)",
                    fidelity.max_logit_diff, 100 * fidelity.perplexity_change,
                    naive.max_logit_diff, 100 * naive.perplexity_change)
        problems = []
        if fidelity.max_logit_diff > params.max_logit_diff:
            problems.append(f"max logit difference {fidelity.max_logit_diff:.4f} > merge.max_logit_diff "
                            f"{params.max_logit_diff}")
        if fidelity.mean_logit_diff > params.max_mean_logit_diff:
            problems.append(f"mean logit difference {fidelity.mean_logit_diff:.4f} > merge.max_mean_logit_diff "
                            f"{params.max_mean_logit_diff}")
        if abs(fidelity.perplexity_change) > params.max_perplexity_change:
            problems.append(f"perplexity change {fidelity.perplexity_change:+.4f} exceeds merge.max_perplexity_change "
                            f"{params.max_perplexity_change}")
        if problems:
            raise UserError(
                "the merged model does not compute what was trained: " + "; ".join(problems)
                + " (try merge.dtype: float32, or raise the threshold if this is expected)"
            )
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)

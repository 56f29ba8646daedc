"""Merge step: the adapter merged into the dequantized base, saved, measured, and gated.

The base is dequantized from 4-bit before merging, so the merged model computes what was
trained (``merging``); the step measures that on eval batches against base + adapter as
trained (``qlorapipe.fidelity``), and, for comparison, the naive merge into the original 16-bit
base and, with merge.requantized_candidate, the merged model quantized again. ``gate`` fails
the step when a bound is exceeded. ``speed`` times generation with base + adapter and merged.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from qlorapipe import data, fidelity, modeling
from qlorapipe.merge import gate, merging, speed
from qlorapipe.outputs import atomic_dir, write_json
from qlorapipe.params import MergeParams, QuantizationParams
from qlorapipe.records import ADAPTER_RECORD, check_adapter_matches_base, read_source_record

logger = logging.getLogger(__name__)


def run(quant: QuantizationParams, params: MergeParams, base_dir: Path, adapter_dir: Path, data_dir: Path,
        out_dir: Path, metrics_path: Path) -> dict:
    """Merge, save to ``out_dir`` (replaced only when the gate passes) and write the metrics.

    Args:
        quant: how the base was quantized in training.
        params: the merge section.
        base_dir, adapter_dir, data_dir: the base model, the adapter and the prepared data.
        out_dir: the merged model directory to write (models/merged).
        metrics_path: where the metrics go (JSON).

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, an adapter of another base, or a merge that fails the gate.
    """
    eval_set = data.load_split(data_dir, data.EVAL_SPLIT)
    check_adapter_matches_base(adapter_dir, base_dir)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = modeling.pick_device()
    trust = read_source_record(base_dir).trust_remote_code  # a custom-code model loads with its code
    dtype = getattr(torch, params.dtype)
    batches = fidelity.eval_batches(eval_set, batch_size=4, n_batches=params.fidelity_batches)

    # The reference: base + adapter exactly as trained.
    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    reference = fidelity.logits_on(with_adapter, batches, device)
    timings = {}
    # Serving cost of the dynamic adapter against the merged model, on the first eval tokens.
    speed_prompt = batches[0][:1, :16]
    if params.speed_new_tokens:
        with_adapter.config.use_cache = True
        timings["base_plus_adapter"] = speed.measure_speed(with_adapter, speed_prompt, params.speed_new_tokens, device)
    del base, with_adapter

    naive = fidelity.compare(reference, fidelity.logits_on(
        merging.naive_merge(base_dir, adapter_dir, dtype, device, trust), batches, device), batches)

    with atomic_dir(out_dir) as out:
        merged = merging.dequantized_merge(base_dir, adapter_dir, quant, dtype, device, trust)
        merged.config.dtype = params.dtype
        merged.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust).save_pretrained(out)
        shutil.copy2(adapter_dir / ADAPTER_RECORD, out / ADAPTER_RECORD)
        del merged
        # Measure the model as saved: reload it from disk, as users will.
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map={"": device},
                                                        trust_remote_code=trust)
        merged_fidelity = fidelity.compare(reference, fidelity.logits_on(reloaded, batches, device), batches)
        if params.speed_new_tokens:
            timings["merged"] = speed.measure_speed(reloaded, speed_prompt, params.speed_new_tokens, device)
        del reloaded
        metrics = {
            "merged": merged_fidelity.as_metrics(),
            "naive_merge_into_16bit_base": naive.as_metrics(),
            "reference_perplexity": round(merged_fidelity.reference_perplexity, 5),
            "dtype": params.dtype,
            "eval_tokens": sum(b.numel() for b in batches),
        }
        if timings:
            metrics["speed"] = timings
        if params.requantized_candidate and quant.load_in != "none":
            # What users get when they serve the merged model quantized again: the merged weights are
            # rounded to the quantization grid a second time, so this differs more than the merge itself.
            requantized, _ = modeling.load_base_model(out, quant, device, trust_remote_code=trust)
            metrics[f"merged_requantized_{quant.load_in}"] = fidelity.compare(
                reference, fidelity.logits_on(requantized, batches, device), batches).as_metrics()
            del requantized
        logger.info("merged vs base+adapter: max logit diff %.4f, perplexity change %+.3f%% "
                    "(naive merge into the 16-bit base: %.4f, %+.3f%%)",
                    merged_fidelity.max_logit_diff, 100 * merged_fidelity.perplexity_change,
                    naive.max_logit_diff, 100 * naive.perplexity_change)
        gate.check(merged_fidelity, params)
    write_json(metrics_path, metrics)
    return metrics

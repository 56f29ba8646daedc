"""Merge step: the adapter merged into the dequantized base, saved, measured, and gated.

The base is dequantized from 4-bit before merging, so the merged model computes what was
trained (``merging``); the step measures that on eval batches against base + adapter as
trained (``qlorapipe.fidelity``), and, for comparison, the naive merge into the original 16-bit
base and, with merge.requantized_candidate, the merged model quantized again. ``gate`` fails
the step when a bound is exceeded. ``speed`` times generation with base + adapter and merged. An 8-bit
base is the reference with LLM.int8()'s rounding of matmul inputs off (``merging.int8_inputs_unrounded``);
the merged model's figures against it as trained are reported beside (not gated).
"""

from __future__ import annotations

import gc
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlorapipe import data, fidelity, memory, modeling
from qlorapipe.clock import PhaseClock
from qlorapipe.merge import gate, merging, speed
from qlorapipe.outputs import atomic_dir, write_json
from qlorapipe.params import MergeParams, QuantizationParams
from qlorapipe.records import (
    ADAPTER_RECORD,
    check_adapter_matches_base,
    read_source_record,
    trained_chat_template,
)

logger = logging.getLogger(__name__)

# Rows of logits at once: at most this many bytes of them in 16 bits (Qwen2.5, 151,936 tokens x 512: one row).
_LOGITS_BYTES = 2**28


def run(quant: QuantizationParams, params: MergeParams, budget_gb: float | None, base_dir: Path, adapter_dir: Path,
        data_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    """Merge, save to ``out_dir`` (replaced only when the gate passes) and write the metrics.

    On a GPU every phase stays within the memory budget: base + adapter computes the reference
    logits a few rows at a time, the merge goes layer by layer into a model on the CPU
    (``merging``), and the merged models are compared with as many blocks on the GPU as the
    budget holds, the rest streamed from the CPU (``memory.place``).

    Args:
        quant: how the base was quantized in training.
        params: the merge section.
        budget_gb: acceleration.memory_budget_gb (None: 90% of the GPU's memory).
        base_dir, adapter_dir, data_dir: the base model, the adapter and the prepared data.
        out_dir: the merged model directory to write (models/merged).
        metrics_path: where the metrics go (JSON).

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, an adapter of another base, a budget too small for this model,
            or a merge that fails the gate.
    """
    eval_set = data.load_split(data_dir, data.EVAL_SPLIT)
    check_adapter_matches_base(adapter_dir, base_dir)

    import torch
    from peft import PeftModel

    device = modeling.pick_device()
    trust = read_source_record(base_dir).trust_remote_code  # a custom-code model loads with its code
    dtype = getattr(torch, params.dtype)
    batches = fidelity.eval_batches(eval_set, batch_size=4, n_batches=params.fidelity_batches)
    scored = fidelity.scored_positions(eval_set, batch_size=4, n_batches=params.fidelity_batches)
    budget = memory.budget_bytes(budget_gb, device)
    rows, reserve = _check_budget(base_dir, quant, dtype, batches, budget, budget_gb, trust,
                                  params.naive_comparison, _adapter_bytes(adapter_dir))
    memory.reset_peak(device)
    clock = PhaseClock("merge")
    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    clock.lap("load")
    # On a GPU the merged model is written while base + adapter computes the reference logits.
    beside = memory.write_beside_compute(device)
    with atomic_dir(out_dir) as out, ThreadPoolExecutor(max_workers=1) as saver:
        # Merged before base + adapter computes anything: on CPUs with AVX512-BF16, bitsandbytes repacks
        # 4-bit weights at their first inference forward, re-rounding their scales.
        merged = merging.merged_model(with_adapter, base_dir, dtype, from_quantized=True, trust_remote_code=trust)
        merged.config.dtype = params.dtype
        clock.lap("merge")
        saved = saver.submit(_save, merged, out, base_dir, adapter_dir, trust)
        del merged  # the writer holds it until it is written
        if not beside:
            saved.result()
            gc.collect()
            clock.lap("save")
        # The reference: base + adapter exactly as trained.
        reference = as_trained = fidelity.logits_on(with_adapter, batches, device, rows_at_once=rows)
        if quant.load_in == "8bit":  # without LLM.int8()'s rounding of each matmul's input, which merging cannot keep
            with merging.int8_inputs_unrounded():
                reference = fidelity.logits_on(with_adapter, batches, device, rows_at_once=rows)
        clock.lap("reference")
        if beside:
            saved.result()  # before anything is timed, and before the next 16-bit model is built
            gc.collect()
            clock.lap("save")
        timings = {}
        # Serving cost of the dynamic adapter against the merged model, on the first eval tokens.
        speed_prompt = batches[0][:1, :16]
        if params.speed_new_tokens:
            with_adapter.config.use_cache = True
            timings["base_plus_adapter"] = speed.measure_speed(with_adapter, speed_prompt, params.speed_new_tokens,
                                                               device)
            with_adapter.config.use_cache = False
            clock.lap("speed")
        # The naive merge needs only the adapters from here on: the quantized weights go.
        adapters = merging.adapters_only(with_adapter) if params.naive_comparison else None
        del base, with_adapter
        if adapters is not None:
            merging.move_adapters(adapters, "cpu")  # the merged model's room; back on the device for the naive step
        memory.release(device)
        # Measure the model as saved: reload it from disk, as users will.
        reloaded, offloaded = memory.place(memory.load_on_cpu(out, dtype, trust), device, budget, reserve)
        merged_fidelity = fidelity.compare_model(reference, reloaded, batches, device, rows, scored)
        beside_rounding = None
        if as_trained is not reference:
            beside_rounding = fidelity.compare_model(as_trained, reloaded, batches, device, rows, scored)
        clock.lap("reload_and_compare")
        if params.speed_new_tokens and not offloaded:
            reloaded.config.use_cache = True
            timings["merged"] = speed.measure_speed(reloaded, speed_prompt, params.speed_new_tokens, device)
            reloaded.config.use_cache = False
            clock.lap("speed")
        elif params.speed_new_tokens:
            logger.info("Merged model not timed: %d modules stream from the CPU within the memory budget", offloaded)
        naive = None
        if adapters is not None:
            # The merged model becomes the naive one where it is; one streaming from the CPU is loaded again whole
            # on the CPU first (its streamed weights are accelerate's, not the model's).
            if offloaded:
                del reloaded
                memory.release(device)
                reloaded = memory.load_on_cpu(out, dtype, trust)
            merging.move_adapters(adapters, device)
            merging.naive_in_place(reloaded, adapters, memory.load_on_cpu(base_dir, "auto", trust), dtype)
            del adapters
            if offloaded:
                reloaded, _ = memory.place(reloaded, device, budget, reserve)
            naive = fidelity.compare_model(reference, reloaded, batches, device, rows, scored)
            clock.lap("naive")
        del reloaded
        memory.release(device)
        metrics = {
            "merged": merged_fidelity.as_metrics(),
            **({"merged_vs_int8_inputs_rounded": beside_rounding.as_metrics()} if beside_rounding else {}),
            **({"naive_merge_into_16bit_base": naive.as_metrics()} if naive is not None else {}),
            "reference_perplexity": round(merged_fidelity.reference_perplexity, 5),
            "dtype": params.dtype,
            "eval_tokens": sum(b.numel() for b in batches),
            "scored_tokens": sum(int(s.sum()) for s in scored),
            "offloaded_modules": offloaded,
        }
        if timings:
            metrics["speed"] = timings
        if params.requantized_candidate and quant.load_in != "none":
            # What users get when they serve the merged model quantized again: the merged weights are
            # rounded to the quantization grid a second time, so this differs more than the merge itself.
            requantized, _ = modeling.load_base_model(out, quant, device, trust_remote_code=trust)
            metrics[f"merged_requantized_{quant.load_in}"] = fidelity.compare_model(  # computes as trained did
                as_trained, requantized, batches, device, rows, scored).as_metrics()
            del requantized
            clock.lap("requantized")
        metrics["seconds"] = clock.seconds
        metrics["memory"] = memory.peak_metrics(device, budget)
        logger.info("merged vs base+adapter: max logit diff %.4f, perplexity change %+.3f%%%s; %s",
                    merged_fidelity.max_logit_diff, 100 * merged_fidelity.perplexity_change,
                    "" if naive is None else f" (naive merge into the 16-bit base: {naive.max_logit_diff:.4f}, "
                                             f"{100 * naive.perplexity_change:+.3f}%)",
                    modeling.memory_summary(device))
        gate.check(merged_fidelity, params)
    write_json(metrics_path, metrics)
    return metrics


def _save(merged, out: Path, base_dir: Path, adapter_dir: Path, trust: bool) -> None:
    """The merged model in safetensors, with the base's tokenizer (and the chat template the adapter was trained
    with, when data.chat_template gave one) and the adapter's record."""
    merged.save_pretrained(out, safe_serialization=True)
    modeling.load_tokenizer(base_dir, trust, trained_chat_template(adapter_dir)).save_pretrained(out)
    shutil.copy2(adapter_dir / ADAPTER_RECORD, out / ADAPTER_RECORD)


def _check_budget(base_dir: Path, quant: QuantizationParams, dtype, batches, budget: float | None,
                  budget_gb: float | None, trust: bool, naive_comparison: bool,
                  adapter_bytes: int = 0) -> tuple[int, float]:
    """Rows of logits computed at once, and the working memory beside the placed merged model's weights; stops
    early when the smallest working set cannot fit the budget.

    The binding phase is the first: the quantized base + adapter must sit whole on the GPU, with one
    layer's weight dequantized and merged in float32 (three copies) and ``rows`` rows of logits. The
    16-bit merged models can stream from the CPU block by block. With ``naive_comparison`` the working
    memory also holds the naive merge of one layer and the adapters (``adapter_bytes``), which wait on the CPU
    while the merged model is placed (``merging.naive_in_place``).

    Raises:
        UserError: the budget is below what the stage needs for this model.
    """
    skeleton = memory.meta_model(base_dir, trust)
    vocab = skeleton.get_output_embeddings().weight.shape[0]
    length = max(b.shape[1] for b in batches)
    rows = max(1, min(max(b.shape[0] for b in batches), int(_LOGITS_BYTES // (length * vocab * 2))))
    # The model's logits in 16 bits, their float32 copy, and the comparison's float32 chunks.
    reserve = memory.logits_bytes(rows, length, vocab, 2 + 4) + 6 * 4 * fidelity.CHUNK_ELEMENTS + memory.SLACK_BYTES
    quantized = memory.weight_bytes(skeleton, quant.load_in, quant.use_double_quant)
    need = quantized + 3 * 4 * memory.largest_weight(skeleton) + reserve
    if naive_comparison:
        # The naive merge in place, one adapted weight at a time on the device beside the placed merged model: the
        # 16-bit base weight sent there, its float32 copy, the float32 delta and sum, and their cast.
        reserve = max(reserve, 16 * memory.largest_weight(skeleton) + adapter_bytes)
    streamed = memory.largest_block_bytes(skeleton, dtype.itemsize) * 2 + reserve
    memory.check_fits("merge", max(need, streamed), budget, budget_gb,
                      "the quantized base + adapter, one layer merged in float32 and a row of logits")
    return rows, reserve


def _adapter_bytes(adapter_dir: Path) -> int:
    """The LoRA layers' weights on the device (what ``merging.adapters_only`` keeps: not the trained copies of
    ``lora.modules_to_save``): float32, as peft loads 16-bit adapters too (from the file's header)."""
    import math

    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return 0
    with safe_open(str(weights), "pt") as tensors:
        return sum(4 * math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys()
                   if "lora_" in key or key.endswith(".bias"))

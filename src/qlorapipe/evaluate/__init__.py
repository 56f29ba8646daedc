"""Evaluate step: held-out perplexity of the quantized base with and without the adapter, and samples."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qlorapipe import data, modeling
from qlorapipe.evaluate import generation
from qlorapipe.outputs import write_json
from qlorapipe.params import EvaluateParams, QuantizationParams
from qlorapipe.perplexity import mean_token_loss, perplexity
from qlorapipe.records import check_adapter_matches_base, read_source_record

logger = logging.getLogger(__name__)


def run(quant: QuantizationParams, params: EvaluateParams, base_dir: Path, adapter_dir: Path, data_dir: Path,
        metrics_path: Path, samples_path: Path) -> dict:
    """Measure base and fine-tuned on the eval split and generate from both for ``params.prompts``.

    Args:
        quant: how the base was quantized in training (it is loaded the same way).
        params: the evaluate section.
        base_dir, adapter_dir, data_dir: the base model, the adapter and the prepared data.
        metrics_path: where the metrics go (JSON).
        samples_path: where the generations go (JSON).

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, or an adapter trained on another base.
    """
    eval_set = data.load_split(data_dir, data.EVAL_SPLIT)
    check_adapter_matches_base(adapter_dir, base_dir)

    from peft import PeftModel
    from transformers import AutoTokenizer

    device = modeling.pick_device()
    trust = read_source_record(base_dir).trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust)
    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust)
    model = PeftModel.from_pretrained(base, adapter_dir)
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
    write_json(metrics_path, metrics)
    write_json(samples_path, samples)
    return metrics

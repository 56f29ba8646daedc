"""Evaluate step: the quantized base with and without the adapter, measured the ways users ask.

- held-out perplexity (the loss the run trained on);
- task scores: the held-out prompts answered greedily and scored against their references
  (exact match, ROUGE-L, BLEU, chrF), and whether answers stop by themselves (``tasks``);
- forgetting: perplexity on a general corpus that is not the training data (``forgetting``);
- lm-eval-harness tasks when ``evaluate.lm_eval_tasks`` names any (``harness``);
- greedy samples for ``evaluate.prompts`` (``generation``).
Every figure is written for base and fine-tuned side by side, and drawn (``chart``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import corpora, data, greedy, memory, modeling
from qlorapipe.clock import PhaseClock
from qlorapipe.console import console
from qlorapipe.errors import UserError
from qlorapipe.evaluate import chart, forgetting, generation, tasks
from qlorapipe.outputs import write_json
from qlorapipe.params import EvaluateParams, QuantizationParams
from qlorapipe.perplexity import mean_token_loss, perplexity
from qlorapipe.records import check_adapter_matches_base, read_source_record, trained_chat_template

logger = logging.getLogger(__name__)

ROWS = ("base", "finetuned")


@dataclass(frozen=True)
class Outputs:
    """Where the evaluate step writes."""

    metrics: Path  # every figure, base and fine-tuned side by side (JSON)
    samples: Path  # the generations: evaluate.prompts and the held-out answers (JSON)
    scores_plot: Path  # the figures as bars (PNG)


def run(quant: QuantizationParams, params: EvaluateParams, base_dir: Path, adapter_dir: Path, data_dir: Path,
        out: Outputs, budget_gb: float | None = None) -> dict:
    """Measure base and fine-tuned, write the metrics, samples and chart.

    Inputs are read and checked before a model loads: the held-out tasks, the general corpus,
    the lm-eval tasks. Nothing is written when a gate (``evaluate.min_stop_share``,
    ``evaluate.max_general_perplexity_increase``) fails.

    Args:
        quant: how the base was quantized in training (it is loaded the same way).
        params: the evaluate section.
        base_dir, adapter_dir, data_dir: the base model, the adapter and the prepared data.
        out: the output paths.
        budget_gb: acceleration.memory_budget_gb (None: 90% of the GPU's memory); checked before loading.

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, an adapter trained on another base, a bad general corpus or
            lm-eval task, a memory budget too small for this model, or a failed gate.
    """
    eval_set = data.load_split(data_dir, data.EVAL_SPLIT)
    held_out = data.load_tasks(data_dir)[: params.max_examples]
    check_adapter_matches_base(adapter_dir, base_dir)
    texts = (corpora.general_texts(params.general_corpus, "evaluate.general_corpus")
             if params.general_corpus is not None else None)
    lm_eval_spec = None
    if params.lm_eval_tasks:  # lm-eval takes seconds to import: only when asked for
        from qlorapipe import harness

        lm_eval_spec = harness.check_tasks(params.lm_eval_tasks)

    from peft import PeftModel

    device = modeling.pick_device()
    trust = read_source_record(base_dir).trust_remote_code
    tokenizer = modeling.load_tokenizer(base_dir, trust, trained_chat_template(adapter_dir))
    general_set = None
    if texts is not None:
        row_length = len(eval_set[0]["input_ids"])
        general_set = forgetting.as_dataset(forgetting.general_rows(
            texts, tokenizer, row_length, params.general_batches * params.batch_size, params.general_corpus))
    budget = memory.budget_bytes(budget_gb, device)
    if budget is not None:
        memory.check_quantized_fits("evaluate", base_dir, quant, params.batch_size, len(eval_set[0]["input_ids"]),
                                    budget, budget_gb, trust, _holds_whole_logits(params, base_dir, adapter_dir, trust))
    memory.reset_peak(device)
    clock = PhaseClock("evaluate")  # where the stage's time went (metrics' seconds)
    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust)
    model = PeftModel.from_pretrained(base, adapter_dir)
    stop_ids = greedy.stop_token_ids(model, tokenizer)
    references = [tokenizer.decode(t["reference_ids"], skip_special_tokens=True).strip() for t in held_out]
    clock.lap("load")

    metrics: dict = {}
    samples: dict = {"prompts": params.prompts}
    answers: dict = {}
    with _progress() as progress:
        for name in ROWS:
            started = time.perf_counter()
            with model.disable_adapter() if name == "base" else contextlib.nullcontext():
                row = metrics[name] = {}
                loss, tokens = mean_token_loss(model, eval_set, params.batch_size, device, params.max_eval_batches)
                row.update(loss=round(loss, 5), perplexity=round(perplexity(loss), 4))
                clock.lap("perplexity")
                if general_set is not None:
                    general_loss, general_tokens = mean_token_loss(model, general_set, params.batch_size, device)
                    row["general"] = {"loss": round(general_loss, 5), "perplexity": round(perplexity(general_loss), 4)}
                    clock.lap("general")
                if held_out:
                    bar = progress.add_task(f"{name}: answers", total=len(held_out))
                    generated = tasks.generate_answers(
                        model, tokenizer, [t["prompt_ids"] for t in held_out], params.max_new_tokens,
                        params.batch_size, device, stop_ids, advance=lambda n, bar=bar: progress.advance(bar, n))
                    texts_out = [tokenizer.decode(a.ids, skip_special_tokens=True).strip() for a in generated]
                    row["task"] = tasks.task_metrics(generated, texts_out, references)
                    answers[name] = list(zip(generated, texts_out))
                    clock.lap("answers")
                if lm_eval_spec is not None:
                    row["lm_eval"] = harness.run_tasks(model, tokenizer, lm_eval_spec, params.lm_eval_limit,
                                                       params.batch_size, device)
                    clock.lap("lm_eval")
            logger.info("%s: %s (%.1f s)", name, _summary(row), time.perf_counter() - started)
        samples.update(generation.generate(model, tokenizer, params.prompts, params.max_new_tokens, device,
                                           params.chat_template, stop_ids))
        clock.lap("samples")

    metrics["eval_tokens"] = tokens
    metrics["perplexity_reduction"] = round(1 - metrics["finetuned"]["perplexity"] / metrics["base"]["perplexity"], 5)
    if general_set is not None:
        metrics["general_tokens"] = general_tokens
        metrics["general_perplexity_increase"] = round(
            metrics["finetuned"]["general"]["perplexity"] / metrics["base"]["general"]["perplexity"] - 1, 5)
        samples["general_corpus"] = params.general_corpus
    if held_out:
        metrics["task_examples"] = len(held_out)
        metrics["reference_mean_tokens"] = round(sum(len(t["reference_ids"]) for t in held_out) / len(held_out), 2)
        samples["tasks"] = [
            {"where": t["where"], "prompt": tokenizer.decode(t["prompt_ids"], skip_special_tokens=False),
             "reference": ref, **{name: answers[name][i][1] for name in ROWS},
             **{f"{name}_stopped": answers[name][i][0].stopped for name in ROWS}}
            for i, (t, ref) in enumerate(zip(held_out, references))]
    metrics["memory"] = memory.peak_metrics(device, budget)
    _gate(params, metrics)
    chart.plot_scores(metrics, params.general_corpus, out.scores_plot)
    clock.lap("chart")
    metrics["seconds"] = clock.seconds
    write_json(out.samples, samples)
    write_json(out.metrics, metrics)
    return metrics


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _summary(row: dict) -> str:
    parts = [f"held-out perplexity {row['perplexity']:.3f}"]
    if "general" in row:
        parts.append(f"general perplexity {row['general']['perplexity']:.3f}")
    if "task" in row:
        task = row["task"]
        parts.append(f"exact match {task['exact_match']:.1%}, ROUGE-L {task['rouge_l']:.3f}, BLEU {task['bleu']:.1f}, "
                     f"chrF {task['chrf']:.1f}, stopped {task['stop_share']:.0%}")
    return "; ".join(parts)


def gate_problems(params: EvaluateParams, metrics: dict) -> list[str]:
    """The evaluate gates that fail (each names its key), empty when all pass or are off."""
    problems = []
    task = metrics["finetuned"].get("task")
    if params.min_stop_share is not None and task is not None and task["stop_share"] < params.min_stop_share:
        problems.append(
            f"only {task['stop_share']:.0%} of the fine-tuned answers stop by themselves (evaluate.min_stop_share="
            f"{params.min_stop_share}): check that the training data ends each answer with EOS / the end-of-turn "
            "token (data.format, data.chat_template), train longer, or raise evaluate.max_new_tokens")
    increase = metrics.get("general_perplexity_increase")
    limit = params.max_general_perplexity_increase
    if limit is not None and increase is not None and not increase <= limit:  # NaN fails too
        problems.append(
            f"perplexity on {params.general_corpus} rose {increase:+.1%} with the adapter "
            f"(evaluate.max_general_perplexity_increase={limit}): the fine-tune forgets; lower "
            "training.learning_rate or training.max_steps, or lora.rank")
    return problems


def _gate(params: EvaluateParams, metrics: dict) -> None:
    problems = gate_problems(params, metrics)
    if problems:
        raise UserError("; ".join(problems))


def _holds_whole_logits(params: EvaluateParams, base_dir: Path, adapter_dir: Path, trust: bool) -> bool:
    """Whether the evaluation holds a batch's logits whole: lm-eval's tasks do, and so does the loss unless
    ``perplexity.mean_token_loss`` runs the head a chunk at a time (a plain head the adapter does not train)."""
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save") or []
    plain = modeling.plain_head_causal_lm(memory.meta_model(base_dir, trust)) is not None
    return bool(params.lm_eval_tasks) or not plain or "lm_head" in saved

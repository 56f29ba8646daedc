"""A model card (README.md with Hugging Face metadata) for the exported model."""

from __future__ import annotations

import json


def render_model_card(record: dict, metrics: dict[str, dict], data_report: dict) -> str:
    """Markdown naming the base model, the data, the params and the metrics that made this model.

    Args:
        record: the adapter record (base_model plus the params sections used in training).
        metrics: metrics by stage name (train, eval, merge).
        data_report: the prepare stage's data report.
    """
    base = record.get("base_model", {})
    lora = record.get("lora", {})
    evaluation = metrics.get("eval", {})
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base.get('repo_id', 'unknown')}",
        "tags:",
        "- qlora",
        "- peft",
        "- dvc",
        "---",
        "",
        f"# {base.get('repo_id', 'Base model')} fine-tuned with QLoRA",
        "",
        "A standalone 16-bit model: the LoRA adapter was trained on the "
        f"{record.get('quantization', {}).get('load_in', '4bit')} quantized base and merged into the "
        "dequantized base weights, so this model computes what was trained.",
        "",
        "## Base model",
        "",
        f"- id: `{base.get('repo_id')}`, revision `{base.get('revision')}`",
        f"- weights sha256: `{base.get('content_sha256')}`",
        "",
        "## Data",
        "",
        f"- train: {data_report.get('train', {}).get('rows')} rows of up to {data_report.get('max_length')} tokens "
        f"({data_report.get('train', {}).get('examples')} {data_report.get('format', 'text')} examples)",
        f"- eval: {data_report.get('eval', {}).get('rows')} rows "
        f"({data_report.get('eval', {}).get('examples')} held-out examples)",
        "",
        "## Results",
        "",
        "| model | eval loss | eval perplexity |",
        "| --- | --- | --- |",
        f"| base (4-bit) | {evaluation.get('base', {}).get('loss')} | {evaluation.get('base', {}).get('perplexity')} |",
        f"| fine-tuned | {evaluation.get('finetuned', {}).get('loss')} | "
        f"{evaluation.get('finetuned', {}).get('perplexity')} |",
        "",
        f"Merge fidelity against base + adapter as trained: "
        f"max logit difference {metrics.get('merge', {}).get('merged', {}).get('max_logit_diff')}, "
        f"perplexity change {metrics.get('merge', {}).get('merged', {}).get('perplexity_change')}.",
        "",
        f"LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"targets {lora.get('target_modules')}.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("models/export")',
        'tokenizer = AutoTokenizer.from_pretrained("models/export")',
        "```",
        "",
        "## Training params",
        "",
        "```json",
        json.dumps({k: v for k, v in record.items() if k != "base_model"}, indent=2, sort_keys=True),
        "```",
        "",
        "## Training metrics",
        "",
        "```json",
        json.dumps(metrics.get("train", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)

"""A model card (README.md with Hugging Face metadata) for the exported model."""

from __future__ import annotations

import json
from pathlib import Path

from qlorapipe.records import AdapterRecord


def render_model_card(record: AdapterRecord, facts: dict[str, dict], shown_path: Path) -> str:
    """Markdown naming the base model, the data, the params and the figures that made this model.

    Args:
        record: the adapter record (base model plus the params sections used in training).
        facts: what the card quotes of the stages' metrics (``qlorapipe.card``: data, train, eval, merge).
        shown_path: where the exported model is, for the usage example.
    """
    base, lora = record.base_model, record.lora
    evaluation, data_report = facts.get("eval", {}), facts.get("data", {})
    params = {k: v for k, v in record.as_json().items() if k != "base_model"}
    load_in = record.quantization.load_in
    trained_on = {"4bit": f"4-bit ({record.quantization.quant_type.upper()})", "8bit": "8-bit",
                  "none": "16-bit"}[load_in]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base.repo_id}",
        "tags:",
        "- qlora",
        "- peft",
        "- dvc",
        "---",
        "",
        f"# {base.repo_id} fine-tuned with {'LoRA' if load_in == 'none' else 'QLoRA'}",
        "",
        f"A standalone 16-bit model: the LoRA adapter was trained on the {trained_on} base and merged into "
        f"the {'' if load_in == 'none' else 'dequantized '}base weights, so this model computes what was trained.",
        "",
        "## Base model",
        "",
        f"- id: `{base.repo_id}`, revision `{base.revision}`",
        f"- weights sha256: `{base.content_sha256}`",
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
        f"| base ({trained_on}) | {evaluation.get('base', {}).get('loss')} | "
        f"{evaluation.get('base', {}).get('perplexity')} |",
        f"| fine-tuned | {evaluation.get('finetuned', {}).get('loss')} | "
        f"{evaluation.get('finetuned', {}).get('perplexity')} |",
        "",
        f"Merge fidelity against base + adapter as trained: "
        f"max logit difference {facts.get('merge', {}).get('max_logit_diff')}, "
        f"perplexity change {facts.get('merge', {}).get('perplexity_change')}.",
        "",
        f"LoRA: rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}, "
        f"targets {lora.target_modules}.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{shown_path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{shown_path}")',
        "```",
        "",
        "## Training params",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True),
        "```",
        "",
        "## Training metrics",
        "",
        "```json",
        json.dumps(facts.get("train", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)

"""The adapter alone as a deliverable: small, and loadable with PeftModel.from_pretrained on its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlorapipe.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_adapter_package(adapter_dir: Path, record: dict, tokenizer, out_dir: Path, record_name: str) -> None:
    """Copy the adapter with its record and tokenizer, pointing adapter_config.json at the base.

    ``base_model_name_or_path`` and ``revision`` name the base as the download stage recorded it,
    so ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` finds a Hub base by itself. The
    tokenizer carries the chat template, and README.md states the prompt template.

    Args:
        adapter_dir: the trained adapter (models/adapter).
        record: its training_params.json contents.
        tokenizer: the base tokenizer (saved beside the adapter).
        out_dir: the directory to write (created).
        record_name: the file name of the record.

    Raises:
        UserError: the adapter files are missing.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise UserError(f"{adapter_dir / name} not found; run `dvc repro train`")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = record.get("base_model", {})
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if base.get("source") == "hub":
        config["base_model_name_or_path"] = base.get("repo_id")
        config["revision"] = base.get("commit") or base.get("revision")
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(adapter_dir / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
    (out_dir / record_name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(_adapter_card(base, record, bool(getattr(tokenizer, "chat_template", None))))


def _adapter_card(base: dict, record: dict, has_chat_template: bool) -> str:
    quant = record.get("quantization", {})
    template = record.get("data", {}).get("template") if isinstance(record.get("data"), dict) else None
    prompt = (f"`{template}`" if template else
              "the tokenizer's chat template (saved here)" if has_chat_template else "plain text continuation")
    return "\n".join([
        "---",
        "library_name: peft",
        f"base_model: {base.get('repo_id', 'unknown')}",
        "---",
        "",
        f"# LoRA adapter for {base.get('repo_id')}",
        "",
        f"- base model: `{base.get('repo_id')}`, revision `{base.get('commit') or base.get('revision')}`, "
        f"weights sha256 `{base.get('content_sha256')}`",
        f"- trained on the base loaded {quant.get('load_in', '4bit')} ({quant.get('quant_type', 'nf4')}); "
        "load it the same way for the answers that were evaluated",
        f"- prompt template: {prompt}",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
        f'base = AutoModelForCausalLM.from_pretrained("{base.get("repo_id")}", '
        'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))',
        'model = PeftModel.from_pretrained(base, "models/export/adapter")',
        "```",
        "",
    ])

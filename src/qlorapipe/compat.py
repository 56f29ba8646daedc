"""What the chosen params can do for this base model, checked before any data is prepared.

A param can be valid on its own (the check stage) and still ask what this model cannot do:
GGUF files or ONNX models of an architecture their writer does not lay out, LoRA targets the model does
not have, sequences longer than its position table, a chat format with no chat template, a chat
template with a Jinja syntax error, float16 compute without a CUDA GPU.
The compat stage reads the base model's config and tokenizer (no weights: the model is
built on the meta device) and refuses every such param in one message that names the key,
before prepare, train or export run. The steps that act on these params (train, export)
apply the same rules again, from this module, so the two can never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from qlorapipe.errors import UserError
from qlorapipe.modeling import lora_problems
from qlorapipe.params import DataParams, EvaluateParams, ExportParams, LoraParams, QuantizationParams

GGUF_ARCHITECTURES = ("llama", "qwen2")
# The text models' architectures (config.json "architectures") onnxruntime-genai 0.18's model builder lays out.
ONNX_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM",
                      "OlmoForCausalLM", "NemotronForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
                      "SmolLM3ForCausalLM", "Ernie4_5ForCausalLM")


def gguf_problem(config, model_dir: Path) -> str | None:
    """Why the GGUF writer cannot write this model, or None when it can.

    Args:
        config: the model's transformers config.
        model_dir: the model directory (for tokenizer.json).
    """
    arch = config.model_type
    if arch not in GGUF_ARCHITECTURES:
        return f"GGUF files are written for {' and '.join(GGUF_ARCHITECTURES)} models; this one is {arch}"
    # rope_parameters (transformers 5), or a raw config.json's rope_scaling, spelt "rope_type" or, in older
    # configs (Qwen2.5's YaRN block, deepseek-coder), "type": transformers reads either.
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    spelt = (rope.get("rope_type"), rope.get("type"), scaling.get("rope_type"), scaling.get("type"))
    rope_type = next((t for t in spelt if t and t != "default"), "default")
    if rope_type != "default":
        return f"GGUF files are written without rope scaling; this model uses '{rope_type}'"
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return f"GGUF files carry the fast tokenizer, and {path} is missing"
    spec = json.loads(path.read_text())
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        return f"GGUF files are written for byte-level BPE tokenizers; {path} is {kind}"
    if gguf_pre_tokenizer(spec.get("pre_tokenizer")) is None:
        return (f"GGUF files name how llama.cpp splits text before BPE, and {path}'s pre-tokenizer is none of those "
                f"the writer knows ({', '.join(PRE_TOKENIZER_NAMES)}): llama.cpp would split text otherwise than "
                "training did")
    return None


# Split rules llama.cpp knows by name (tokenizer.ggml.pre), as tokenizer.json spells them.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZER_NAMES = ("qwen2", "llama-bpe", "smollm", "gpt-2")


def gguf_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer, or None for one it has no name
    the writer knows for: Qwen2's or Llama 3's split rule before byte-level BPE, SmolLM's single digits
    before GPT-2's rule, or GPT-2's rule alone. Matched exactly, not guessed: a mislabelled file would split
    text otherwise in llama.cpp than the trained model's tokenizer does."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or kinds[-1] != "ByteLevel":
        return None
    gpt2_rule = byte_level[0].get("use_regex", True)
    if kinds == ["Split", "ByteLevel"] and not gpt2_rule:
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    if kinds == ["Digits", "ByteLevel"] and gpt2_rule and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and gpt2_rule:
        return "gpt-2"
    return None


def onnx_problem(config) -> str | None:
    """Why onnxruntime-genai's model builder cannot build this model, or None when it can."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures or architectures[0] not in ONNX_ARCHITECTURES:
        return (f"ONNX models are built for {', '.join(ONNX_ARCHITECTURES)}; this one is "
                f"{architectures[0] if architectures else 'unnamed (config.json has no architectures)'}")
    return None


def problems(base_dir: Path, trust_remote_code: bool, data: DataParams, lora: LoraParams,
             evaluate: EvaluateParams, export: ExportParams,
             quantization: QuantizationParams | None = None) -> list[str]:
    """Every param this base model cannot honour, each naming its key and what to change.

    Reads config.json and the tokenizer's files as they are; builds the model (on the meta
    device, no weights) only when LoRA names modules, to look them up.
    """
    config = SimpleNamespace(**json.loads((Path(base_dir) / "config.json").read_text()))
    found = []
    no_onnx = onnx_problem(config)
    gguf = [f for f in export.formats if f.startswith("gguf-")]
    if gguf:
        why = gguf_problem(config, base_dir)
        if why:
            instead = "safetensors and adapter" if no_onnx else "safetensors, adapter and the onnx-* formats"
            found.append(f"export.formats {gguf}: {why}; keep {instead} only")
    onnx = [f for f in export.formats if f.startswith("onnx-")]
    if onnx and no_onnx:
        found.append(f"export.formats {onnx}: {no_onnx}; keep safetensors and adapter only")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and data.max_length > positions:
        found.append(f"data.max_length {data.max_length} is longer than this model's {positions} positions "
                     f"(max_position_embeddings); set it to {positions} or less")
    if quantization is not None and quantization.compute_dtype == "float16":
        import torch

        if not torch.cuda.is_available():  # the train stage would refuse it, after DVC deleted its outputs
            found.append("quantization.compute_dtype float16 is not supported on the CPU (no CUDA GPU here); "
                         "use auto or float32")
    if data.chat_template is not None and (why := chat_template_problem(data.chat_template)):
        found.append(f"data.chat_template: {why}; fix its Jinja syntax")
    has_template = has_chat_template(base_dir)
    if data.format == "chat" and data.chat_template is None and not has_template:
        found.append("data.format is chat but the tokenizer has no chat template; set data.chat_template "
                     "to a Jinja template, or use data.format: instruction")
    if evaluate.chat_template and not has_template and data.trained_chat_template is None:
        found.append("evaluate.chat_template is true but the tokenizer has no chat template (nor data.chat_template "
                     "for chat data); set it to false")
    if isinstance(lora.target_modules, list) or lora.modules_to_save:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code),
                trust_remote_code=trust_remote_code)
        found += lora_problems(model, lora)
    return found


def chat_template_problem(template: str) -> str | None:
    """Why transformers cannot compile the Jinja chat ``template`` (its syntax error and line), or None.

    Compiled as ``apply_chat_template`` compiles it (its sandbox and extensions), so a template refused here
    would be refused at the first conversation prepare renders, and one passed here is not refused for its
    syntax there.
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateError as error:
        line = f" at line {error.lineno}" if getattr(error, "lineno", None) else ""
        return f"not a Jinja template ({getattr(error, 'message', None) or error}{line})"
    return None


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer saved in ``model_dir`` carries a chat template (chat_template.jinja, as
    transformers 5 saves it, or a chat_template key in tokenizer_config.json)."""
    if (Path(model_dir) / "chat_template.jinja").is_file():
        return True
    config = Path(model_dir) / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def check(base_dir: Path, trust_remote_code: bool, data: DataParams, lora: LoraParams,
          evaluate: EvaluateParams, export: ExportParams, quantization: QuantizationParams | None = None) -> None:
    """Refuse, in one message, every param this base model cannot honour.

    Raises:
        UserError: naming each key and what to change.
    """
    found = problems(base_dir, trust_remote_code, data, lora, evaluate, export, quantization)
    if found:
        raise UserError(f"params ask what {base_dir} ({config_type(base_dir)}) cannot do: " + "; ".join(found))


def config_type(base_dir: Path) -> str:
    """The model_type in ``base_dir``/config.json, for messages."""
    return json.loads((Path(base_dir) / "config.json").read_text()).get("model_type", "unknown architecture")

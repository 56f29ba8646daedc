"""Loading a fine-tuned model to answer prompts: the quantized base with one or several adapters
attached by name, or a merged/exported model (``qlorapipe.cli.chat`` is its command line).

With adapters, the base is loaded once, quantized as the first adapter's training_params.json
records, and every adapter is attached to it by name (peft's ``load_adapter``); switching
between them is ``set_adapter``, the base stays loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import modeling
from qlorapipe.data import chat_prompt_ids
from qlorapipe.errors import UserError
from qlorapipe.gguf_reading import gguf_read_once
from qlorapipe.params import QuantizationParams
from qlorapipe.records import (SOURCE_RECORD, check_adapter_matches_base, has_adapter_record, read_adapter_record,
                               read_source_record, trained_chat_template)

logger = logging.getLogger(__name__)

BASE = "base"  # the name that selects the base model with every adapter switched off


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are generated. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    chat_template: bool | None = None  # None: use the tokenizer's chat template when it has one

    def check(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}")
        return problems


class LoadedModel:
    """A model ready to answer prompts, with the adapters attached to it by name.

    Args:
        model: a transformers model, or a peft PeftModel holding ``adapters``.
        tokenizer: its tokenizer.
        adapters: the adapter names, in the order they were loaded (empty for a merged model).
        device: where the model computes.
    """

    def __init__(self, model, tokenizer, adapters: list[str], device):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.device = device
        self.active = adapters[0] if adapters else BASE

    def use(self, name: str) -> None:
        """Make adapter ``name`` (or ``base``) answer the next prompts; the base is not reloaded.

        Raises:
            UserError: no adapter of that name is loaded.
        """
        if name != BASE and name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            raise UserError(f"no adapter named '{name}' is loaded (loaded: {loaded}; '{BASE}' = no adapter)")
        if name != BASE:
            self.model.set_adapter(name)
        self.active = name

    def answer(self, prompt: str, settings: SamplingSettings, streamer=None, adapter: str | None = None) -> str:
        """Generate the answer to one prompt with the active adapter (or ``adapter``, for this request only).

        Returns:
            The generated text, without the prompt.
        """
        import contextlib

        import torch

        previous = self.active
        if adapter is not None:
            self.use(adapter)
        try:
            encoded = encode_prompt(self.tokenizer, prompt, use_chat_template(self.tokenizer, settings))
            encoded = {k: v.to(self.device) for k, v in encoded.items()}
            sampling = (dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
                        if settings.temperature > 0 else dict(do_sample=False))
            off = self.model.disable_adapter() if self.active == BASE and self.adapters else contextlib.nullcontext()
            with off, torch.no_grad():
                generated = self.model.generate(
                    **encoded,
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=pad_token_id(self.tokenizer),
                    streamer=streamer,
                    use_cache=True,
                    **sampling,
                )
        finally:
            if adapter is not None:
                self.use(previous)
        return self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


class OnnxLoadedModel(LoadedModel):
    """An ONNX Runtime GenAI folder (``export.formats`` onnx-*): prompts are answered by ONNX Runtime GenAI's own
    generator, as the program serving the folder answers them; the tokenizer is the folder's, read by transformers
    (the chat template, and streaming through the same streamer as the other models)."""

    def __init__(self, folder: Path, tokenizer):
        import json

        import onnxruntime_genai as og

        super().__init__(og.Model(str(folder)), tokenizer, [], None)
        self.context_length = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]

    def use(self, name: str) -> None:
        if name != BASE:
            raise UserError(f"no adapter named '{name}': an ONNX model has its adapter merged in")

    def answer(self, prompt: str, settings: SamplingSettings, streamer=None, adapter: str | None = None) -> str:
        import onnxruntime_genai as og
        import torch

        if adapter is not None:
            self.use(adapter)
        ids = encode_prompt(self.tokenizer, prompt, use_chat_template(self.tokenizer, settings))["input_ids"][0]
        params = og.GeneratorParams(self.model)
        sampling = (dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                         random_seed=torch.initial_seed() % 2**31) if settings.temperature > 0 else
                    dict(do_sample=False))
        if len(ids) >= self.context_length:
            raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {self.context_length}")
        params.set_search_options(max_length=min(len(ids) + settings.max_new_tokens, self.context_length), **sampling)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids.tolist())
        if streamer is not None:
            streamer.put(ids[None])  # the prompt, which the streamer skips
        new = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if streamer is not None:
                streamer.put(torch.tensor(new[-1:]))
        if streamer is not None:
            streamer.end()
        return self.tokenizer.decode(new, skip_special_tokens=True)


def pad_token_id(tokenizer) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def use_chat_template(tokenizer, settings: SamplingSettings) -> bool:
    """Whether prompts are wrapped in the chat template; asking for one the tokenizer lacks is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat_template and not has_template:
        raise UserError("--chat-template: this tokenizer has no chat template; use --no-chat-template")
    return has_template if settings.chat_template is None else settings.chat_template


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> dict:
    """Token ids of ``prompt``, as a single-turn user message when ``chat_template`` is on."""
    if chat_template:
        import torch

        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([chat_prompt_ids(tokenizer, text)])  # as training examples begin (one BOS where due)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return dict(tokenizer(prompt, return_tensors="pt"))


def parse_adapter_specs(specs: Iterable[str]) -> dict[str, Path]:
    """``name=path`` or ``path`` (named after its directory) into an ordered name -> path mapping.

    Raises:
        UserError: two adapters share a name, or a name is empty or reserved.
    """
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or name == BASE:
            raise UserError(f"--adapter {spec}: give it a name other than '{BASE}', as NAME=PATH")
        if name in adapters:
            raise UserError(f"--adapter {spec}: the name '{name}' is used twice; name them NAME=PATH")
        adapters[name] = Path(path)
    return adapters


def adapter_quantization(adapters: dict[str, Path]) -> QuantizationParams:
    """The quantization every adapter was trained with (read from its training_params.json).

    Raises:
        UserError: the adapters were trained on differently quantized bases.
    """
    known = {name: read_adapter_record(path).quantization for name, path in adapters.items()
             if has_adapter_record(path)}
    if len(set(known.values())) > 1:
        raise UserError("the adapters were trained on differently quantized bases: " + "; ".join(
            f"{name}: {q}" for name, q in known.items()) + "; load them in separate runs")
    if not known:
        logger.warning("no training_params.json beside the adapters; loading the base 4-bit NF4")
        return QuantizationParams()
    return next(iter(known.values()))


def load_with_adapters(base_dir: Path, adapters: dict[str, Path], device) -> LoadedModel:
    """Load the base once, quantized as in training, and attach every adapter under its name.

    Raises:
        UserError: an adapter is missing or was trained on another base.
    """
    from peft import PeftModel

    if not adapters:
        raise UserError("no adapter given; pass --adapter PATH (or --model DIR for a merged model)")
    if not (Path(base_dir) / SOURCE_RECORD).is_file():
        raise UserError(f"{base_dir} is not a base model the download stage wrote (no {SOURCE_RECORD}); pass --base "
                        "its output (dvc.yaml's base path) or run `dvc repro download`; a merged model goes in --model")
    for path in adapters.values():
        if not path.is_dir():
            raise UserError(f"adapter directory {path} does not exist; run `dvc repro train` or fix --adapter")
        check_adapter_matches_base(path, base_dir)
    quant = adapter_quantization(adapters)
    trust = read_source_record(base_dir).trust_remote_code
    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust)
    base.config.use_cache = True  # training turns the cache off; generation wants it
    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(first)
    model.eval()
    logger.info("Loaded %s (%s) with adapters %s on %s", base_dir, quant.load_in, ", ".join(adapters),
                modeling.device_summary(device))
    # One tokenizer for all: the chat template the first adapter was trained with, when data.chat_template gave one
    tokenizer = modeling.load_tokenizer(base_dir, trust, trained_chat_template(first_path))
    return LoadedModel(model, tokenizer, list(adapters),
                       device)


def onnx_folders(path: Path) -> list[str]:
    """The ONNX Runtime GenAI folders (with a genai_config.json) directly inside ``path``."""
    return sorted(str(f) for f in path.iterdir() if (f / "genai_config.json").is_file()) if path.is_dir() else []


def load_standalone(model_path: Path, device) -> LoadedModel:
    """Load a merged or exported model directory, a .gguf file (dequantized by transformers), or an ONNX Runtime
    GenAI folder (run by ONNX Runtime GenAI).

    Raises:
        UserError: the path holds no model (or only an adapter).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = Path(model_path)
    if model_path.suffix == ".onnx" and (model_path.parent / "genai_config.json").is_file():
        model_path = model_path.parent  # the model.onnx of an ONNX Runtime GenAI folder: the folder
    if (model_path / "genai_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        logger.info("Loaded %s in ONNX Runtime GenAI (CPU)", model_path)
        return OnnxLoadedModel(model_path, tokenizer)
    if model_path.suffix == ".gguf" and not model_path.exists():
        raise UserError(f"{model_path}: no such GGUF file; run `dvc repro export` or fix --model")
    if model_path.suffix == ".gguf" and model_path.is_file():
        source, kwargs = model_path.parent, {"gguf_file": model_path.name}
    elif (model_path / "config.json").is_file():
        source, kwargs = model_path, {}
    elif (model_path / "adapter_config.json").is_file():
        raise UserError(f"{model_path} is an adapter, not a model; pass it as --adapter {model_path}")
    elif found := onnx_folders(model_path) or onnx_folders(model_path / "onnx") or onnx_folders(model_path.parent):
        raise UserError(f"{model_path}: no model here; the ONNX folders beside it: --model {' or --model '.join(found)}")
    elif not model_path.exists():
        raise UserError(f"{model_path} does not exist; pass a model directory, a .gguf file or an ONNX folder "
                        "(models/export/onnx/<precision>) to --model")
    else:
        raise UserError(f"{model_path}: no model here (no config.json); run `dvc repro merge` or fix --model")
    with gguf_read_once():
        model = AutoModelForCausalLM.from_pretrained(source, device_map={"": device}, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if device.type == "cpu" and model.dtype == torch.float16:
        model = model.float()  # the same weights; PyTorch's float16 matmuls on the CPU are ~90x slower
    model.eval()
    logger.info("Loaded %s on %s", model_path, modeling.device_summary(device))
    return LoadedModel(model, tokenizer, [], device)


if __name__ == "__main__":  # `python -m qlorapipe.inference`, as documented before the command line moved
    import importlib

    # By name, so that the stages importing this library do not depend on the command line's code.
    importlib.import_module("qlorapipe.cli.chat").cli()

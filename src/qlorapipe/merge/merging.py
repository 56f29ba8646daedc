"""Merging a QLoRA adapter into a standalone 16-bit model that computes what was trained.

The adapter was trained against the *quantized* base, W_q = dequant(quant(W)). Merging it
into the original 16-bit W gives W + BA, which differs from the trained W_q + BA by the
quantization error of every layer; that is the usual "my merged model behaves differently"
report (peft#1043, transformers#31293, LLaMA-Factory#5625). Dequantizing the 4-bit base
first and merging into W_q gives W_q + BA: the trained function, up to the rounding of the
output dtype.

The merge goes one layer at a time: each adapted (or quantized) weight is dequantized and
merged in float32 on the device base + adapter computes on, rounded once to the output dtype
and moved into a 16-bit model on the CPU. The GPU never holds more than base + adapter and one
layer's float32 weight, whatever the model's size; the result is the same, bit for bit, as
dequantizing the whole model to float32 and calling peft's merge_and_unload (tests/test_merge_memory.py).

An 8-bit base (LLM.int8()) also rounds every matmul's input to int8 as it computes, which no 16-bit model
does: the merged model is measured against base + adapter with that rounding off (``int8_inputs_unrounded``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qlorapipe import memory

logger = logging.getLogger(__name__)


def merge_into(target, with_adapter, dtype, from_quantized: bool = True):
    """Write base + adapter's weights, adapters merged, into ``target`` and cast it to ``dtype``.

    Args:
        target: the base model in 16 bits on the CPU (``memory.load_on_cpu``); changed in place.
        with_adapter: the PeftModel as trained (quantized base + adapter), on its device.
        dtype: the merged model's dtype.
        from_quantized: merge into the dequantized weights base + adapter computes with (True), or
            into ``target``'s own 16-bit weights (False: the naive merge, kept as a reference point).

    Returns:
        ``target``, merged, in ``dtype``.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    _untie_trained_embeddings(target, with_adapter)
    for name, module in _merge_units(with_adapter):
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            destination = target.get_submodule(name)
            own = None if from_quantized else destination.weight.to(layer.weight.device)
            destination.weight.data = memory.to_host(_merged_weight(module, _float_weight(layer, own)), dtype)
            _copy_plain(layer, destination, dtype, skip=("weight",))
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            destination = target.get_submodule(name)
            for key, value in trained.state_dict().items():
                _set(destination, key, memory.to_host(value.detach(), dtype))
        else:
            destination = target.get_submodule(name)
            weight = getattr(module, "weight", None)
            quantized = _is_quantized(weight)
            if quantized and from_quantized:
                destination.weight.data = memory.to_host(_float_weight(module), dtype)
            _copy_plain(module, destination, dtype, skip=("weight",) if quantized else ())
    return target.to(dtype)


def _untie_trained_embeddings(target, with_adapter) -> None:
    """Give ``target``'s output embedding a weight of its own when training untied it from the input's.

    A model whose input and output embeddings share one weight (Qwen2.5 up to 3B, SmolLM2) trains a
    ``lora.modules_to_save`` copy (or a LoRA) of one of them alone: the trained model reads through one and
    predicts through the other. Written into the shared weight, one would overwrite the other; untied, each
    gets what base + adapter computes with, and the merged model's config says so.
    """
    from torch import nn

    trained = with_adapter.get_base_model()
    shared = target.get_input_embeddings().weight is target.get_output_embeddings().weight
    if shared and trained.get_input_embeddings() is not trained.get_output_embeddings() and (
            _is_adapted(trained.get_input_embeddings()) or _is_adapted(trained.get_output_embeddings())):
        head = target.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        target.config.tie_word_embeddings = False
        logger.info("The merged model's output embedding is untied from its input embedding: training adapted "
                    "one of them alone (lora.modules_to_save or lora.target_modules)")


def _is_adapted(module) -> bool:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, (LoraLayer, ModulesToSaveWrapper))


def _merge_units(with_adapter):
    """(name, module) of base + adapter's base model, a LoRA layer or a modules_to_save wrapper standing for
    everything inside it (the root, named "", left out)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    done: list[str] = []
    for name, module in with_adapter.get_base_model().named_modules():
        if not name or any(name.startswith(prefix) for prefix in done):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            done.append(name + ".")
        yield name, module


@contextlib.contextmanager
def int8_inputs_unrounded():
    """bitsandbytes' 8-bit layers computing with their dequantized weights and their inputs as they are, while
    the context is open (class-wide): what ``merge_into`` merges an adapter into, without LLM.int8()'s rounding
    of every matmul's input to int8 (outlier columns aside), which no 16-bit model computes."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    linear = bnb.nn.Linear8bitLt
    rounded = linear.forward

    def unrounded(self, x):
        weight = dequantize_bnb_weight(self.weight, state=self.state).to(x.dtype)
        return torch.nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    linear.forward = unrounded
    try:
        yield
    finally:
        linear.forward = rounded


def _is_quantized(weight) -> bool:
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def _float_weight(layer, own=None):
    """The weight ``layer`` computes with, in float32 on its device (``own``: another 16-bit weight instead)."""
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    if own is not None:
        return own.to(torch.float32)
    if _is_quantized(layer.weight):
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise RuntimeError("merge a 4-bit layer before its first inference forward: bitsandbytes repacked it "
                               "for the CPU and re-rounded its scales")
        return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).to(torch.float32)
    return layer.weight.detach().to(torch.float32)


def _merged_weight(module, weight):
    """``weight`` (float32) with the active adapters of LoRA layer ``module`` merged, as peft's merge does."""
    from peft.utils import transpose

    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        delta = module.get_delta_weight(adapter).float()
        if adapter in getattr(module, "lora_magnitude_vector", {}):  # DoRA: rescale each output row
            magnitude = module.lora_magnitude_vector[adapter]
            norm = magnitude.get_weight_norm(weight, transpose(delta, module.fan_in_fan_out), scaling=1).detach()
            factor = transpose((magnitude.weight / norm).view(-1, 1), module.fan_in_fan_out)
            weight = factor * (weight + delta)
        else:
            weight = weight + delta
    return weight


def _copy_plain(source, destination, dtype, skip=()) -> None:
    """``source``'s own parameters (biases, norms, embeddings; trained ones included) into ``destination``."""
    for key, value in source.named_parameters(recurse=False):
        if key not in skip and key in destination._parameters:
            _set(destination, key, memory.to_host(value.detach(), dtype))


def _set(module, key: str, value) -> None:
    owner = module.get_submodule(key.rsplit(".", 1)[0]) if "." in key else module
    getattr(owner, key.rsplit(".", 1)[-1]).data = value


def adapters_only(with_adapter) -> tuple[dict, list[str]]:
    """What the naive merge needs of base + adapter once its base weights are gone.

    Returns ``(layers, quantized)``: each LoRA layer by module name, its base layer's weight dropped (the
    adapters, biases and settings stay where they are, a few MB against GBs of quantized weights), and the
    names of the quantized layers no adapter targets. Base + adapter cannot compute after this.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    layers, quantized = {}, []
    for name, module in _merge_units(with_adapter):
        if isinstance(module, LoraLayer):
            layers[name] = module
        elif not isinstance(module, ModulesToSaveWrapper) and _is_quantized(getattr(module, "weight", None)):
            quantized.append(name)
    for layer in layers.values():
        base_layer = layer.get_base_layer()
        del base_layer.weight
        if getattr(base_layer, "quant_state", None) is not None:  # bitsandbytes keeps the 4-bit statistics here too
            base_layer.quant_state = None
        # A bitsandbytes 8-bit layer keeps the int8 weight and its scales in its matmul state too, once it has run.
        state = getattr(base_layer, "state", None)
        for field in ("CB", "SCB"):
            if hasattr(state, field):
                setattr(state, field, None)
    return layers, quantized


def move_adapters(adapters: tuple[dict, list[str]], device) -> None:
    """Move ``adapters_only``'s LoRA layers to ``device``: to the CPU while the merged model is placed, so they do
    not take its room (left on the GPU with their 4-bit statistics they took 0.16 GB at the Qwen2.5-3B shape,
    enough to stream 8 of its 40 modules within 7.5 GB), and back for ``naive_in_place``, which then computes
    where it always did."""
    for layer in adapters[0].values():
        layer.to(device)


def naive_in_place(model, adapters: tuple[dict, list[str]], base, dtype):
    """Turn the merged ``model`` into the naive merge: the adapters merged into ``base``'s own 16-bit weights.

    The two merges differ only in the weights of the LoRA layers and of the other quantized layers (every
    other tensor is base + adapter's in both, ``merge_into``), so only those are written, each where
    ``model`` holds it (a model placed on the GPU stays there): the same values as ``merge_into(base, ...,
    from_quantized=False)``, bit for bit, without a second whole model.

    Args:
        model: the merged model (``merge_into``'s result, reloaded and placed), every weight a real tensor.
        adapters: ``adapters_only``'s result.
        base: the base model in its checkpoint's dtype on the CPU (``memory.load_on_cpu(base_dir, "auto")``).
        dtype: the merged model's dtype.
    """
    layers, quantized = adapters
    for name, layer in layers.items():
        own = base.get_submodule(name).weight
        weight = _merged_weight(layer, own.to(next(layer.parameters()).device).float())
        model.get_submodule(name).weight.data.copy_(weight.to(dtype))
    for name in quantized:
        model.get_submodule(name).weight.data.copy_(base.get_submodule(name).weight.to(dtype))
    return model


def merged_model(with_adapter, base_dir: Path, dtype, from_quantized: bool = True, trust_remote_code: bool = False):
    """The standalone merged model, in ``dtype`` on the CPU (see ``merge_into``)."""
    target = memory.load_on_cpu(base_dir, "auto", trust_remote_code)
    return merge_into(target, with_adapter, dtype, from_quantized)


def merge_adapter(base_dir: Path, adapter_dir: Path, quant, dtype, device, from_quantized: bool = True,
                  trust_remote_code: bool = False):
    """Load base + adapter as trained on ``device`` and return the merged model in ``dtype`` on the CPU."""
    from peft import PeftModel

    from qlorapipe import modeling

    base, _ = modeling.load_base_model(base_dir, quant, device, trust_remote_code=trust_remote_code)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    return merged_model(with_adapter, base_dir, dtype, from_quantized, trust_remote_code)

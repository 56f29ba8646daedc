"""How the adapters start (``lora.init``), and how a PiSSA adapter is saved as a plain LoRA.

- ``default``: peft's init, A random (Kaiming-uniform) and B zero: the model starts as the base.
- ``loftq`` (LoftQ, Li et al. 2023, https://arxiv.org/abs/2310.08659), on a 4-bit base: each
  adapted layer's scaled B A starts as the best rank-r approximation (an SVD) of its quantization
  error W - dequant(W_4bit), with W read from the base's safetensors, so the 4-bit model plus the
  adapter starts closer to the 16-bit model than the 4-bit model alone. The base weights do not
  change: only A and B differ from a default run, so checkpoints, the best adapter, the GPU fast
  paths and the saved adapter work as they are.
- ``pissa`` (PiSSA, Meng et al. 2024, https://arxiv.org/abs/2404.02948), on a 16-bit base: peft
  sets the scaled B A to the principal singular components of W and the base weight to the
  residual W - scaling * B A as it makes the layers (``modeling.lora_config``). The trained model
  is residual + adapter, so the adapter is written converted (``save_pissa_as_lora``): a plain
  LoRA of rank 2r on the original base, which evaluate, merge, export and chat load like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qlorapipe.errors import UserError

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."  # what get_peft_model puts before the base model's module names


@dataclass(frozen=True)
class LoftqResult:
    """How far the 4-bit weights are from the full-precision ones, over every adapted layer:
    ||W - W_hat||_F / ||W||_F with all layers' entries together."""

    layers: int
    error_without_adapter: float  # W_hat = dequant(W_4bit)
    error_with_adapter: float  # W_hat = dequant(W_4bit) + scaling * B A
    seconds: float


class _SafetensorsWeights:
    """Tensors of a model directory's safetensors, one file or shards listed in model.safetensors.index.json."""

    def __init__(self, base_dir: Path, files: contextlib.ExitStack):
        from safetensors import safe_open

        base_dir = Path(base_dir)
        index, single = base_dir / "model.safetensors.index.json", base_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            locations = {name: base_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt", device="cpu") as handle:
                locations = dict.fromkeys(handle.keys(), single)
        else:
            raise UserError(f"{base_dir}: lora.init loftq reads the full-precision weights from model.safetensors "
                            "(or shards listed in model.safetensors.index.json), and neither is here; run "
                            "`dvc repro download`, or use lora.init: default")
        self.base_dir, self.locations, self.files, self.handles = base_dir, locations, files, {}

    def get(self, names: list[str]):
        """The first of ``names`` the checkpoint holds, as a CPU tensor in its stored dtype."""
        from safetensors import safe_open

        for name in names:
            path = self.locations.get(name)
            if path is None:
                continue
            if path not in self.handles:
                self.handles[path] = self.files.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return self.handles[path].get_tensor(name)
        raise UserError(f"{self.base_dir}: lora.init loftq needs the full-precision weight {names[0]}, which its "
                        "safetensors do not hold; use lora.init: default")


def replace_with_loftq(model, base_dir: Path) -> LoftqResult:
    """Start every 4-bit LoRA layer's A and B from LoftQ: an SVD of the layer's quantization error.

    The computation of peft's ``replace_lora_weights_loftq`` (peft 0.21, utils/loftq_utils.py),
    which cannot be called as it is: it computes on "cuda" whatever device the model is on (it
    fails on the CPU), and it sets B A to the error without dividing by the LoRA scaling, so the
    adapter adds alpha / r times the error (peft issue #1982; with alpha = 2r the error is then
    exactly as large as without the adapter). Here each layer computes on its own device, and A
    and B are each divided by sqrt(scaling). The exact SVD, one iteration, as there.

    Call it before the model's first forward: bitsandbytes may repack a 4-bit weight for CPU
    inference then, and the packed layout does not dequantize.

    Args:
        model: the PEFT model ``modeling.add_lora`` made on a 4-bit base.
        base_dir: the base model directory the 4-bit weights were loaded from.

    Raises:
        UserError: the directory has no safetensors weights, or lacks an adapted layer's weight.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora.bnb import Linear4bit

    started = time.perf_counter()
    prefix = getattr(model.get_base_model(), "base_model_prefix", "") + "."
    squares = {"weights": 0.0, "without": 0.0, "with": 0.0}
    layers = 0
    with contextlib.ExitStack() as files, torch.no_grad():
        weights = _SafetensorsWeights(base_dir, files)
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            weight = module.get_base_layer().weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name}: LoftQ must run before the first forward (the 4-bit weight is repacked)")
            key = name.removeprefix(_PEFT_PREFIX) + ".weight"
            # A checkpoint saved from the bare base model lacks its prefix, as peft's loader allows.
            original = weights.get([key, key.removeprefix(prefix)])
            dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            original = original.to(dequantized.device, torch.float32)
            if original.shape != dequantized.shape:
                raise UserError(f"{base_dir}: {key} has shape {tuple(original.shape)} but the loaded layer "
                                f"{tuple(dequantized.shape)}; run `dvc repro download` again")
            error = original - dequantized
            u, s, vh = torch.linalg.svd(error, full_matrices=False)
            for adapter, lora_a in module.lora_A.items():
                rank, scaling = module.r[adapter], module.scaling[adapter]
                root = s[:rank].sqrt() / math.sqrt(scaling)  # scaling * B A = U_r S_r Vh_r
                lora_a.weight.copy_(root[:, None] * vh[:rank])
                module.lora_B[adapter].weight.copy_(u[:, :rank] * root)
                fitted = scaling * module.lora_B[adapter].weight.float() @ lora_a.weight.float()
                squares["with"] += float((error - fitted).square().sum())
            squares["weights"] += float(original.square().sum())
            squares["without"] += float(error.square().sum())
            layers += 1
    if layers == 0:
        raise UserError("lora.init loftq found no 4-bit LoRA layer: set quantization.load_in: 4bit")
    norm = math.sqrt(squares["weights"]) or 1.0
    result = LoftqResult(layers, math.sqrt(squares["without"]) / norm, math.sqrt(squares["with"]) / norm,
                         time.perf_counter() - started)
    logger.info("LoftQ: %d 4-bit layers start from their quantization error in %.1f s; relative weight error "
                "||W - W_4bit||/||W|| %.4f without the adapter, %.4f with it", result.layers, result.seconds,
                result.error_without_adapter, result.error_with_adapter)
    return result


def initial_adapter(model) -> dict:
    """The adapter as peft initialised it, named as peft saves it (CPU copies): what
    ``save_pissa_as_lora`` converts from."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}


def pissa_digest(model) -> str:
    """sha256 of what PiSSA's init computed: each adapted layer's residual base weight and initial A and B.

    A checkpoint holds only the trainable tensors, so a resumed run recomputes the residual from
    the base; the digest, written into each checkpoint, lets it resume only when the recomputed
    residual is the same to the bit (another GPU or library version can give another SVD).
    """
    import torch
    from peft.tuners.lora import LoraLayer

    digest = hashlib.sha256()
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, module in sorted(layers.items()):
        tensors = [module.get_base_layer().weight]
        for adapter in sorted(module.lora_A):
            tensors += [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
        digest.update(name.encode() + b"\0")
        for tensor in tensors:
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_pissa_as_lora(model, out_dir: Path, initial: dict) -> None:
    """Write the trained PiSSA adapter into ``out_dir`` as a plain LoRA on the original base, of rank 2r.

    At init W = W_res + s B0 A0; trained, the model computes W_res + s B A, so its update to W is
    s (B A - B0 A0) = s [B | -B0] [A ; A0]. peft's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` writes that adapter, with r and lora_alpha
    doubled (the same scaling) and init_lora_weights true, so ``PeftModel.from_pretrained`` on the
    original base neither re-runs PiSSA nor needs the residual.

    Args:
        model: the trained PEFT model (not wrapped by DDP or FSDP).
        out_dir: the adapter directory to write.
        initial: ``initial_adapter(model)`` taken right after the adapters were made.
    """
    import tempfile

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        initial_dir = Path(tmp) / "pissa_initial"  # peft loads it as a passing adapter of this name
        initial_dir.mkdir()
        save_file(initial, str(initial_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.save_pretrained(out_dir, safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(initial_dir))
    # peft 0.21 writes only the converted lora_A and lora_B (LoraModel.subtract_mutated_init); modules
    # trained in full (lora.modules_to_save) never held a residual and go back as they were trained.
    weights = Path(out_dir) / "adapter_model.safetensors"
    converted = load_file(str(weights))
    dropped = {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()
               if k not in converted}
    if dropped:
        save_file({**converted, **dropped}, str(weights), metadata={"format": "pt"})
    config = json.loads((Path(out_dir) / "adapter_config.json").read_text())
    logger.info("PiSSA adapter saved as a plain LoRA of rank %d (lora_alpha %g) on the original base",
                config["r"], config["lora_alpha"])

"""Loading the frozen base (4-bit, 8-bit or 16-bit) and attaching LoRA adapters."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

from qlorapipe import quantized_cache
from qlorapipe.errors import UserError
from qlorapipe.params import LoraParams, QuantizationParams

logger = logging.getLogger(__name__)


def pick_device():
    """The device every stage computes on: the first CUDA GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_compute_dtype(name: str, device):
    """Map quantization.compute_dtype to a torch dtype.

    ``auto`` is bfloat16 on GPUs that support it, float16 on older GPUs, bfloat16 on CPUs
    with bfloat16 instructions (``cpu_computes_bfloat16``), and float32 on other CPUs, where
    bfloat16 matmuls are emulated and not faster.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_computes_bfloat16() else torch.float32


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86's AVX512-BF16 or AMX).

    Where it does, oneDNN runs bfloat16 matmuls faster than float32 ones: the offline default's train
    stage ran 1.31x the tokens/s in bfloat16, 1.66x with the CPU's fast paths too (docs/benchmarks.md).
    """
    import torch

    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def quantization_config(params: QuantizationParams, compute_dtype, quant_storage=None):
    """The BitsAndBytesConfig for params, or None for plain 16-bit LoRA.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored as (None: uint8);
    FSDP needs a float dtype there to shard them (bitsandbytes PR #970).
    """
    from transformers import BitsAndBytesConfig

    if params.load_in == "4bit":
        storage = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=params.quant_type,
            bnb_4bit_use_double_quant=params.use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            **storage,
        )
    if params.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def import_model_code(base_dir: Path, trust_remote_code: bool = False) -> None:
    """Import what loading the base and adding adapters run first: peft (with bitsandbytes and transformers'
    model code) and the base's own model class (not custom code), so that a stage can time its imports
    apart from its load. Seconds on a GPU machine, most of a warm load (docs/benchmarks.md)."""
    import peft  # noqa: F401 - imported for its import time
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if trust_remote_code or not (Path(base_dir) / "config.json").is_file():
        return  # the load imports custom code itself, or says what is missing
    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports transformers.models.<type>.modeling_<type>
    except Exception:  # noqa: BLE001 - only imports ahead of time: the load says what is wrong with the model
        return


def load_base_model(base_dir: Path, params: QuantizationParams, device, trust_remote_code: bool = False,
                    shardable_4bit: bool = False):
    """Load the base model quantized as params say, on ``device``.

    Its 4-bit layers compute at inference as in training (``training_numerics_at_inference``).

    ``shardable_4bit`` stores the packed 4-bit weights as float32 elements, so FSDP can flatten
    them with the float32 LoRA weights (and the float32 norms prepare_model_for_kbit_training
    leaves) into one shard: a bfloat16 storage would make the whole shard, LoRA weights
    included, bfloat16 (``distributed.uniform_float_dtype``).

    Returns:
        (model, compute_dtype)

    Raises:
        UserError: the directory is not a model directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if not (Path(base_dir) / "config.json").is_file():
        raise UserError(f"{base_dir}: no base model here; run `dvc repro download`")
    compute_dtype = resolve_compute_dtype(params.compute_dtype, device)
    if device.type == "cpu" and compute_dtype == torch.float16:
        raise UserError("quantization.compute_dtype float16 is not supported on the CPU; use auto or float32")
    # The quantized base saved by an earlier load on this machine (quantized_cache): the same tensors, read
    # instead of quantized again. Not for custom-code models, nor FSDP's float32-stored 4-bit weights.
    cacheable = not trust_remote_code and not shardable_4bit
    key = quantized_cache.entry_key(base_dir, params, compute_dtype, device) if cacheable else None
    model = quantized_cache.load(key, base_dir, compute_dtype, device) if key else None
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir,
            quantization_config=quantization_config(params, compute_dtype, torch.float32 if shardable_4bit else None),
            dtype=compute_dtype,
            device_map={"": device},
            trust_remote_code=trust_remote_code,
        )
        if key:
            quantized_cache.store(model, key)
    model.config.use_cache = False
    training_numerics_at_inference(model)
    return model, compute_dtype


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False, chat_template: str | None = None):
    """The model directory's tokenizer, with ``chat_template`` (``records.trained_chat_template``) in place of its
    own when given: an adapter is prompted in the template it was trained with, and the merged and exported
    models carry that template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def training_numerics_at_inference(model) -> None:
    """Keep bitsandbytes' 4-bit layers computing at inference as in training: dequantize, then matmul.

    On CPUs with AVX512-BF16 a Linear4bit layer's first no-grad eval-mode forward repacks its weight for
    bitsandbytes' own CPU kernel (nn/modules.py, ``Linear4bit.forward``), re-rounding the double-quantized
    scales, so evaluation would not compute what was trained. On an Intel Xeon with AMX (2026-12-05) that
    kernel also gave other logits in some runs of the same program than in others (2 of 8 runs of a probe
    that merged first, 2 of 12 merge stages; never with this off), and took 3x as long on 4 x 256 tokens
    (1.8 against 0.58 s a forward, SmolLM2-135M), though it generated tokens 3.3x as fast (33 against 10 a
    second): chat answers too are the evaluate stage's, at that speed. A no-op elsewhere (other CPUs, GPUs).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# Causal LMs whose logits are the output head (a linear layer) applied to the decoder's last hidden state and
# nothing else (no soft-capping, no logit scale): their loss can be computed from the hidden states a chunk at a
# time (the train stage's chunked loss, evaluation) and their logits in float32 block by block (export's checks).
PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def plain_head_causal_lm(model):
    """The causal LM inside ``model`` (the LM itself, a PeftModel or a DDP wrapper) when its logits are
    ``lm_head(decoder(...).last_hidden_state)`` with a plain, bias-free ``torch.nn.Linear`` head; None otherwise:
    another family, a trained head (``lora.modules_to_save``), or an FSDP wrapper, whose parameters only its own
    forward gathers."""
    import torch

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if type(model).__name__ == "FullyShardedDataParallel":
        return None
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(causal_lm, "lm_head", None)
    if (getattr(getattr(causal_lm, "config", None), "model_type", None) not in PLAIN_HEAD_FAMILIES
            or type(head) is not torch.nn.Linear or head.bias is not None
            or not isinstance(getattr(causal_lm, "model", None), torch.nn.Module)):
        return None
    return causal_lm


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (what target_modules refers to)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and "lm_head" not in full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_problems(model, params: LoraParams) -> list[str]:
    """The lora.target_modules and lora.modules_to_save names that match nothing in ``model``."""
    problems = []
    if isinstance(params.target_modules, list):
        available = linear_module_names(model)
        missing = [m for m in params.target_modules if m not in available]
        if missing:
            problems.append(f"lora.target_modules {missing} match no linear layer of this model; "
                            f"its linear layers are: {', '.join(available)}")
    if params.modules_to_save:
        # peft matches modules_to_save by the last part(s) of a module's dotted name.
        names = [name for name, _ in model.named_modules() if name]
        missing = [m for m in params.modules_to_save if not any(n == m or n.endswith("." + m) for n in names)]
        if missing:
            top = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            problems.append(f"lora.modules_to_save {missing} match no module of this model; "
                            f"its module names are: {', '.join(top)}")
    return problems


# PiSSA through a randomized SVD with 16 subspace iterations: peft's docs say it initialises a 7B
# model in seconds and trains like the exact SVD, which takes minutes there (peft LoraConfig,
# init_lora_weights). The sketch draws from torch's RNG, seeded before the adapters are made.
PISSA_INIT = "pissa_niter_16"


def lora_config(params: LoraParams):
    """The peft LoraConfig of the lora section.

    ``lora.init: pissa`` runs inside peft as the layers are made (the base weights become the
    residual); ``loftq`` is applied afterwards by the train step (it reads the base's files), so its
    config says peft's default init, as every saved adapter_config.json must.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        bias=params.bias,
        use_rslora=params.use_rslora,
        use_dora=params.use_dora,
        modules_to_save=params.modules_to_save,
        init_lora_weights=PISSA_INIT if params.init == "pissa" else True,
        task_type="CAUSAL_LM",
    )


def add_lora(model, params: LoraParams, quantized: bool, gradient_checkpointing: bool):
    """Freeze the base, prepare it for k-bit training and wrap it with trainable LoRA adapters.

    Raises:
        UserError: lora.target_modules or lora.modules_to_save name modules the model does not have.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    problems = lora_problems(model, params)
    if problems:
        raise UserError("; ".join(problems))
    ckpt_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
    return get_peft_model(model, lora_config(params))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as two values per stored byte."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def device_summary(device) -> str:
    """The GPU's name and memory (GB = 1e9 bytes, as everywhere here), or the CPU's thread count."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 1e9:.1f} GB total VRAM"
    return f"CPU, {torch.get_num_threads()} threads"


def memory_summary(device) -> str:
    """GPU memory allocated, reserved and free now, or the process's peak RSS on the CPU (GB)."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (f"GPU memory: {torch.cuda.memory_allocated(device) / 1e9:.2f} GB allocated, "
                f"{torch.cuda.memory_reserved(device) / 1e9:.2f} GB reserved, {free / 1e9:.2f} GB free")
    return f"process peak RSS: {peak_rss_bytes() / 1e9:.2f} GB"


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_metrics(device) -> dict:
    import torch

    if device.type == "cuda":
        return {
            "peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3),
        }
    return {"peak_rss_gb": round(peak_rss_bytes() / 1e9, 3)}


def environment_record(device) -> dict:
    """Library versions, CUDA and the device, so `dvc metrics diff` shows when the environment changed."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "peft": installed("peft"),
        "bitsandbytes": installed("bitsandbytes"),
        "cuda": torch.version.cuda or "none",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
    }

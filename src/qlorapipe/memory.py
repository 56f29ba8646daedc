"""The pipeline's GPU memory budget (``acceleration.memory_budget_gb``), shared by every stage.

Training fits its kept activations to it (``train.fast.memory_plan``); evaluate, merge and export
check before loading weights that the smallest working set they need fits (``check_fits``), and
merge and export place 16-bit and 32-bit models on the GPU only as far as the budget goes, the rest
offloaded to the CPU and streamed through the GPU layer by layer (``place_within``). Every GB here
is 1e9 bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qlorapipe.errors import UserError

logger = logging.getLogger(__name__)

BUDGET_KEY = "acceleration.memory_budget_gb"
# The share of the GPU's memory the budget is when the key is null.
DEFAULT_SHARE = 0.9
# What the allocator, CUDA kernels' workspaces and small tensors take beside what we count.
SLACK_BYTES = 400e6
# Logits the evaluation loss materialises at once (elements; perplexity.mean_token_loss): 128 MiB in float32,
# whatever the vocabulary. The head by chunks of 2**24 ran at 0.96x the speed of a batch's logits whole at
# Qwen2.5's vocabulary, of 2**25 0.99x (benchmarks/eval_memory.py, docs/benchmarks.md).
LOSS_CHUNK_ELEMENTS = 2**25
# Bytes per weight of a quantized linear layer: 4-bit values plus blockwise scales (64 values share
# one; double quantization stores those scales in 8 bits), or int8 values plus a scale per row.
_QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / 256 / 64, "4bit-single": 0.5 + 4 / 64, "8bit": 1.0}


def budget_bytes(budget_gb: float | None, device) -> float | None:
    """The budget in bytes on a CUDA ``device`` (None on the CPU: there it bounds nothing)."""
    if device.type != "cuda":
        return None
    if budget_gb is not None:
        return budget_gb * 1e9
    import torch

    return DEFAULT_SHARE * torch.cuda.get_device_properties(device).total_memory


def describe(budget: float, budget_gb: float | None) -> str:
    return f"{budget / 1e9:.2f} GB ({BUDGET_KEY}{'' if budget_gb is not None else ' null: 90% of the GPU'})"


def meta_model(model_dir: Path, trust_remote_code: bool = False):
    """The model of ``model_dir`` with every weight on the meta device: shapes without memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weight_bytes(model, load_in: str = "none", use_double_quant: bool = True, bytes_16bit: int = 2) -> float:
    """What ``model``'s weights take on the GPU when loaded as the quantization section says.

    Linear layers other than the output head are quantized by bitsandbytes; everything else
    (embeddings, norms, the head) stays in 16 bits. Tied weights count once.
    """
    import torch

    kind = "4bit" if use_double_quant else "4bit-single"
    per_weight = {"4bit": _QUANTIZED_BYTES[kind], "8bit": _QUANTIZED_BYTES["8bit"]}.get(load_in)
    quantized = set()
    if per_weight is not None:
        head = model.get_output_embeddings()
        quantized = {id(m.weight) for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not head}
    seen, total = set(), 0.0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel() * (per_weight if id(param) in quantized else bytes_16bit)
    return total


def largest_block_bytes(model, bytes_per_weight: float) -> float:
    """The largest module accelerate will not split (a decoder block, or the embeddings)."""
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or [])
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules()
             if type(m).__name__ in no_split or isinstance(m, torch.nn.Embedding)]
    return max(sizes, default=0) * bytes_per_weight


def logits_bytes(rows: int, length: int, vocab: int, bytes_per_value: int) -> float:
    return float(rows) * length * vocab * bytes_per_value


def rows_at_once(weights: float, largest: float, room: float, row_bytes: float, rows: int) -> int:
    """How many of a batch's ``rows`` a model placed with ``place`` runs at once.

    Each forward streams through the GPU every weight that did not fit (``place`` keeps room for the
    ``largest`` module to come over), so running more rows at once streams the same bytes fewer
    times, while each row's working memory (``row_bytes``: its logits) takes room the weights would
    have had. The count that moves the fewest bytes wins, the larger on a tie; a count whose working
    memory leaves less than the largest module is not taken, unless it is 1.

    Args:
        weights: the model's weight bytes; largest: its largest module's; room: the bytes it may use on
            the GPU; row_bytes: the working memory per row; rows: the rows of a batch.
    """
    best = (float("inf"), 1)
    for count in range(1, rows + 1):
        left = room - count * row_bytes
        if count > 1 and left < largest:
            break
        streamed = 0.0 if weights <= left else weights - max(left - largest, 0.0)
        moved = -(-rows // count) * streamed
        if moved <= best[0]:
            best = (moved, count)
    return best[1]


def check_fits(stage: str, need: float, budget: float | None, budget_gb: float | None, what: str) -> None:
    """Stop before loading weights when ``need`` bytes cannot fit the budget.

    Raises:
        UserError: naming the key, the smallest budget this stage needs for this model, and what to change.
    """
    if budget is None or need <= budget:
        return
    raise UserError(
        f"{BUDGET_KEY}: the {stage} stage needs at least {need / 1e9:.2f} GB of GPU memory for this model "
        f"({what}), above the budget of {describe(budget, budget_gb)}; raise {BUDGET_KEY} to "
        f"{need / 1e9:.2f} or more, or use a GPU with more memory")


def load_on_cpu(model_dir: Path, dtype, trust_remote_code: bool = False):
    """The 16/32-bit model of ``model_dir`` in ``dtype`` on the CPU, ready for ``place``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": "cpu"},
                                                trust_remote_code=trust_remote_code).eval()


def place(model, device, budget: float | None, reserve: float):
    """Put a 16/32-bit model that is on the CPU on ``device`` for inference, within the budget.

    On a GPU, as many blocks as fit in ``budget - reserve`` (the working memory the caller needs
    beside the weights) move to the GPU; the rest stay on the CPU and stream through the GPU at
    every forward (accelerate's big-model inference). On the CPU, a float16 model computes in
    float32: the weights are the float16 values exactly, and PyTorch's CPU float16 matmuls are
    about 90 times slower than float32's.

    Returns:
        (model, offloaded): ``offloaded`` counts the modules left on the CPU (0: all on the GPU).
    """
    import torch

    if device.type != "cuda":
        return (model.float() if model.dtype == torch.float16 else model), 0
    from accelerate import dispatch_model, infer_auto_device_map

    index = device.index if device.index is not None else torch.cuda.current_device()
    room = max(budget - reserve - torch.cuda.memory_allocated(device), 0)
    no_split = model._no_split_modules or []
    placement = infer_auto_device_map(model, max_memory={index: int(room), "cpu": 2**50},
                                      no_split_module_classes=no_split)
    offloaded = sum(1 for where in placement.values() if where in ("cpu", "disk"))
    if not offloaded:
        return model.to(device), 0
    # An offloaded module's weights come to the GPU for its forward: the output head (a tied one too) is
    # the largest of them, 1.24 GB in float32 for Qwen2.5-3B's 151,936-token vocabulary. Leave room for it.
    head = model.get_output_embeddings().weight
    placement = infer_auto_device_map(
        model, max_memory={index: int(max(room - head.numel() * head.element_size(), 0)), "cpu": 2**50},
        no_split_module_classes=no_split)
    offloaded = sum(1 for where in placement.values() if where in ("cpu", "disk"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("%d of %d modules do not fit the GPU within the budget (%.2f GB of room for %.2f GB of weights); "
                "they stay on the CPU and stream through the GPU at every forward", offloaded, len(placement),
                room / 1e9, weights / 1e9)
    if offloaded == len(placement):
        # Room for none of them: every module streams. dispatch_model would leave a model mapped whole to the CPU
        # where it is, without hooks (its first forward then meets inputs on the GPU); cpu_offload streams each one.
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device=torch.device("cuda", index)), offloaded
    return dispatch_model(model, device_map=placement, main_device=index), offloaded


def peak_metrics(device, budget: float | None) -> dict:
    """The stage's peak GPU memory (allocated by tensors, reserved by the allocator) and its budget, in GB;
    also logged, so the stage prints its peak."""
    found = stage_peaks(device)
    if budget is not None:
        found["budget_gb"] = round(budget / 1e9, 3)
    logger.info("Peak memory: %s", ", ".join(f"{key} {value}" for key, value in found.items()))
    return found


def stage_peaks(device) -> dict:
    """The stage's peak GPU memory, allocated and reserved, in GB (the process's peak RSS on the CPU), the peaks
    before a ``restart_peak`` included."""
    from qlorapipe.modeling import peak_memory_metrics

    found = peak_memory_metrics(device)
    for key, earlier in zip(("peak_gpu_allocated_gb", "peak_gpu_reserved_gb"), _earlier_peaks, strict=True):
        if key in found:
            found[key] = max(found[key], round(earlier / 1e9, 3))
    return found


def largest_weight(model) -> int:
    """Elements of the largest linear layer's weight, the output head aside (what one layer's merge holds)."""
    import torch

    head = model.get_output_embeddings()
    return max((m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head),
               default=0)


def check_quantized_fits(stage: str, base_dir: Path, quant, rows: int, length: int, budget: float | None,
                         budget_gb: float | None, trust_remote_code: bool = False, logits: bool = True) -> None:
    """Stop before loading when the quantized base + adapter and a forward pass of ``rows`` x ``length`` tokens
    (with their logits whole, unless ``logits`` is False) cannot fit (train: no rows, its loss never holds all the
    logits; the rest of a step comes on top).

    The forward pass is counted as one block's widest tensors in 16 bits (the MLP's three intermediate ones and a
    few hidden states): on an H100 the evaluation of Qwen2.5-3B at 4 x 2,048 tokens allocated 1.29 GB above the
    weights with its head a chunk at a time, against 0.67 GB counted here and 0.40 GB of loss chunks.

    Raises:
        UserError: as ``check_fits``.
    """
    if budget is None:
        return
    skeleton = meta_model(base_dir, trust_remote_code)
    vocab = skeleton.get_output_embeddings().weight.shape[0]
    config = skeleton.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    forward = float(rows) * length * (3 * intermediate + 4 * hidden) * 2
    # The logits in 16 bits, and the float32 chunks the loss upcasts.
    need = (weight_bytes(skeleton, quant.load_in, quant.use_double_quant) + forward
            + (logits_bytes(rows, length, vocab, 2) if logits else 0.0) + 3 * 4 * LOSS_CHUNK_ELEMENTS + SLACK_BYTES)
    what = ""
    if rows:
        what = f" and {rows} x {length} tokens" + (" of logits" if logits else " through a block")
    check_fits(stage, need, budget, budget_gb, f"the quantized base + adapter{what}")


def to_host(tensor, dtype=None):
    """``tensor`` in ``dtype`` (default: its own) in CPU memory of its own, rounded where it is.

    From a GPU, the copy goes into memory that all cores have touched first. The driver's copy into
    untouched pageable memory faults its pages in one thread: 1.2 GB/s on an H200 under gVisor, against
    10.6 GB/s into touched memory, and touching 5.6 GB took 0.64 s there (docs/benchmarks.md). Rounding on
    the GPU first halves the bytes copied; a blocking ``tensor.to("cpu", dtype)`` copies float32 and
    rounds on the CPU (same values: both round to nearest even).
    """
    import torch

    dtype = dtype or tensor.dtype
    if tensor.device.type == "cpu":
        return tensor.to(dtype)
    tensor = tensor.to(dtype)
    host = torch.empty(tensor.shape, dtype=dtype)
    host.zero_()
    host.copy_(tensor)
    return host


def write_beside_compute(device) -> bool:
    """Whether a stage writes its files on the CPU while the device computes: on a GPU, where the two use
    different hardware; on a CPU they would share the same cores, so each file is written in its turn."""
    return device.type == "cuda"


def release(device) -> None:
    """Free the GPU memory of models no longer referenced: for the next model, and back to the driver
    for code outside torch (llama.cpp)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# The stage's peaks (allocated, reserved bytes) before a measurement of its own restarted torch's counters.
_earlier_peaks = [0, 0]


def reset_peak(device) -> None:
    """Start counting the stage's peak GPU memory from here."""
    _earlier_peaks[:] = [0, 0]
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def restart_peak(device) -> None:
    """Restart torch's peak counters for a measurement of its own (a decoder's memory), keeping the stage's peak
    so far for ``peak_metrics``."""
    if device.type == "cuda":
        import torch

        _earlier_peaks[0] = max(_earlier_peaks[0], torch.cuda.max_memory_allocated(device))
        _earlier_peaks[1] = max(_earlier_peaks[1], torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)

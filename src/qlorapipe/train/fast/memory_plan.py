"""How many blocks can skip checkpointing within a memory budget (``uncheckpointed_layers: auto``).

``fit_uncheckpointed_layers`` measures a few steps' peak memory on the GPU and
``blocks_within_budget`` extrapolates along the line through them; on the CPU,
``fit_on_host`` counts what one forward pass saves for the backward pass per block and keeps
as many blocks as fit in a share of the host memory available. With ``host_kept_layers: auto``,
``fit_host_kept_layers`` first times steps with some checkpointed blocks kept in host memory instead
(CUDA). ``plan_uncheckpointed_layers`` is what the train stage calls: both, each with its log line
(on CUDA through ``fit_on_gpu``, which runs them in order and which the speed benchmark calls too).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from qlorapipe.data import model_inputs
from qlorapipe.errors import UserError
from qlorapipe.params import AccelerationParams
from qlorapipe.train.fast import offload
from qlorapipe.train.fast.checkpointing import (
    checkpoint_again,
    decoder_layers,
    recomputed_layers,
    skip_checkpointing,
    uncheckpointed_count,
)
from qlorapipe.train.fast.cuda_graphs import GraphedStep

logger = logging.getLogger(__name__)

# How many more steps fit_uncheckpointed_layers may measure when the count it predicts peaks above the budget.
MAX_FIT_CHECKS = 3
# On the CPU, the share of the host memory available when training starts that kept activations may fill.
HOST_SHARE = 0.5
# memory_budget_gb: null, as the planners' log lines say it.
DEFAULT_BUDGET = "90% of the GPU's memory"


def blocks_within_budget(peak: float, kept: int, per_block: float, budget: float, n_blocks: int) -> int:
    """The most blocks that can keep their activations with the step's peak memory within ``budget``.

    The peak grows by a fixed amount per kept block (Qwen2.5-3B at 4,096 tokens on an H200:
    10.90, 12.14 and 14.61 GB with 24, 28 and 36 kept, 0.31 GB a block), so it is the line
    through one measured point: ``peak + (N - kept) * per_block``.

    Args:
        peak: the measured peak with ``kept`` blocks kept (GB, as ``budget``).
        kept: how many blocks were kept when ``peak`` was measured.
        per_block: what each further kept block adds (GB); <= 0 (nothing measurable): every
            block fits if ``peak`` does.
        budget: the peak allowed (GB).
        n_blocks: the blocks there are.

    Returns:
        The largest N in [0, n_blocks] whose predicted peak is at most ``budget``.
    """
    if per_block <= 0:
        return n_blocks if peak <= budget else 0
    room = kept + (budget - peak) / per_block
    if room >= n_blocks:
        return n_blocks
    # A hair of tolerance so that a budget on a predicted peak (a float sum) keeps that block.
    return max(0, math.floor(room + 1e-9))


def _step_down(measure, peaks: dict[int, float], n_kept: int, floor: int, budget_gb: float) -> int:
    """Measure the step with ``n_kept`` blocks kept (into ``peaks``, unless there already) and, while its peak
    is above ``budget_gb``, step down, at most ``MAX_FIT_CHECKS`` steps in all: along the line through the
    most blocks measured below it, or halfway down to them when the step ran out of memory (no line to
    follow). Counts at ``floor`` or below are not stepped past. Returns the last count tried."""
    for _ in range(MAX_FIT_CHECKS):
        if n_kept not in peaks:
            peaks[n_kept] = measure(n_kept)
        if n_kept <= floor or peaks[n_kept] <= budget_gb:
            break
        below = max(kept for kept in peaks if kept < n_kept)
        if math.isinf(peaks[n_kept]):
            n_kept = (below + n_kept) // 2
        else:
            slope = (peaks[n_kept] - peaks[below]) / (n_kept - below)
            n_kept = blocks_within_budget(peaks[below], below, slope, budget_gb, n_kept - 1)
    return n_kept


def plan_uncheckpointed_layers(model, params: AccelerationParams, batch, device, num_processes: int = 1,
                               cuda_graphs: bool = False, eval_batch=None, optimizer_state_gb: float = 0.0) -> int:
    """With ``uncheckpointed_layers: auto``, keep as many blocks as fit in the memory budget; with
    ``host_kept_layers: auto`` (CUDA), first keep the checkpointed blocks in host memory that make a step fastest.

    Runs ``fit_uncheckpointed_layers`` on ``batch`` on CUDA in one process, ``fit_on_host`` on
    the CPU (where an integer ``uncheckpointed_layers`` is applied here too: ``apply`` applies it on
    CUDA only); before it on CUDA, ``plan_host_kept_layers``. With several processes every block stays
    checkpointed and none is kept in host memory: each rank would
    measure its own memory and could keep a different number of blocks, and the ranks must
    agree (under FSDP a recomputed block gathers its shards again: ranks that recompute
    different blocks would wait on different collectives).

    Args:
        model: the PEFT model, after ``apply``.
        params: the acceleration section.
        batch: one micro-batch of prepared rows (``input_ids``, ``labels``, maybe
            ``position_ids``), as the training loop draws them.
        device: where the model lives.
        num_processes: how many processes train.
        cuda_graphs: training replays CUDA graphs (``graphed_step``): measure steps the same way.
        eval_batch: the rows one evaluation between steps computes at once (``perplexity.mean_token_loss``). With
            ``cuda_graphs`` the memory it allocates is left out of the budget the steps are fitted to
            (``evaluation_room_gb``): the graphs' memory pool keeps the step's peak to itself, so an evaluation
            allocates beside it, not in memory the step has freed.
        optimizer_state_gb: what the optimizer's state will hold once it has stepped (``loop.optimizer_state_bytes``):
            the steps measured here run before any optimizer step, so that is left out of the budget too.

    Returns:
        How many blocks keep their activations (0 when none does).
    """
    if device.type == "cpu" and params.uncheckpointed_layers != "auto":
        skip_checkpointing(model, params.uncheckpointed_layers)
    autos = [name for name in ("uncheckpointed_layers", "host_kept_layers") if getattr(params, name) == "auto"
             and (device.type == "cuda" or name == "uncheckpointed_layers")]  # host-kept blocks: CUDA only
    if not autos or device.type not in ("cuda", "cpu"):
        return uncheckpointed_count(model)
    if num_processes != 1:
        logger.info("%s: auto keeps every block checkpointed with %d processes (set an integer to keep some)",
                    " and ".join(autos), num_processes)
        return uncheckpointed_count(model)
    inputs, labels = model_inputs(batch, device), batch["labels"].to(device).long()
    if device.type == "cpu":
        kept, measured = fit_on_host(model, inputs, labels)
        if measured.get("why_none"):
            logger.info("uncheckpointed_layers: auto keeps every block checkpointed on the CPU: %s (set an integer "
                        "to keep some)", measured["why_none"])
        elif measured:
            logger.info("uncheckpointed_layers: auto keeps %d of %d blocks on the CPU (%.3f GB saved for the backward "
                        "pass per block and %.3f GB outside them; %.2f GB is %.0f%% of the host memory available)",
                        kept, measured["n_blocks"], measured["per_block_bytes"] / 1e9, measured["rest_bytes"] / 1e9,
                        measured["room_bytes"] / 1e9, 100 * HOST_SHARE)
        return kept
    note = _default_note(params.memory_budget_gb)  # after each budget logged
    evaluation = evaluation_room_gb(model, eval_batch, device) if cuda_graphs and eval_batch is not None else 0.0
    if evaluation or optimizer_state_gb:
        params, note = _within_room(model, params, device, evaluation, optimizer_state_gb)
    plans = fit_on_gpu(model, inputs, labels, params, device, cuda_graphs, note)
    if "uncheckpointed_layers" not in plans:
        return uncheckpointed_count(model)
    kept, measured = plans["uncheckpointed_layers"]
    if measured and measured["peak_all_checkpointed_gb"] is None:  # every block kept fitted: nothing else measured
        logger.info("uncheckpointed_layers: auto keeps all %d blocks (%.2f GB; budget %.2f GB%s)", kept,
                    measured["peak_gb"], measured["budget_gb"], note)
    elif measured:
        logger.info("uncheckpointed_layers: auto keeps %d of %d blocks (%.2f GB each; %.2f GB with all "
                    "checkpointed, %.2f GB with %d kept; budget %.2f GB%s)", kept, measured["n_blocks"],
                    measured["per_block_gb"], measured["peak_all_checkpointed_gb"], measured["peak_gb"], kept,
                    measured["budget_gb"], note)
        if measured.get("offloaded"):
            logger.info("uncheckpointed_layers: auto offloads the checkpointed blocks' inputs to host memory "
                        "(%.2f GB with every block checkpointed, %.2f GB with their inputs offloaded): %.2f GB with "
                        "%d kept", measured["peak_all_checkpointed_gb"], measured["peak_offloaded_all_checkpointed_gb"],
                        measured["peak_gb"], kept)
        if measured["peak_gb"] > measured["budget_gb"]:
            logger.warning("A step peaks at %.2f GB with every block checkpointed%s, above the budget of "
                           "%.2f GB%s (acceleration.memory_budget_gb)", measured["peak_gb"],
                           " and their inputs offloaded" if measured.get("offloaded") else "", measured["budget_gb"],
                           note)
    return kept


def evaluation_room_gb(model, eval_batch, device) -> float:
    """What one evaluation of ``eval_batch`` allocates (GB) above what is allocated before it: the memory an
    evaluation between steps needs beside the CUDA graphs' pool (``perplexity.mean_token_loss``, as the loop runs
    it). Leaves the model as it was (eval mode only inside) and the peak memory statistics reset."""
    import torch

    from qlorapipe.perplexity import mean_token_loss

    rows = len(eval_batch["input_ids"])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    mean_token_loss(model, _OneBatch(eval_batch), rows, device)
    room = (torch.cuda.max_memory_allocated(device) - before) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return room


class _OneBatch:
    """One batch of prepared rows as a dataset ``mean_token_loss`` slices."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: slice) -> dict:
        return {key: value[index] for key, value in self.batch.items()}


def _default_note(memory_budget_gb: float | None) -> str:
    """What the planners' log lines say after a budget the user gave (nothing) or left to the default."""
    return "" if memory_budget_gb is not None else f", {DEFAULT_BUDGET}"


def _within_room(model, params: AccelerationParams, device, evaluation_gb: float,
                 optimizer_state_gb: float) -> tuple[AccelerationParams, str]:
    """``params`` with the budget the steps are fitted to less what the optimizer's state holds and what an
    evaluation between steps allocates beside the CUDA graphs' memory (0 without graphs), both GB; and the words
    the planners' log lines put after that budget.

    Raises:
        UserError: nothing is left to the steps.
    """
    from dataclasses import replace

    probe = _Probe(model, device)
    with probe:  # the gradients and modes its release touches are put back
        budget = probe.budget(params.memory_budget_gb)
    steps = budget - evaluation_gb - optimizer_state_gb
    whole = f"{budget:.2f} GB" + (f" ({DEFAULT_BUDGET})" if params.memory_budget_gb is None else "")
    beside = f"the optimizer's state takes {optimizer_state_gb:.2f} GB" + (
        f", an evaluation between steps {evaluation_gb:.2f} GB beside the CUDA graphs' memory" if evaluation_gb else "")
    if steps <= 0:
        raise UserError(f"acceleration.memory_budget_gb: {whole} leaves nothing to the training step ({beside}): "
                        "give it more GPU memory, or lower training.per_device_batch_size or data.max_length")
    logger.info("memory budget: %.2f GB of %s for the training step; %s", steps, whole, beside)
    return replace(params, memory_budget_gb=round(steps, 3)), f" left to the steps of {whole}"


def fit_on_gpu(model, inputs: dict, labels, params: AccelerationParams, device,
               cuda_graphs: bool = False, note: str | None = None) -> dict[str, tuple[int, dict]]:
    """The CUDA planners ``params`` asks for (``auto``), in the train stage's order: (count kept, measured) by name.

    ``host_kept_layers`` first (``plan_host_kept_layers``, logged): blocks kept on the GPU then fill what its
    copies leave of the budget (``fit_uncheckpointed_layers``), which takes the step with every block on the
    GPU that the first measured instead of measuring it twice.
    """
    plans: dict[str, tuple[int, dict]] = {}
    if params.host_kept_layers == "auto":
        plans["host_kept_layers"] = plan_host_kept_layers(model, inputs, labels, params, device, cuda_graphs, note)
    if params.uncheckpointed_layers == "auto":
        every_block = plans.get("host_kept_layers", (0, {}))[1].get("every_block_peak_gb")
        plans["uncheckpointed_layers"] = fit_uncheckpointed_layers(
            model, inputs, labels, params.memory_budget_gb, device, cuda_graphs, every_block_peak_gb=every_block)
    return plans


def plan_host_kept_layers(model, inputs: dict, labels, params: AccelerationParams, device,
                          cuda_graphs: bool = False, note: str | None = None) -> tuple[int, dict]:
    """``fit_host_kept_layers`` for the train stage, with what it measured in the log: (count kept, measured).
    ``note`` follows the budget logged (None: what ``params.memory_budget_gb`` says of itself)."""
    kept, measured = fit_host_kept_layers(model, inputs, labels, params.memory_budget_gb, device, cuda_graphs,
                                          every_block_may_fit=params.uncheckpointed_layers == "auto")
    if not measured:
        return kept, measured
    tried = ", ".join(f"{count}: {seconds:.3f} s at {measured['peak_gb'][count]:.2f} GB"
                      for count, seconds in measured["seconds"].items())
    budget = f"budget {measured['budget_gb']:.2f} GB" + (_default_note(params.memory_budget_gb) if note is None
                                                          else note)
    if kept:
        offloaded = ("; the other blocks' inputs offloaded to host memory (recomputing every block without that: "
                     f"{measured['peak_not_offloaded_gb']:.2f} GB)" if measured.get("offloaded") else "")
        logger.info("host_kept_layers: auto keeps %d of %d checkpointed blocks' activations in host memory "
                    "(%.2f GB pinned) instead of recomputing them%s; a step with N of them: %s; %s", kept,
                    measured["candidates"], measured["host_gb"][kept], offloaded, tried, budget)
    else:
        logger.info("host_kept_layers: auto keeps none: %s%s; %s", measured["why_none"],
                    f" (a step with N of them: {tried})" if tried else "", budget)
    return kept, measured


def fit_on_host(model, inputs: dict, labels, available: float | None = None) -> tuple[int, dict]:
    """On the CPU, keep as many blocks as fit in ``HOST_SHARE`` of the host memory available.

    Recomputing a block costs its forward pass again in the backward pass (the offline default on 2
    CPU cores: 1.39-1.46x the tokens/s with every block kept; the adapter the same bytes). A block kept
    holds what its forward pass saves for the backward pass instead of its input only. One forward
    pass of one row of the micro-batch (``saved_bytes``) counts what the last block saves and what the
    rest of the pass saves; both grow with the rows, and the blocks of a decoder are alike: the rest
    of the step times the rows, plus the blocks kept times the block's count times the rows, must fit
    in ``HOST_SHARE`` of ``available``. Every block stays checkpointed when that cannot be counted:
    8-bit layers (bitsandbytes' CPU 8-bit matmul keeps its input outside autograd's saved tensors), a
    last block the forward pass never ran, or no figure for the host memory.

    Args:
        model: the PEFT model on the CPU.
        inputs: the model's keyword arguments for one micro-batch (``data.model_inputs``).
        labels: that micro-batch's labels.
        available: bytes of host memory available (None: the system's figure, ``host_available``).

    Returns:
        (N, measured): the blocks kept and, for the whole micro-batch, ``per_block_bytes`` (what a kept
        block holds) and ``rest_bytes`` (what the step saves outside it), ``room_bytes``, ``kept``,
        ``n_blocks``; or ``why_none`` when every block stays checkpointed uncounted; empty when no block
        is under gradient checkpointing.
    """
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
    if not layers:
        return 0, {}
    if any(type(module).__name__ == "Linear8bitLt" for module in model.modules()):
        return 0, {"why_none": "8-bit layers keep their inputs where the probe cannot count them"}
    available = host_available() if available is None else available
    if available is None:
        return 0, {"why_none": "no figure for the host memory available"}
    import torch

    # The row with the most packed examples: its attention mask is the one a kept block may save.
    row = int((inputs["position_ids"] == 0).sum(dim=1).argmax()) if "position_ids" in inputs else 0
    one_row = {name: value[row : row + 1] if isinstance(value, torch.Tensor) else value
               for name, value in inputs.items()}
    block, everything = saved_bytes(model, one_row, labels[row : row + 1], layers[-1])
    if block is None or block <= 0:
        return 0, {"why_none": "the last block saved nothing in a forward pass"}
    rows = len(labels)
    per_block, rest = block * rows, (everything - block) * rows
    room = HOST_SHARE * available
    kept = max(0, min(len(layers), math.floor((room - rest) / per_block)))
    if kept:
        skip_checkpointing(model, kept)
    return kept, {"per_block_bytes": per_block, "rest_bytes": rest, "room_bytes": room, "kept": kept,
                  "n_blocks": len(layers)}


def saved_bytes(model, inputs: dict, labels, block) -> tuple[int | None, int]:
    """Bytes one forward pass of ``inputs`` saves for the backward pass: inside ``block`` (kept for the pass;
    None when it never ran) and in all. Each storage counts once; the model's parameters and buffers not at
    all. Leaves no trace: random state, gradients, train/eval modes, hooks and checkpointing as they were."""
    import torch

    trainable = [param for param in model.parameters() if param.requires_grad]
    grads = [param.grad for param in trainable]
    modes = [(module, module.training) for module in model.modules()]
    own = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    saved = {"all": 0, "block": 0}
    inside = [None]  # None: the block has not run; then True inside it, False after

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            # A sparse or wrapper tensor has no plain storage: it is left uncounted on purpose, and the
            # probe's figure is then a lower bound.
            return tensor
        if storage.data_ptr() not in own and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved["all"] += storage.nbytes()
            saved["block"] += storage.nbytes() if inside[0] else 0
        return tensor

    def enter(*_):
        inside[0] = True

    def leave(*_):
        inside[0] = False

    was_checkpointed = getattr(block, "gradient_checkpointing", False)
    hooks = []
    try:
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        block.gradient_checkpointing = False
        model.train()  # dropout saves its masks in training mode only
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**inputs, labels=labels)
    finally:
        for hook in hooks:
            hook.remove()
        block.gradient_checkpointing = was_checkpointed
        for module, training in modes:
            module.training = training
        for param, grad in zip(trainable, grads, strict=True):
            param.grad = grad
    return (None if inside[0] is None else saved["block"]), saved["all"]


def host_available() -> float | None:
    """Bytes of host memory a new allocation may take: Linux's ``MemAvailable``, or less where a cgroup
    (a container, a CI job) limits this process's memory; None where neither can be read."""
    import contextlib
    import os

    available = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:  # Linux; elsewhere the free pages below
        available = next((float(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)
    if available is None:
        try:
            available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(name).read_text().strip() for name in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            available = min(available, max(0.0, float(limit) - float(usage)))
    return available


def fit_uncheckpointed_layers(model, inputs: dict, labels, budget_gb: float | None, device,
                              cuda_graphs: bool = False, every_block_peak_gb: float | None = None) -> tuple[int, dict]:
    """Measure what a block's activations cost, then keep as many blocks as fit in ``budget_gb``.

    Forward and backward passes of one micro-batch (eager, or as CUDA graphs with
    ``cuda_graphs``) measure the peak allocated memory, first with every block kept: when that
    fits the budget, nothing else is measured (three steps fewer; the common case with a budget
    of the GPU's memory, and the Qwen2.5-3B and Llama-2-7B shapes at 512 tokens within 7.5 GB).
    Otherwise with every block checkpointed, with
    the last block kept and with the last two kept; the difference of the last two is what
    each further kept block adds, and the line through them predicts how many fit (``blocks_within_budget``). Not the difference to all
    checkpointed: that step already holds one block's activations at a time, recomputing
    each for its backward pass, so the first kept block adds less than the others
    (Qwen2.5-3B at 4,096 tokens on an H200: 3.79 GB with none kept; 10.90, 12.14 and 14.61 GB
    with 24, 28 and 36 kept, that is 3.79 + (N - 1) * 0.31 GB within 0.03 GB). The count the
    line predicts is then measured too, and while it peaks above the budget the count steps
    down along the line through the measured points (halfway down when it ran out of memory),
    at most MAX_FIT_CHECKS times: the count kept is one whose measured peak is within the
    budget. ``skip_checkpointing`` then keeps that many.

    It leaves no trace: the CPU and CUDA random states are put back (training draws the
    dropout masks it would have drawn without it), as are the gradients (None in the train
    stage) and the modules' train/eval modes; the memory it used is freed and the peak
    memory statistics are reset.

    Args:
        model: the PEFT model, after ``apply``.
        inputs: the model's keyword arguments for one micro-batch (``data.model_inputs``).
        labels: that micro-batch's labels, on ``device``.
        budget_gb: the peak allowed (GB, 1e9 bytes); None: 90% of the GPU's memory, that is
            of the free memory plus what this process has allocated, when it starts.
        device: where the model lives; on anything but CUDA nothing is done.
        cuda_graphs: measure each step as training will run it, captured and replayed as a
            ``GraphedStep`` (warm-up runs included): on an H200 the graphed step of the 3B model
            with 33 blocks kept peaked at least 1.3 GB above its eager step. A step that
            cannot be captured is measured eagerly, as it will then train.
        every_block_peak_gb: the peak of the step with every block kept, when ``fit_host_kept_layers`` has
            just measured it on the same batch and kept no block in host memory (inf: out of memory); it is
            then not measured again.

    Returns:
        (N, measured): the blocks kept and, for the log and metrics, ``peak_all_checkpointed_gb``,
        ``per_block_gb`` (both None when every block kept fitted, so neither was measured),
        ``budget_gb``, ``kept``, ``n_blocks`` and ``peak_gb`` (the measured
        peak with N kept); empty when nothing was measured (not CUDA, or no block under
        gradient checkpointing). When no count fits (every block checkpointed peaks above the budget), the
        checkpointed blocks' inputs are offloaded to host memory (``offload.offload_checkpoints``,
        unless they already are) and that step is measured: ``offloaded`` is True and
        ``peak_offloaded_all_checkpointed_gb`` its peak; below the budget, the most blocks that fit
        beside the offloaded inputs are kept (the line through the kept blocks' peaks less what offloading
        saved, each count measured), and ``peak_gb`` is the peak with them.

    Raises:
        torch.cuda.OutOfMemoryError: a step with every block checkpointed does not fit.
    """
    if device.type != "cuda":
        return 0, {}
    layers = recomputed_layers(model)  # blocks kept in host memory are not recomputed already
    if not layers:
        return 0, {}
    import torch

    n_blocks = len(layers)
    probe = _Probe(model, device)

    def measure(kept: int) -> float:
        """The peak allocated memory (GB) of one step with the last ``kept`` blocks kept; inf if it runs out."""
        probe.release()
        skip_checkpointing(model, kept)
        try:
            return measure_step(model, inputs, labels, device, cuda_graphs, eager_when_out_of_memory=kept == 0)[0]
        except torch.cuda.OutOfMemoryError:
            if kept == 0:
                raise  # training itself would not fit
            return math.inf
        finally:
            checkpoint_again(layers[n_blocks - kept :])

    budget_gb = probe.budget(budget_gb)
    peaks: dict[int, float] = {}
    with probe:
        if n_blocks > 2:  # every block kept first: when that fits, there is no line to draw
            peaks[n_blocks] = measure(n_blocks) if every_block_peak_gb is None else every_block_peak_gb
        n_kept = n_blocks
        if peaks.get(n_blocks, math.inf) > budget_gb:
            peaks.update({kept: measure(kept) for kept in range(min(2, n_blocks) + 1)})
            top = min(2, n_blocks)
            slope = peaks[top] - peaks[top - 1]  # inf or nan when out of memory
            n_kept = blocks_within_budget(peaks[top], top, slope, budget_gb, n_blocks) if math.isfinite(slope) else 0
            n_kept = _step_down(measure, peaks, n_kept, top, budget_gb)
    # Only a measured peak decides: the most blocks measured within the budget, up to the count found.
    n_kept = max((kept for kept, peak in peaks.items() if kept <= n_kept and peak <= budget_gb), default=0)
    offloaded = None
    if (not n_kept and peaks.get(0, 0.0) > budget_gb and not offload.offloaded(model)
            and offload.offload_checkpoints(model, device)):
        # Even recomputing every block is above the budget: their inputs go to host memory too.
        with probe:
            offloaded = round(measure(0), 3)
    spread = sorted(kept for kept, peak in peaks.items() if kept >= 1 and math.isfinite(peak))
    per_block = ((peaks[spread[-1]] - peaks[spread[0]]) / (spread[-1] - spread[0])) if len(spread) > 1 else None
    peak_gb = peaks[n_kept] if offloaded is None else offloaded  # offloaded: nothing kept fitted without it
    if offloaded is not None and offloaded < budget_gb and per_block:
        # Room beside the offloaded inputs: keep the blocks that fit there. The line through the kept blocks'
        # peaks less what offloading saved, each kept block also taking its own input back (its activations
        # stay on the GPU), checked by measuring as the first search is.
        saved, top = peaks[0] - offloaded, spread[-1]
        slope = per_block + saved / n_blocks
        within = {0: offloaded}
        with probe:
            at_top = peaks[top] - saved + top * saved / n_blocks
            n_kept = max(1, blocks_within_budget(at_top, top, slope, budget_gb, n_blocks))
            _step_down(measure, within, n_kept, 0, budget_gb)
        n_kept = max(kept for kept, peak in within.items() if peak <= budget_gb)
        peak_gb = within[n_kept]
    if n_kept:
        skip_checkpointing(model, n_kept)
    measured = {"peak_all_checkpointed_gb": round(peaks[0], 3) if 0 in peaks else None,
                "per_block_gb": None if per_block is None else round(per_block, 4),
                "budget_gb": round(budget_gb, 3), "kept": n_kept, "n_blocks": n_blocks,
                "peak_gb": round(peak_gb, 3)}
    if offloaded is not None:
        measured.update(offloaded=True, peak_offloaded_all_checkpointed_gb=offloaded)
    return n_kept, measured


class _Probe:
    """Steps measured for a plan leave no trace: inside ``with probe:`` the model is in training mode (checkpointing
    acts only there) and the CPU and CUDA random states are put back afterwards (training draws the dropout masks
    it would have drawn without the plan); after it, the gradients and train/eval modes are as they were, the
    memory the steps used is freed and the peak statistics are reset."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.trainable = [param for param in model.parameters() if param.requires_grad]
        self.grads = [param.grad for param in self.trainable]
        self.modes = [(module, module.training) for module in model.modules()]
        self._rng = None

    def release(self) -> None:
        import gc

        import torch

        for param in self.trainable:
            param.grad = None
        gc.collect()
        torch.cuda.empty_cache()

    def budget(self, budget_gb: float | None) -> float:
        """``budget_gb``, or when None 90% of the GPU's free memory plus what this process has allocated."""
        import torch

        self.release()
        if budget_gb is not None:
            return budget_gb
        free, _ = torch.cuda.mem_get_info(self.device)
        return 0.9 * (free + torch.cuda.memory_allocated(self.device)) / 1e9

    def __enter__(self):
        import torch

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.model.train()
        self._rng = torch.random.fork_rng(devices=[index])
        self._rng.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        try:
            self._rng.__exit__(*exc)
        finally:
            self.release()
            for module, training in self.modes:
                module.training = training
            for param, grad in zip(self.trainable, self.grads, strict=True):
                param.grad = grad
            torch.cuda.reset_peak_memory_stats(self.device)


def measure_step(model, inputs: dict, labels, device, cuda_graphs: bool = False,
                 timed: int = 0, eager_when_out_of_memory: bool = False) -> tuple[float, float | None]:
    """One step of ``inputs`` (forward and backward; as a ``GraphedStep`` with ``cuda_graphs``, eagerly when it
    cannot be captured), then ``timed`` more: the peak memory (GB) over them all and the median seconds of the
    timed steps (None without any). The peak is the allocated peak, and for a captured step at least what the run
    holds beside the graph (allocated outside its pool) plus the pool's reserved size: the pool keeps the unused
    ends of its segments to itself (``GraphedStep.pool_bytes``), and on a GPU with just the budget they count.
    Out of memory raises, as in training; a capture that runs out of memory raises too (that count does not fit
    captured), unless ``eager_when_out_of_memory``: then the step is measured eagerly, as training runs when its
    own capture fails (the planners' step with every block recomputed: the least a run needs)."""
    import gc
    import statistics
    import time

    import torch

    step = None
    try:
        torch.cuda.reset_peak_memory_stats(device)
        step = GraphedStep(model, probe=True) if cuda_graphs else None
        seconds = []
        for run in range(1 + timed):
            start = time.perf_counter()
            captured = False
            if step is not None:
                try:
                    captured = step(inputs, labels, 1.0) is not None
                except torch.cuda.OutOfMemoryError:
                    if not eager_when_out_of_memory:
                        raise
                if not captured:  # measured from here as training would run it: eagerly
                    step = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
            if not captured:
                model(**inputs, labels=labels).loss.backward()
            torch.cuda.synchronize(device)
            if run:
                seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device)
        if step is not None:
            peak = max(peak, step.held_bytes(device))
        return peak / 1e9, statistics.median(seconds) if seconds else None
    finally:
        del step  # the graph and its memory pool


# host_kept_layers: auto tries one checkpointed block in S kept in host memory for each S here, sparsest first.
HOST_KEPT_SPACINGS = (4, 3, 2)
# ... and keeps the fastest count only if it beats recomputing them all by this share of a step (timing noise).
HOST_KEPT_MIN_GAIN = 0.02
# Steps timed for each count, after the one that captures the CUDA graph (or warms up the eager step).
HOST_KEPT_TIMED_STEPS = 3


def fit_host_kept_layers(model, inputs: dict, labels, budget_gb: float | None, device, cuda_graphs: bool = False,
                         every_block_may_fit: bool = True) -> tuple[int, dict]:
    """With ``host_kept_layers: auto``: how many checkpointed blocks keep their activations in host memory.

    Whether a host-kept block pays depends on whether its copies (hundreds of MB over PCIe) fit in the
    forward passes of the blocks between two of them (docs/speed.md): on an H100 one in two paid at the
    70B shape, one in four at the 7B shape, and denser was slower. So it is timed, not predicted: steps of
    ``inputs`` with none and with one checkpointed block in S (``HOST_KEPT_SPACINGS``, sparsest first, stopping
    at the first count slower than the one before), each ``HOST_KEPT_TIMED_STEPS`` steps after a warm-up, as
    training will run them (``cuda_graphs``; a count whose pinned copies, at the bytes a block took in the
    counts before, would not fit in ``HOST_SHARE`` of the host memory available is not tried). The fastest
    count whose peak is within ``budget_gb`` and whose pinned copies fit there is kept if it is at least
    ``HOST_KEPT_MIN_GAIN`` faster than none; then ``keep_in_host_memory`` applies it, and the other planner
    (``fit_uncheckpointed_layers``) fills what is left of the budget with blocks kept on the GPU.

    When the step recomputing every block is above the budget, the recomputed blocks' inputs are offloaded to
    host memory (``offload.offload_checkpoints``, as ``fit_uncheckpointed_layers`` would) and the counts are timed
    beside that; the offloading stays only with a count kept.

    Nothing is tried when a step with every block kept on the GPU fits the budget (``every_block_may_fit``:
    the other planner may keep them all, and then no block is recomputed), or when fewer than two blocks
    are checkpointed. Leaves no trace, as ``fit_uncheckpointed_layers``.

    Returns:
        (N, measured): the count kept and, for the log, ``seconds`` and ``peak_gb`` by count tried,
        ``host_gb`` by count (pinned copies), ``budget_gb``, ``candidates`` (checkpointed blocks),
        ``every_block_peak_gb`` (inf: out of memory; absent when not measured, or when a count was kept,
        which makes that step another), and when inputs were offloaded here ``peak_not_offloaded_gb`` and
        ``offloaded`` (True if they stay so, False if undone); or ``why_none``; empty when not on CUDA or
        nothing is checkpointed.
    """
    if device.type != "cuda":
        return 0, {}
    layers = [layer for layer in recomputed_layers(model) if getattr(layer, "_gradient_checkpointing_func", None)]
    if len(layers) < 2:
        return 0, {}
    import torch

    probe = _Probe(model, device)
    budget_gb = probe.budget(budget_gb)
    room = None if (available := host_available()) is None else HOST_SHARE * available
    measured: dict = {"budget_gb": round(budget_gb, 3), "candidates": len(layers), "seconds": {}, "peak_gb": {},
                      "host_gb": {}}

    def timed(count: int) -> float | None:
        """Seconds a step with ``count`` blocks kept in host memory takes; None if it does not fit."""
        probe.release()
        if count:
            offload.keep_in_host_memory(model, device, count)
        try:
            peak, seconds = measure_step(model, inputs, labels, device, cuda_graphs, HOST_KEPT_TIMED_STEPS,
                                         eager_when_out_of_memory=not count)
            host = offload.host_kept_bytes(model) / 1e9
        except RuntimeError as error:  # out of GPU memory, or of pinned host memory for the copies
            if not count or not (isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)):
                raise
            logger.info("host_kept_layers: auto did not fit %d blocks in host memory: %s", count,
                        str(error).splitlines()[0][:200])
            return None
        finally:
            offload.bring_back(model)
        measured["seconds"][count], measured["peak_gb"][count] = round(seconds, 4), round(peak, 3)
        if count:
            measured["host_gb"][count] = round(host, 3)
        fits = peak <= budget_gb and (room is None or host * 1e9 <= room)
        return seconds if fits else None

    with probe:
        if every_block_may_fit:
            probe.release()
            skip_checkpointing(model, len(decoder_layers(model)))
            try:
                every_block = measure_step(model, inputs, labels, device, cuda_graphs)[0]
            except torch.cuda.OutOfMemoryError:
                every_block = math.inf
            finally:
                checkpoint_again(layers)
            measured["every_block_peak_gb"] = every_block  # the other planner's first step, if none is kept here
            if every_block <= budget_gb:
                measured["why_none"] = "every block fits on the GPU, so none is recomputed"
                return 0, measured
        baseline = timed(0)
        if baseline is None and not offload.offloaded(model) and offload.offload_checkpoints(model, device):
            # The other planner would offload the recomputed blocks' inputs: time the counts beside that
            # (the 70B shape on an H100: 39.41 GB offloaded; 20 of 80 host-kept beside that 1.06x, at 40.01 GB).
            measured["offloaded"] = True
            measured["peak_not_offloaded_gb"] = measured["peak_gb"].pop(0)
            measured["seconds"].pop(0)
            baseline = timed(0)
        if baseline is None:
            measured["why_none"] = "the step recomputing every checkpointed block is above the budget" + (
                ", with their inputs offloaded too" if measured.get("offloaded") else "")
            _stop_offloading(model, measured)
            return 0, measured
        best, last = (0, baseline), baseline
        for count in dict.fromkeys(n for spacing in HOST_KEPT_SPACINGS if (n := len(layers) // spacing)):
            if room is not None and measured["host_gb"] and count * max(
                    gb / kept for kept, gb in measured["host_gb"].items()) * 1e9 > room:
                break  # its pinned copies would not fit in host memory: not allocated to find out
            seconds = timed(count)
            if seconds is None or seconds >= last:
                break  # denser than a count that did not fit or did not pay: more copies in flight
            last = seconds
            best = min(best, (count, seconds), key=lambda item: item[1])
    offload.release_pinned_cache()  # the counts tried and not kept hold no host memory for the run
    count = best[0] if best[1] <= (1 - HOST_KEPT_MIN_GAIN) * baseline else 0
    if count:
        offload.keep_in_host_memory(model, device, count)
        measured.pop("every_block_peak_gb", None)  # measured without host-kept blocks: not this model's step now
    else:
        measured["why_none"] = (f"no count within the budget was {HOST_KEPT_MIN_GAIN:.0%} faster than recomputing "
                                "every block" + (" (their inputs offloaded)" if measured.get("offloaded") else ""))
        _stop_offloading(model, measured)
    measured["kept"] = count
    return count, measured


def _stop_offloading(model, measured: dict) -> None:
    """Undo the offloading ``fit_host_kept_layers`` tried (``offloaded`` in ``measured``, then False) when it keeps
    no block: the other planner offloads by its own measurements."""
    if measured.get("offloaded"):
        for layer in decoder_layers(model):
            offload.remove(layer)
        measured["offloaded"] = False

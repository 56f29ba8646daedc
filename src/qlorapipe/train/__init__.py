"""Train step: quantize-load the base, add LoRA adapters, train them, write the adapter (QLoRA).

``run`` is the recipe, read top to bottom: check the inputs, start the processes, load the
4-bit base, add the adapters (started as ``lora.init`` says: ``adapter_init``), switch on the
fast paths (``qlorapipe.train.fast``), train (``loop``) with resumable checkpoints
(``checkpoints``), publishing each step to the live metrics as it is done (``live``, through
dvclive), and write the adapter with its record, the metrics, the per-step history, the curves
and the log. With several processes (``distributed``) only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import data, memory, modeling
from qlorapipe.clock import PhaseClock
from qlorapipe.console import console
from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir, write_json, write_text_atomic
from qlorapipe.params import (
    AccelerationParams,
    DataParams,
    DistributedParams,
    LoraParams,
    QuantizationParams,
    TrainingParams,
    lora_init_distributed_problem,
    lora_init_problem,
    pissa_dropout_problem,
)
from qlorapipe.records import AdapterRecord, directory_digest, read_source_record, write_adapter_record
from qlorapipe.train import adapter_init, checkpoints, curves, distributed, fast, live, loop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sections:
    """The params sections that shape training (``data`` is recorded with the adapter)."""

    quantization: QuantizationParams
    lora: LoraParams
    training: TrainingParams
    acceleration: AccelerationParams
    distributed: DistributedParams
    data: DataParams


@dataclass(frozen=True)
class Outputs:
    """Where the train step writes."""

    adapter: Path  # the PEFT adapter directory
    metrics: Path  # final metrics (JSON)
    history: Path  # per-step CSV for dvc plots
    curves: Path  # training curves PNG
    log: Path  # plain-text training log
    checkpoints: Path  # persisted directory of resumable checkpoints
    live: Path  # dvclive's directory: every step's metrics, written while training runs


def run(sections: Sections, base_dir: Path, data_dir: Path, out: Outputs, relaunch: tuple[Path, list[str]]) -> None:
    """Train LoRA adapters on the quantized base and write ``out``.

    Args:
        sections: the params sections.
        base_dir: the base model directory (models/base).
        data_dir: the prepared datasets (data/prepared).
        out: the output paths.
        relaunch: the script and arguments that start this step again, for
            ``distributed.num_processes > 1`` (run through ``accelerate launch``).

    Raises:
        UserError: bad inputs, a diverged loss, or a failed process.
    """
    params, dist = sections.training, sections.distributed
    # The rules params.yaml's loading applies, for callers that build the sections themselves.
    for problem in (lora_init_problem(sections.lora, sections.quantization),
                    lora_init_distributed_problem(sections.lora, dist)):
        if problem:
            raise UserError(problem)
    if distributed.needs_launch(dist):
        # A checkpoint the launched processes would refuse is refused here, once, before they start (the
        # data are hashed for the fingerprint only when there is a checkpoint to compare it with).
        if checkpoints.written_any(out.checkpoints):
            fingerprint = checkpoints.run_fingerprint(base_dir, data_dir, quantization=sections.quantization,
                                                      lora=sections.lora, training=params)
            store = checkpoints.CheckpointStore(out.checkpoints, params.checkpoint_every_steps, fingerprint)
            store.refuse_other_layout(checkpoints.layout_of(dist.strategy, dist.num_processes))
        distributed.relaunch(dist, *relaunch)
        return
    # Inputs are checked before any weights are loaded.
    train_set = data.load_split(data_dir, data.TRAIN_SPLIT)
    eval_set = data.load_split(data_dir, data.EVAL_SPLIT)

    import torch

    started = time.perf_counter()
    clock = PhaseClock("train")  # where the stage's time went besides the optimizer steps (metrics' seconds)
    torch.manual_seed(params.seed)  # before the adapters are initialised
    world = distributed.start(dist, modeling.pick_device())
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log, rank 0's
    device = world.device
    memory.reset_peak(device)  # the stage's peak memory counts from here (memory.stage_peaks)
    logger.info("Device: %s", modeling.device_summary(device))
    source = read_source_record(base_dir)
    modeling.import_model_code(base_dir, source.trust_remote_code)
    clock.lap("start")  # the device, and importing peft, bitsandbytes and the model's code: not the load's
    if world.num_processes == 1:  # one process: the whole base on its GPU (with several, what each holds varies)
        budget_gb = sections.acceleration.memory_budget_gb
        memory.check_quantized_fits("train", base_dir, sections.quantization, 0, 0,
                                    memory.budget_bytes(budget_gb, device), budget_gb, source.trust_remote_code)
    model, compute_dtype = modeling.load_base_model(base_dir, sections.quantization, device,
                                                    trust_remote_code=source.trust_remote_code,
                                                    shardable_4bit=distributed.shards_weights(dist))
    clock.lap("load")
    adding = time.perf_counter()
    model = modeling.add_lora(model, sections.lora, sections.quantization.load_in != "none",
                              params.gradient_checkpointing)
    # PiSSA made the base weights a residual, which checkpoints do not hold: a resumed run must
    # recompute the same one, and the adapter is saved converted from its initial state.
    init_digest = pissa_initial = None
    if sections.lora.init == "loftq":
        adapter_init.replace_with_loftq(model, base_dir)
    elif sections.lora.init == "pissa":
        logger.info("PiSSA: the adapters start from the base's principal components, the base weights are the "
                    "residual (%.1f s)", time.perf_counter() - adding)
        if warning := pissa_dropout_problem(sections.lora):
            logger.warning(warning)
        init_digest = adapter_init.pissa_digest(model)
        pissa_initial = adapter_init.initial_adapter(model) if world.is_main else None
    clock.lap("lora")
    fast.apply(model, sections.acceleration, device, compute_dtype)  # the fast paths (three on the CPU)
    # A training set smaller than the batch makes every micro-batch hold all of it.
    graphed = fast.graphed_step(model, sections.acceleration, device, world.num_processes,
                                rows=min(params.per_device_batch_size, len(train_set)))
    _, first = next(loop.micro_batches(len(train_set), params.per_device_batch_size, params.seed))
    run_params = fast.training_params(params, sections.acceleration, device)
    optimizer_state = loop.optimizer_state_bytes(run_params.optimizer,
                                                 [param for param in model.parameters() if param.requires_grad])
    uncheckpointed = fast.plan_uncheckpointed_layers(model, sections.acceleration, train_set[first], device,
                                                     world.num_processes, cuda_graphs=graphed is not None,
                                                     eval_batch=eval_set[: params.per_device_batch_size],
                                                     optimizer_state_gb=optimizer_state / 1e9)
    host_kept = fast.host_kept(model)  # blocks whose activations wait in host memory (host_kept_layers)
    offloaded = fast.offloaded(model)  # the recomputed blocks' inputs wait there (set, or chosen by the planners)
    clock.lap("plan")
    trainable, total = modeling.parameter_counts(model)
    header = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
              f"device: {modeling.device_summary(device)}", modeling.memory_summary(device)]
    logger.info(header[0])
    logger.info(header[2])
    model = world.wrap(model)
    header.append(f"global batch: {distributed.global_batch_size(params)} chunks = {params.per_device_batch_size} "
                  f"per device x {params.gradient_accumulation_steps // world.num_processes} accumulation x "
                  f"{world.describe()}")  # describe() after wrap: FSDP reports the values this rank holds
    logger.info(header[3])
    logger.info("Training on %d chunks of %d tokens, evaluating on %d", len(train_set),
                train_set[0]["input_ids"].numel(), len(eval_set))

    fingerprint = checkpoints.run_fingerprint(base_dir, data_dir, quantization=sections.quantization,
                                              lora=sections.lora, training=params)
    store = checkpoints.CheckpointStore(out.checkpoints, params.checkpoint_every_steps, fingerprint, world,
                                        init_digest=init_digest)
    publishing = live.publisher(out.live) if world.is_main else contextlib.nullcontext()
    with _progress(world.is_main) as progress, publishing as publish:
        try:
            result = loop.train(model, train_set, eval_set,
                                run_params, device, progress,
                                checkpoints=store, processes=world, graphed=graphed,
                                async_optimizer=sections.acceleration.async_optimizer and device.type == "cuda",
                                publish=publish)
        except BaseException:
            store.settle(None)  # a checkpoint being written is finished first; a failed write is logged
            raise
    clock.lap("loop")
    if graphed is not None and graphed.failed:
        logger.warning("Trained without CUDA graphs: %s", graphed.failed)
    logger.info(modeling.memory_summary(device))
    state_dict = world.adapter_state_dict(model)  # a collective under FSDP: every rank takes part
    if not world.is_main:
        return
    waiting = time.perf_counter()
    store.wait()  # the last checkpoint, written in the background: a failed write stops the stage before any output
    result.checkpoint_seconds += time.perf_counter() - waiting

    record = AdapterRecord(base_model=source, data_sha256=directory_digest(data_dir),
                           environment=modeling.environment_record(device), data=sections.data,
                           quantization=sections.quantization, lora=sections.lora, training=params)
    with atomic_dir(out.adapter) as adapter_dir:
        sort_target_modules(world.unwrap(model))
        if pissa_initial is not None:  # a plain LoRA of rank 2r on the original base (lora.init pissa)
            adapter_init.save_pissa_as_lora(world.unwrap(model), adapter_dir, pissa_initial)
        else:
            world.save_adapter(model, adapter_dir, state_dict)
        write_adapter_record(adapter_dir, record)
    clock.lap("save")
    curves.write_history_csv(result.history, out.history)
    curves.plot_training_curves(result.history, out.curves)
    metrics = {
        "train_loss": round(result.final_train_loss, 5),
        "eval_loss": round(result.final_eval_loss, 5),
        "steps": result.steps,
        "tokens_trained": result.tokens_trained,
        "tokens_per_second": round(result.tokens_trained / result.train_seconds, 1),
        "train_seconds": round(result.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "seconds": clock.seconds,
        # Of the loop's time beside the optimizer steps (this run's, a resumed run's before it included).
        "loop_seconds": {"evaluations": round(result.eval_seconds, 2),
                         "checkpoints": round(result.checkpoint_seconds, 2)},
        "trainable_params": trainable,
        "total_params": total,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": modeling.device_summary(device),
        "num_processes": world.num_processes,
        "global_batch_size": distributed.global_batch_size(params),
        **memory.stage_peaks(device),  # a captured step's measure restarts torch's peak counters
        "best_step": result.best_step,
        "stopped_early": result.stop_reason is not None,
        "resumed_from_step": result.resumed_from_step or 0,
        "cuda_graph_replays": graphed.replays if graphed is not None else 0,
        "uncheckpointed_layers": uncheckpointed,
        "host_kept_layers": host_kept,
        "offload_checkpoints": offloaded,
        "environment": modeling.environment_record(device),
    }
    write_json(out.metrics, metrics)
    write_text_atomic(out.log, "\n".join(header + result.log_lines) + "\n")
    logger.info("Adapter written to %s; final eval loss %.4f", out.adapter, result.final_eval_loss)


def _progress(enabled: bool):
    """The rich progress bar the loop advances (rank 0, on a terminal). Elsewhere (a log file, CI) a bar shows
    only once the stage ends, so there is none (None) and the loop logs its steps instead."""
    if not (enabled and console.is_terminal):
        return contextlib.nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False, disable=not enabled)


def sort_target_modules(model) -> None:
    """Store the adapter's resolved target modules as a sorted list before it is saved.

    peft resolves "all-linear" into a set and saves it in hash order, which changes from one
    process to the next; sorted, the same adapter always has the same adapter_config.json bytes
    (and DVC does not re-run the stages downstream of an unchanged adapter).
    """
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)

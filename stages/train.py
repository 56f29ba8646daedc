"""Quantize-load the base model and train LoRA adapters on it (QLoRA).

    python stages/train.py --params params.yaml --base models/base --data data/prepared \
        --adapter models/adapter --metrics metrics/train.json \
        --history metrics/train_history.csv --curves metrics/training_curves.png \
        --log metrics/training_log.txt --checkpoints models/checkpoints

Reads the ``quantization``, ``lora``, ``training``, ``acceleration`` and ``distributed`` sections
of params.yaml. Killed midway, it resumes from the last complete checkpoint in --checkpoints when
run again with the same params, data and base model (and discards checkpoints of any other run).
With distributed.num_processes > 1 it relaunches itself through ``accelerate launch`` on that
many processes (see qlorapipe.distributed); only rank 0 writes the outputs, and all ranks write
and resume each checkpoint together (see qlorapipe.checkpoints). On CUDA in one process, each
micro-batch's forward and backward is a CUDA graph replay (acceleration.GraphedStep), and with
acceleration.uncheckpointed_layers: auto the first micro-batch measures how many blocks can keep
their activations within acceleration.memory_budget_gb.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from qlorapipe import acceleration, checkpoints, curves, data, distributed, modeling, training
from qlorapipe.adapters import sort_target_modules, write_adapter_record
from qlorapipe.console import console, run_stage
from qlorapipe.outputs import atomic_dir, write_json, write_text_atomic
from qlorapipe.params import load_section

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory to write")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-step CSV for dvc plots")
    parser.add_argument("--curves", type=Path, required=True, help="training curves PNG")
    parser.add_argument("--log", type=Path, required=True, help="plain-text training log")
    parser.add_argument("--checkpoints", type=Path, required=True, help="persisted directory of resumable checkpoints")
    args = parser.parse_args(argv)
    quant = load_section(args.params, "quantization")
    lora = load_section(args.params, "lora")
    params = load_section(args.params, "training")
    fast_paths = load_section(args.params, "acceleration")
    dist = load_section(args.params, "distributed")
    distributed.per_process_accumulation(params, dist.num_processes)  # refuse before any process starts
    if distributed.needs_launch(dist):
        distributed.relaunch(dist, Path(__file__), sys.argv[1:] if argv is None else argv)
        return
    # Inputs are checked before any weights are loaded.
    train_set = data.load_split(args.data, data.TRAIN_SPLIT)
    eval_set = data.load_split(args.data, data.EVAL_SPLIT)

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    torch.manual_seed(params.seed)  # before the adapters are initialised
    world = distributed.start(dist, modeling.pick_device())
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log, rank 0's
    device = world.device
    logger.info("Device: %s", modeling.device_summary(device))
    model, compute_dtype = modeling.load_base_model(args.base, quant, device,
                                                    shardable_4bit=distributed.shards_weights(dist))
    model = modeling.add_lora(model, lora, quant.load_in != "none", params.gradient_checkpointing)
    acceleration.apply(model, fast_paths, device, compute_dtype)  # GPU fast paths; the CPU path is unchanged
    graphed = acceleration.graphed_step(model, fast_paths, device, world.num_processes)
    _, first = next(training.micro_batches(len(train_set), params.per_device_batch_size, params.seed))
    uncheckpointed = acceleration.plan_uncheckpointed_layers(model, fast_paths, train_set[first], device,
                                                             world.num_processes, cuda_graphs=graphed is not None)
    trainable, total = modeling.parameter_counts(model)
    trainable_line = (f"trainable params: {trainable:,} || all params: {total:,} || "
                      f"trainable%: {100 * trainable / total:.4f}")
    logger.info(trainable_line)
    logger.info(modeling.memory_summary(device))
    model = world.wrap(model)
    global_batch = distributed.global_batch_size(params)
    batch_line = (f"global batch: {global_batch} chunks = {params.per_device_batch_size} per device x "
                  f"{params.gradient_accumulation_steps // world.num_processes} accumulation x {world.describe()}")
    logger.info(batch_line)
    logger.info("Training on %d chunks of %d tokens, evaluating on %d", len(train_set),
                train_set[0]["input_ids"].numel(), len(eval_set))

    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeRemainingColumn()]
    fingerprint = checkpoints.run_fingerprint(args.base, args.data, quantization=quant, lora=lora, training=params)
    store = checkpoints.CheckpointStore(args.checkpoints, params.checkpoint_every_steps, fingerprint, world)
    with Progress(*columns, console=console, transient=False, disable=not world.is_main) as progress:
        result = training.train(model, train_set, eval_set, acceleration.training_params(params, fast_paths, device),
                                device, progress, checkpoints=store, processes=world, graphed=graphed,
                                async_optimizer=fast_paths.async_optimizer and device.type == "cuda")
    if graphed is not None and graphed.failed:
        logger.warning("Trained without CUDA graphs: %s", graphed.failed)
    logger.info(modeling.memory_summary(device))
    state_dict = world.adapter_state_dict(model)  # a collective under FSDP: every rank takes part
    if not world.is_main:
        return

    with atomic_dir(args.adapter) as out:
        sort_target_modules(world.unwrap(model))
        world.save_adapter(model, out, state_dict)
        write_adapter_record(out, args.base, data_sha256=checkpoints.directory_digest(args.data),
                             environment=modeling.environment_record(device),
                             quantization=quant, lora=lora, training=params)

    metrics = {
        "train_loss": round(result.final_train_loss, 5),
        "eval_loss": round(result.final_eval_loss, 5),
        "steps": result.steps,
        "tokens_trained": result.tokens_trained,
        "tokens_per_second": round(result.tokens_trained / result.train_seconds, 1),
        "train_seconds": round(result.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "trainable_params": trainable,
        "total_params": total,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": modeling.device_summary(device),
        "num_processes": world.num_processes,
        "global_batch_size": global_batch,
        **modeling.peak_memory_metrics(device),
        "best_step": result.best_step,
        "stopped_early": result.stop_reason is not None,
        "resumed_from_step": result.resumed_from_step or 0,
        "cuda_graph_replays": graphed.replays if graphed is not None else 0,
        "uncheckpointed_layers": uncheckpointed,
        "environment": modeling.environment_record(device),
    }
    write_json(args.metrics, metrics)
    curves.write_history_csv(result.history, args.history)
    curves.plot_training_curves(result.history, args.curves)
    header = [trainable_line, f"device: {modeling.device_summary(device)}", modeling.memory_summary(device),
              batch_line]
    write_text_atomic(args.log, "\n".join(header + result.log_lines) + "\n")
    logger.info("Adapter written to %s; final eval loss %.4f", args.adapter, result.final_eval_loss)


if __name__ == "__main__":
    run_stage(main)

"""The QLoRA training loop: readable top to bottom, in the spirit of nanoGPT.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of
``per_device_batch_size`` chunks. Only LoRA parameters have gradients.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from qlorapipe.distributed import SingleProcess
from qlorapipe.errors import UserError
from qlorapipe.params import TrainingParams
from qlorapipe.perplexity import mean_token_loss

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step: int
    epoch: float
    train_loss: float
    learning_rate: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    history: list[StepRecord] = field(default_factory=list)
    steps: int = 0
    tokens_trained: int = 0
    train_seconds: float = 0.0
    final_train_loss: float = float("nan")
    final_eval_loss: float = float("nan")
    log_lines: list[str] = field(default_factory=list)


def make_optimizer(name: str, parameters, learning_rate: float, weight_decay: float):
    """The optimizer params name. Paged variants fall back to unpaged on the CPU (bitsandbytes)."""
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[name]
    return cls(parameters, lr=learning_rate, weight_decay=weight_decay)


def total_steps(params: TrainingParams, n_train: int) -> int:
    """Optimizer steps to run: max_steps if set, else epochs over the training chunks."""
    if params.max_steps > 0:
        return params.max_steps
    micro_batches = math.ceil(n_train / params.per_device_batch_size)
    return max(1, math.ceil(params.epochs * micro_batches / params.gradient_accumulation_steps))


def micro_batches(n_examples: int, batch_size: int, seed: int):
    """Endless stream of (epoch, index tensor) micro-batches; each epoch is a seeded permutation."""
    import torch

    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n_examples, generator=generator)
        for start in range(0, n_examples, batch_size):
            yield epoch, order[start : start + batch_size]
        epoch += 1


def train(model, train_set, eval_set, params: TrainingParams, device, progress=None, processes=None) -> TrainResult:
    """Train the LoRA parameters of ``model`` on ``train_set``.

    Args:
        model: a PEFT model whose trainable parameters are the adapters.
        train_set, eval_set: datasets with torch-formatted input_ids and labels.
        params: the training section.
        device: where the model lives.
        progress: a rich Progress to draw the bar on (None: no bar).
        processes: the distributed.SingleProcess / AcceleratedProcesses this rank belongs to
            (None: one process). Losses, tokens and the log then describe all ranks together.

    Returns:
        The per-step history, final losses and throughput.

    Raises:
        UserError: the loss became NaN or infinite.
    """
    from transformers import get_scheduler

    processes = processes or SingleProcess(device)
    n_steps = total_steps(params, len(train_set))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params.optimizer, trainable, params.learning_rate, params.weight_decay)
    scheduler = get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps, num_training_steps=n_steps
    )
    batches = processes.shard(micro_batches(len(train_set), params.per_device_batch_size, params.seed))
    # Each rank accumulates its share of the step's micro-batches (distributed.per_process_accumulation).
    accumulation = params.gradient_accumulation_steps // processes.num_processes
    batches_per_epoch = math.ceil(len(train_set) / params.per_device_batch_size)
    result = TrainResult()
    task = progress.add_task("training", total=n_steps, status="") if progress else None
    model.train()
    started = time.perf_counter()
    for step in range(1, n_steps + 1):
        step_loss, step_tokens = 0.0, 0
        for micro in range(accumulation):
            _, index = next(batches)
            batch = train_set[index]
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device).long()
            with processes.no_sync(model, last=micro == accumulation - 1):
                loss = model(input_ids=input_ids, labels=labels).loss
                processes.backward(loss / accumulation)
            step_loss += loss.item() / accumulation
            step_tokens += input_ids.numel()
        step_loss, step_tokens = processes.mean(step_loss), processes.sum(step_tokens)
        if not math.isfinite(step_loss):
            raise UserError(
                f"the training loss became {step_loss} at step {step}: lower training.learning_rate, "
                "or use quantization.compute_dtype bfloat16/float32 if float16 overflowed"
            )
        if params.max_grad_norm > 0:
            processes.clip_grad_norm_(trainable, params.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.tokens_trained += step_tokens

        record = StepRecord(step=step, epoch=round(step * params.gradient_accumulation_steps / batches_per_epoch, 4),
                            train_loss=step_loss, learning_rate=learning_rate)
        if step % params.eval_every_steps == 0 or step == n_steps:
            eval_started = time.perf_counter()
            record.eval_loss, _ = mean_token_loss(
                model, eval_set, params.per_device_batch_size, device, params.max_eval_batches
            )
            started += time.perf_counter() - eval_started  # throughput counts training time only
        result.history.append(record)
        elapsed = time.perf_counter() - started
        tokens_per_second = result.tokens_trained / elapsed if elapsed > 0 else 0.0
        line = (f"step {step}/{n_steps} loss {step_loss:.4f} lr {learning_rate:.3e} "
                f"tokens/s {tokens_per_second:.0f}")
        if record.eval_loss is not None:
            line += f" eval_loss {record.eval_loss:.4f}"
        result.log_lines.append(line)
        if progress:
            progress.update(task, advance=1, status=f"loss {step_loss:.3f} lr {learning_rate:.2e} "
                                                    f"{tokens_per_second:,.0f} tok/s")
        else:
            logger.info(line)
    result.steps = n_steps
    result.train_seconds = time.perf_counter() - started
    window = [r.train_loss for r in result.history[-max(1, min(10, n_steps // 4)) :]]
    result.final_train_loss = sum(window) / len(window)
    result.final_eval_loss = result.history[-1].eval_loss
    return result


"""The QLoRA training loop: readable top to bottom, in the spirit of nanoGPT.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of
``per_device_batch_size`` chunks. Only LoRA parameters have gradients.

The loop can stop anywhere and continue from its last checkpoint (see checkpoints.py) to the
same adapter: everything a step draws from (trainable weights, optimizer, scheduler, RNGs,
position in the data) is restored. It evaluates every ``eval_every_steps``, stops early when
the eval loss has not improved for ``early_stopping_patience`` evaluations, and can end on the
adapter with the best eval loss instead of the last one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from qlorapipe.data import IGNORE_INDEX, model_inputs
from qlorapipe.errors import UserError
from qlorapipe.params import TrainingParams
from qlorapipe.perplexity import mean_token_loss
from qlorapipe.train.checkpoints import CheckpointStore, load_trainable_state, restore_rng_states, trainable_state
from qlorapipe.train.distributed import SingleProcess

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
    eval_seconds: float = 0.0  # of the loop's time beside the optimizer steps: evaluations
    checkpoint_seconds: float = 0.0  # and checkpoints
    final_train_loss: float = float("nan")
    final_eval_loss: float = float("nan")
    log_lines: list[str] = field(default_factory=list)
    best_step: int | None = None  # the step with the lowest eval loss
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stop_reason: str | None = None  # why training ended before its last step
    resumed_from_step: int | None = None

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> TrainResult:
        values = dict(state)
        values["history"] = [StepRecord(**record) for record in state["history"]]
        return cls(**values)


def make_optimizer(name: str, parameters, learning_rate: float, weight_decay: float, sync_each_parameter: bool = True):
    """The optimizer params name. Paged variants fall back to unpaged on the CPU (bitsandbytes).

    Args:
        sync_each_parameter: False steps a bitsandbytes optimizer without the
            ``torch.cuda.synchronize()`` it issues after every parameter's update
            (``acceleration.async_optimizer``): the same update, but the host queues the
            updates while the GPU still runs the backward pass instead of waiting for it.
    """
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[name]
    # torch.optim wraps a class's step when it makes the first instance: compare what is wrapped.
    if not sync_each_parameter and inspect.unwrap(cls.step) is inspect.unwrap(bnb.optim.optimizer.Optimizer8bit.step):
        cls = _without_parameter_syncs(cls)
    return cls(parameters, lr=learning_rate, weight_decay=weight_decay)


# bitsandbytes keeps 8-bit states for parameters of this many elements or more, 32-bit ones below (its default
# min_8bit_size), with one float32 absmax per block of this many elements for each 8-bit state; a paged optimizer
# pages a state buffer only for parameters of BNB_MIN_PAGED_SIZE elements or more (its get_state_buffer).
BNB_MIN_8BIT_SIZE, BNB_BLOCK, BNB_MIN_PAGED_SIZE = 4096, 256, 100_000


def optimizer_state_bytes(name: str, parameters) -> int:
    """Bytes of GPU memory the optimizer ``name`` (as ``make_optimizer`` makes it) holds for ``parameters`` once it
    has stepped: two states per parameter (AdamW's moments), laid out as the optimizer does. bitsandbytes' 8-bit
    states are a byte an element plus a float32 absmax per block of 256, parameters under 4,096 elements keep
    float32 states; its paged variants put a state buffer in memory that pages out to the host only for
    parameters of 100,000 elements or more (LoRA matrices of r=16 are mostly below), the absmax never. torch's
    AdamW keeps its moments in the parameter's own dtype."""
    paged = name.startswith("paged_")
    total = 0
    for param in parameters:
        n = param.numel()
        if name == "adamw_torch":
            total += 2 * n * param.element_size()
            continue
        on_device = not (paged and n >= BNB_MIN_PAGED_SIZE)
        if name.endswith("adamw_8bit") and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * -(-n // BNB_BLOCK) + (2 * n if on_device else 0)
        else:  # 32-bit bitsandbytes states
            total += 2 * 4 * n if on_device else 0
    return total


@functools.cache  # one subclass per optimizer class, however many optimizers are made
def _without_parameter_syncs(cls):
    """A subclass of the bitsandbytes optimizer ``cls`` whose step does not synchronize per parameter."""
    import torch

    @torch.no_grad()
    def step(self, closure=None):
        # bitsandbytes 0.50's Optimizer8bit.step, less its sync_gpu(p) after each parameter;
        # paged optimizers still synchronize once at the end, as there.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if len(self.state[param]) == 0:
                    self.init_state(group, param, gindex, pindex)
                self.prefetch_state(param)
                self.update_step(group, param, gindex, pindex)
                last = param
        if self.is_paged and last is not None and last.is_cuda:
            torch.cuda.synchronize(last.device)
        return loss

    return type(cls.__name__, (cls,), {"step": step, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} without a GPU sync per parameter."})


def total_steps(params: TrainingParams, n_train: int) -> int:
    """Optimizer steps to run: max_steps if set, else epochs over the training chunks."""
    if params.max_steps > 0:
        return params.max_steps
    micro_batches = math.ceil(n_train / params.per_device_batch_size)
    return max(1, math.ceil(params.epochs * micro_batches / params.gradient_accumulation_steps))


def micro_batches(n_examples: int, batch_size: int, seed: int, start: int = 0):
    """Endless stream of (epoch, index tensor) micro-batches; each epoch is a seeded permutation.

    Args:
        start: micro-batches already consumed (a resumed run continues where it stopped).
    """
    import torch

    per_epoch = math.ceil(n_examples / batch_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n_examples, generator=generator)
        for begin in range(skip * batch_size, n_examples, batch_size):
            yield epoch, order[begin : begin + batch_size]
        skip = 0
        epoch += 1


def token_weights(step_labels: Sequence, processes) -> list[float]:
    """Each micro-batch's weight in its optimizer step: its share of the step's predicted tokens (over every
    process), so that the step's loss and gradient are the mean over all its tokens, as one large batch's.

    A micro-batch's loss is the mean over its own predicted tokens (labels shifted by one, ``IGNORE_INDEX`` left
    out); weighting each equally (1 / accumulation) would count an answer of 5 tokens as much as one of 400
    (transformers' Trainer weights by tokens too, ``num_items_in_batch``). Gradients averaged over ``W``
    processes are multiplied back by ``W``. A step with no predicted token at all keeps equal weights.
    """
    counts = [int((labels[:, 1:] != IGNORE_INDEX).sum()) for labels in step_labels]
    total = processes.sum(sum(counts))
    if total == 0:
        return [1 / len(counts)] * len(counts)
    return [count * processes.num_processes / total for count in counts]


def divergence_message(loss: float, step: int, logits_dtype, params: TrainingParams, checkpoint,
                       grad_norm: float = math.nan) -> str:
    """Say at which step the loss (or, the loss finite, the gradients' norm) stopped being finite, the likely
    cause, and what is kept."""
    import torch

    if logits_dtype == torch.float16:
        cause = "float16 overflow (set quantization.compute_dtype to bfloat16 or float32)"
    else:
        cause = (f"a learning rate too high (training.learning_rate={params.learning_rate}: lower it, "
                 f"or add warmup or a lower training.max_grad_norm)")
    kept = (f"the last good checkpoint {checkpoint} is kept" if checkpoint
            else "no checkpoint was written before it (training.checkpoint_every_steps)")
    what = (f"the training loss became {loss}" if not math.isfinite(loss)
            else f"the gradients' norm became {grad_norm} (loss {loss:.4f})")
    return f"{what} at step {step}; likely cause: {cause}; {kept}"


def _restore(checkpoint, model, optimizer, scheduler) -> tuple[TrainResult, dict | None]:
    """Put the model, optimizer, scheduler and RNGs back as they were when ``checkpoint`` was written."""
    load_trainable_state(model, checkpoint.adapter())
    optimizer.load_state_dict(checkpoint.optimizer_state())
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    result = TrainResult.from_state(checkpoint.state["result"])
    result.resumed_from_step = checkpoint.step
    restore_rng_states(checkpoint.rng_states())  # last: nothing may draw after this
    return result, checkpoint.best_adapter()


# Without a progress bar (a log file, CI) a step's line is logged when it evaluated, when it is the last, and
# otherwise at most this often (the first step's always); the training log file holds every step's.
LOG_EVERY_SECONDS = 10.0


def train(model, train_set, eval_set, params: TrainingParams, device, progress=None,
          checkpoints: CheckpointStore | None = None, processes=None, graphed=None,
          async_optimizer: bool = False, publish: Callable[[Sequence[StepRecord]], None] | None = None) -> TrainResult:
    """Train the LoRA parameters of ``model`` on ``train_set``, resuming from a checkpoint if there is one.

    Args:
        model: a PEFT model whose trainable parameters are the adapters.
        train_set, eval_set: ``data.Split`` rows (input_ids, labels and position_ids tensors).
        params: the training section.
        device: where the model lives.
        progress: a rich Progress to draw the bar on (None: no bar; steps are logged, ``LOG_EVERY_SECONDS``).
        checkpoints: where to resume from and write checkpoints (None: neither).
        processes: the distributed.SingleProcess / AcceleratedProcesses this rank belongs to
            (None: one process). Losses, tokens and the log then describe all ranks together.
        graphed: a fast.cuda_graphs.GraphedStep that runs a micro-batch's forward and backward as
            one CUDA graph (None, or a micro-batch it declines: the eager forward and backward).
        async_optimizer: step a bitsandbytes optimizer without a GPU sync per parameter
            (``make_optimizer``'s ``sync_each_parameter=False``).
        publish: called with each step's record as soon as the step is done, and first with
            the restored steps when resuming (``live.publisher``; None: nothing published).

    Returns:
        The per-step history, final losses and throughput. ``model`` holds the adapter to
        keep: the best by eval loss when ``params.keep_best_adapter``, else the last.

    Raises:
        UserError: the loss became NaN or infinite.
    """
    from transformers import get_scheduler

    processes = processes or SingleProcess(device)
    # Saved and restored tensors are named as in the PEFT model, whatever wraps it (DDP adds "module.").
    inner = processes.unwrap(model)
    n_steps = total_steps(params, len(train_set))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params.optimizer, trainable, params.learning_rate, params.weight_decay,
                               sync_each_parameter=not async_optimizer)
    scheduler = get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=params.warmup_steps, num_training_steps=n_steps
    )
    result, best = TrainResult(), None
    latest = checkpoints.latest() if checkpoints else None
    last_checkpoint = latest.path if latest else None
    if latest:
        result, best = _restore(latest, inner, optimizer, scheduler)
        logger.info("Resuming from %s: %d of %d steps done", latest.path, latest.step, n_steps)
    if publish:
        publish(result.history)  # a resumed run's live metrics start with the steps already done
    # The data position counts the whole run's micro-batches, before they are split across ranks.
    batches = processes.shard(micro_batches(len(train_set), params.per_device_batch_size, params.seed,
                                            start=result.steps * params.gradient_accumulation_steps))
    # Each rank accumulates its share of the step's micro-batches (distributed.per_process_accumulation).
    accumulation = params.gradient_accumulation_steps // processes.num_processes
    batches_per_epoch = math.ceil(len(train_set) / params.per_device_batch_size)
    task = progress.add_task("training", total=n_steps, completed=result.steps, status="") if progress else None
    logged = -math.inf  # when a step's line was last logged (without a bar)
    model.train()
    seconds_before = result.train_seconds
    started = time.perf_counter()
    remaining = range(result.steps + 1, n_steps + 1) if result.stop_reason is None else range(0)
    for step in remaining:
        step_batches = [train_set[next(batches)[1]] for _ in range(accumulation)]
        weights = token_weights([b["labels"] for b in step_batches], processes)
        step_loss, step_tokens = 0.0, 0
        for micro, (batch, weight) in enumerate(zip(step_batches, weights)):
            inputs = model_inputs(batch, device)
            labels = batch["labels"].to(device).long()
            loss = graphed(inputs, labels, weight) if graphed is not None else None
            if loss is None:  # eager: the plain forward and backward
                with processes.no_sync(model, last=micro == accumulation - 1):
                    loss = model(**inputs, labels=labels).loss
                    processes.backward(loss * weight)
            step_loss += loss.item() * weight
            step_tokens += inputs["input_ids"].numel()
        step_loss, step_tokens = processes.mean(step_loss), processes.sum(step_tokens)
        # A finite loss can still give infinite gradients (a float16 backward overflowing): the norm is
        # checked too (max_grad_norm 0 scales by 1), so that no optimizer step turns the adapter into NaN.
        grad_norm = (float(processes.clip_grad_norm_(trainable, params.max_grad_norm or math.inf))
                     if math.isfinite(step_loss) else math.nan)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            # Nothing of this step is applied or saved: the last checkpoint stays the last good one.
            last_checkpoint = checkpoints.settle(last_checkpoint) if checkpoints else last_checkpoint
            raise UserError(divergence_message(step_loss, step, _compute_dtype(inner), params, last_checkpoint,
                                               grad_norm))
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=graphed is None)  # a graph accumulates into fixed tensors
        result.tokens_trained += step_tokens

        record = StepRecord(step=step, epoch=round(step * params.gradient_accumulation_steps / batches_per_epoch, 4),
                            train_loss=step_loss, learning_rate=learning_rate)
        paused = time.perf_counter()  # throughput counts training time only, not eval or checkpoints
        if step % params.eval_every_steps == 0 or step == n_steps:
            record.eval_loss, _ = mean_token_loss(
                model, eval_set, params.per_device_batch_size, device, params.max_eval_batches
            )
            best = _track_best(result, record, inner, params, best)
            result.eval_seconds += time.perf_counter() - paused
        result.history.append(record)
        result.steps = step
        result.train_seconds = seconds_before + (paused - started)
        tokens_per_second = result.tokens_trained / result.train_seconds if result.train_seconds > 0 else 0.0
        line = (f"step {step}/{n_steps} loss {step_loss:.4f} lr {learning_rate:.3e} "
                f"tokens/s {tokens_per_second:.0f}")
        if record.eval_loss is not None:
            line += f" eval_loss {record.eval_loss:.4f}"
        result.log_lines.append(line)
        if publish:
            publish([record])
        if progress:
            progress.update(task, advance=1, status=f"loss {step_loss:.3f} lr {learning_rate:.2e} "
                                                    f"{tokens_per_second:,.0f} tok/s")
        elif step == n_steps or record.eval_loss is not None or time.perf_counter() - logged >= LOG_EVERY_SECONDS:
            logger.info(line)
            logged = time.perf_counter()
        if checkpoints and checkpoints.due(step, last=step == n_steps or result.stop_reason is not None):
            saving = time.perf_counter()
            state = {"scheduler": scheduler.state_dict(), "result": result.to_state()}
            last_checkpoint = checkpoints.save(step, inner, optimizer, state, best)
            result.checkpoint_seconds += time.perf_counter() - saving
        started += time.perf_counter() - paused
        if result.stop_reason:
            logger.info("Stopping early at step %d: %s", step, result.stop_reason)
            result.log_lines.append(f"stopped early at step {step}: {result.stop_reason}")
            break
    if params.keep_best_adapter and best is not None and result.best_step != result.steps:
        load_trainable_state(inner, best)
        logger.info("Keeping the adapter of step %d (eval loss %.4f), not the last one", result.best_step,
                    result.best_eval_loss)
    window = [r.train_loss for r in result.history[-max(1, min(10, len(result.history) // 4)) :]]
    result.final_train_loss = sum(window) / len(window)
    kept_best = params.keep_best_adapter and result.best_eval_loss is not None
    result.final_eval_loss = result.best_eval_loss if kept_best else result.history[-1].eval_loss
    return result


def _compute_dtype(model):
    """The dtype the model computes in: its quantized layers' compute dtype, else its output head's."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None:
            return dtype
    return model.get_output_embeddings().weight.dtype


def _track_best(result: TrainResult, record: StepRecord, model, params: TrainingParams, best):
    """Update the best eval loss, the early-stopping count and the best adapter after an evaluation."""
    if result.best_eval_loss is None:
        improved = math.isfinite(record.eval_loss)
    else:
        improved = record.eval_loss < result.best_eval_loss - params.early_stopping_min_delta
    if improved:
        result.best_eval_loss, result.best_step = record.eval_loss, record.step
        result.evals_without_improvement = 0
        return trainable_state(model) if params.keep_best_adapter else None
    result.evals_without_improvement += 1
    patience = params.early_stopping_patience
    if patience > 0 and result.evals_without_improvement >= patience:
        best_so_far = ("no finite eval loss yet" if result.best_eval_loss is None
                       else f"best {result.best_eval_loss:.4f} at step {result.best_step}")
        result.stop_reason = f"eval loss did not improve for {patience} evaluations ({best_so_far})"
    return best

"""Training past one device: data-parallel (DDP) and sharded (FSDP) QLoRA through accelerate.

One process is the default and trains exactly as it always did. With
``distributed.num_processes`` > 1 the train stage relaunches itself through
``accelerate launch`` (torch.distributed underneath: NCCL on GPUs, gloo on the CPU), so
``dvc exp run -S distributed.num_processes=2`` needs no other command. Every rank then

- reads the same seeded order of micro-batches and takes every N-th one (its shard), so the
  N ranks together consume exactly the micro-batches one process would have, step by step;
- accumulates ``training.gradient_accumulation_steps / N`` micro-batches, so the global batch
  (per-device batch x accumulation x processes) stays what params.yaml says whatever N is,
  and runs with different process counts stay comparable;
- averages its gradients with the others (DDP prepared by accelerate, or torch FSDP) before the step;
- leaves every file to rank 0, except its own shard of an FSDP checkpoint (checkpoints.py);
- resumes from the run's last checkpoint with the others: the data position counts global
  micro-batches, so each rank's shard of the stream continues where it stopped.

FSDP shards the frozen 4-bit base across ranks; it can only flatten the Params4bit weights
together with the rest when they are stored in a float dtype (``bnb_4bit_quant_storage``,
bitsandbytes PR #970, peft#2505): modeling.load_base_model(shardable_4bit=True) stores them
as float32, the dtype of the LoRA weights.
accelerate launches the ranks and provides DDP; the FSDP wrapper is torch's own (fsdp_wrap),
because accelerate enables FSDP only on GPU-type backends and the same code must run in CPU tests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qlorapipe.console import REPORTS_ENV
from qlorapipe.errors import UserError
from qlorapipe.launcher import FIRST_FAILURE
from qlorapipe.params import DistributedParams, TrainingParams, accumulation_problem

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The number of processes of the torch.distributed launch this process belongs to (1: none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_launch(params: DistributedParams) -> bool:
    """Whether the stage must relaunch itself on ``params.num_processes`` processes."""
    return params.num_processes > 1 and launched_world_size() == 1


def per_process_accumulation(training: TrainingParams, num_processes: int) -> int:
    """Micro-batches each process accumulates per optimizer step, keeping the global batch.

    The rule that they divide is params.accumulation_problem, applied when params.yaml loads.

    Raises:
        UserError: the accumulation steps do not divide among the processes (the same message).
    """
    problem = accumulation_problem(training, num_processes)
    if problem:
        raise UserError(problem)
    return training.gradient_accumulation_steps // num_processes


def global_batch_size(training: TrainingParams) -> int:
    """Chunks per optimizer step over all processes: per-device batch x accumulation x processes."""
    return training.per_device_batch_size * training.gradient_accumulation_steps


def launch_command(params: DistributedParams, script: Path, argv: list[str], port: int) -> list[str]:
    """The ``accelerate launch`` command line that runs ``script argv`` on every process.

    It runs through qlorapipe.launcher, accelerate's launch with the agent's failure report
    left out. The strategy is not a launcher flag: each rank reads it from params.yaml and builds
    its own Accelerator, so a launch written by hand (multi-node) gets the same behaviour.
    """
    return [
        sys.executable, "-m", "qlorapipe.launcher",
        "--multi_gpu",  # torch.distributed.run underneath; on a machine without GPUs it runs gloo on the CPU
        "--num_processes", str(params.num_processes),
        "--num_machines", "1",
        "--mixed_precision", "no",  # the compute dtype is quantization.compute_dtype's business
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
        str(script), *argv,
    ]


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous of a single-machine launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch(params: DistributedParams, script: Path, argv: list[str]) -> None:
    """Run ``script argv`` on ``params.num_processes`` processes and wait for all of them.

    Raises:
        UserError: a process failed: the error the ranks reported, said once (failure_message).
    """
    port = params.main_process_port or free_port()
    cmd = launch_command(params, script, argv, port)
    logger.info("Launching %d processes (%s): %s", params.num_processes, params.strategy, " ".join(cmd[2:]))
    with tempfile.TemporaryDirectory(prefix="qlorapipe-ranks-") as reports:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), REPORTS_ENV: reports}
        status = subprocess.run(cmd, env=env).returncode
        if status:
            raise UserError(failure_message(params.num_processes, status, Path(reports)))


def failure_message(num_processes: int, status: int, reports: Path) -> str:
    """One line for a failed launch, from the reports the ranks and the launcher left in ``reports``.

    Ranks that stopped on the same error (bad data, say) said it once: the message is that error.
    Different errors are each said with their ranks. A rank that crashed printed its own traceback;
    the line then says which rank failed first and how (killed by a signal, an exit status).
    """
    by_message: dict[str, list[str]] = {}
    for report in sorted(reports.glob("rank-*.txt"), key=lambda p: int(p.stem.removeprefix("rank-"))):
        by_message.setdefault(report.read_text(encoding="utf-8"), []).append(report.stem.removeprefix("rank-"))
    if len(by_message) == 1:
        return next(iter(by_message))
    if by_message:
        return "; ".join(f"rank{'s' * (len(ranks) > 1)} {' and '.join(ranks)}: {message}"
                         for message, ranks in by_message.items())
    first = reports / FIRST_FAILURE
    how = first.read_text(encoding="utf-8") if first.exists() else f"the launcher exited with status {status}"
    return f"the {num_processes} training processes failed: {how}; any message of its own is above"


def shard(micro_batches: Iterator, rank: int, num_processes: int) -> Iterator:
    """Rank ``rank``'s share of the one seeded micro-batch stream every rank generates.

    Rank r takes micro-batches r, r+N, r+2N, ...: the N ranks of one optimizer step together
    read exactly the chunks one process would have read in that step, whatever N is.
    """
    return itertools.islice(micro_batches, rank, None, num_processes)


class SingleProcess:
    """One process on one device: every collective is the identity. The default."""

    num_processes = 1
    rank = 0
    is_main = True
    shards_state = False  # whether each rank holds only a shard of the trainable state (FSDP)

    def __init__(self, device):
        self.device = device

    def wrap(self, model):
        """The model as the loop should call it (here: unchanged)."""
        return model

    def describe(self) -> str:
        """How the work is shared, for the log."""
        return "1 process"

    def unwrap(self, model):
        """The PEFT model inside whatever ``wrap`` returned."""
        return model

    def adapter_state_dict(self, model) -> dict | None:
        """The full adapter weights, gathered by every rank together (None: the model's own will do)."""
        return None

    def save_adapter(self, model, out: Path, state_dict: dict | None) -> None:
        """Write the PEFT adapter directory (rank 0 only), from ``adapter_state_dict``'s weights."""
        model.save_pretrained(out, safe_serialization=True)

    def shard(self, micro_batches: Iterator) -> Iterator:
        """This process's share of the global micro-batch stream."""
        return micro_batches

    def backward(self, loss) -> None:
        loss.backward()

    def no_sync(self, model, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters, max_norm: float):
        import torch

        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all processes."""
        return value

    def sum(self, value: int) -> int:
        """The sum of ``value`` over all processes."""
        return value

    def all_true(self, value: bool) -> bool:
        """Whether ``value`` holds on every process."""
        return value

    def barrier(self) -> None:
        """Wait until every process gets here."""


class AcceleratedProcesses(SingleProcess):
    """One of several processes, synchronised through an accelerate Accelerator (DDP or FSDP)."""

    def __init__(self, params: DistributedParams):
        import torch
        from accelerate import Accelerator

        self.params = params
        die_with_launcher()
        # cpu=True is how accelerate picks gloo ranks on a machine without GPUs (MULTI_CPU).
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.num_processes = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.shards_state = params.strategy == "fsdp"
        if self.num_processes != params.num_processes:
            raise UserError(
                f"this launch has {self.num_processes} processes but distributed.num_processes is "
                f"{params.num_processes}: set it to {self.num_processes} so the params describe the run"
            )

    def wrap(self, model):
        self.values_total = sum(p.numel() for p in model.parameters())
        if self.params.strategy == "fsdp":
            self.model = fsdp_wrap(model, self.device)
        else:
            self.model = self.accelerator.prepare_model(model)  # DistributedDataParallel
        self.values_held = sum(p.numel() for p in self.model.parameters())  # FSDP: this rank's shard
        return self.model

    def describe(self) -> str:
        return (f"{self.num_processes} processes ({self.params.strategy}, parameters held by rank 0: "
                f"{self.values_held:,} of {self.values_total:,} values)")

    def unwrap(self, model):
        return model.module if self.params.strategy == "fsdp" else self.accelerator.unwrap_model(model)

    def adapter_state_dict(self, model) -> dict | None:
        if self.params.strategy != "fsdp":
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Each rank holds a shard of every parameter: gather the full adapter tensors (a
        # collective, so every rank calls it), named as PeftModel.save_pretrained names them.
        adapter = {}
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    name = name.replace("_fsdp_wrapped_module.", "").replace(".default.", ".")
                    adapter[name] = param.detach().cpu().clone().contiguous()
        return adapter

    def save_adapter(self, model, out: Path, state_dict: dict | None) -> None:
        if state_dict is None:
            return super().save_adapter(self.unwrap(model), out, state_dict)
        from safetensors.torch import save_file

        # peft finds adapter weights by walking the modules, which FSDP renamed: let it write the
        # config and model card from no weights, then write the gathered weights in its format.
        self.unwrap(model).save_pretrained(out, safe_serialization=True, state_dict={})
        save_file(state_dict, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})

    def shard(self, micro_batches: Iterator) -> Iterator:
        return shard(micro_batches, self.rank, self.num_processes)

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model, last: bool):
        # Under FSDP, no_sync would keep whole unsharded gradients on every rank until the last
        # micro-batch; reduce-scattering each one keeps the memory FSDP is chosen for.
        if self.params.strategy == "fsdp" or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def clip_grad_norm_(self, parameters, max_norm: float):
        if self.params.strategy == "fsdp":
            # Each rank holds a shard of every gradient: FSDP computes the norm over all of them.
            return self.model.clip_grad_norm_(max_norm)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)  # DDP: gradients already averaged

    def mean(self, value: float) -> float:
        import torch

        tensor = torch.tensor([float(value)], device=self.device)
        return float(self.accelerator.reduce(tensor, reduction="mean")[0])

    def sum(self, value: int) -> int:
        import torch

        tensor = torch.tensor([int(value)], device=self.device)
        return int(self.accelerator.reduce(tensor, reduction="sum")[0])

    def all_true(self, value: bool) -> bool:
        return self.sum(int(bool(value))) == self.num_processes

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def die_with_launcher() -> None:
    """Make this rank exit when the launcher that started it dies, however it died (Linux).

    torch.distributed.run starts each rank in a session of its own, so a rank outlives a
    launcher killed with SIGKILL and would go on training and writing checkpoints unseen.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def start(params: DistributedParams, device):
    """The process group this stage runs in: one process, or a rank of an accelerate launch."""
    if launched_world_size() == 1:
        return SingleProcess(device)
    return AcceleratedProcesses(params)


def shards_weights(params: DistributedParams) -> bool:
    """Whether the base weights are sharded across processes (FSDP): the 4-bit storage must then be shardable."""
    return params.strategy == "fsdp" and params.num_processes > 1


def fsdp_wrap(model, device):
    """Shard ``model`` over the ranks with torch FSDP, one unit per decoder layer (peft's FSDP QLoRA recipe).

    accelerate turns its own FSDP on only for GPU-type backends (accelerate 1.15, state.py),
    so the wrapper is built here with torch's FullyShardedDataParallel, the same class
    accelerate would use: the same code then runs on GPUs (NCCL) and, for tests, on the CPU
    (gloo). ``use_orig_params`` lets frozen 4-bit weights and trainable LoRA weights share a
    flat parameter.
    """
    import functools

    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from qlorapipe.modeling import training_numerics_at_inference

    uniform_float_dtype(model)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place into a CPU layout at its
    # first no-grad eval forward. Under FSDP that rewrites a view of the flat parameter while the shared
    # quant state says "repacked": every step after the first evaluation then computed with garbled
    # weights (measured on two gloo ranks). load_base_model keeps the plain layout; so does a model loaded
    # otherwise.
    training_numerics_at_inference(model)
    layer_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    if not layers:
        raise UserError(f"distributed.strategy fsdp: {type(model.get_base_model()).__name__} names no decoder "
                        "layer class to shard by (_no_split_modules); use distributed.strategy ddp")
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        device_id=device if device.type == "cuda" else torch.device("cpu"),
        sync_module_states=False,  # every rank loaded the same weights from disk
        limit_all_gathers=True,
    )


def uniform_float_dtype(model) -> None:
    """Cast every floating parameter to one dtype: FSDP flattens a layer's parameters into one tensor.

    prepare_model_for_kbit_training upcasts norms and LoRA weights to float32 and the 4-bit
    weights are stored as float32 (quant_storage, ``modeling.load_base_model``), so everything
    takes that dtype; keep_frozen_dtype's bfloat16 norms and embeddings go back to float32 here.
    """
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    storage = {getattr(p, "quant_storage", None) for p in model.parameters()} - {None}
    target = next(iter(storage)) if storage else (torch.float32 if torch.float32 in dtypes else next(iter(dtypes)))
    for param in model.parameters():
        if param.dtype.is_floating_point and param.dtype != target and not hasattr(param, "quant_state"):
            param.data = param.data.to(target)

"""Training checkpoints that survive kill -9 and power loss, and are never resumed by mistake.

DVC 3 has no checkpoint feature, so the train stage keeps its own in a persisted output
directory. A checkpoint is one directory ``step-NNNNNN`` holding everything the loop needs to
continue as if it had never stopped:

- ``adapter.safetensors``: every trainable tensor (LoRA A/B, DoRA magnitudes, biases,
  modules_to_save), by parameter name; ``best_adapter.safetensors`` the same at the best
  eval loss so far, when keeping the best adapter;
- ``optimizer.safetensors`` + ``optimizer.json`` and ``rng.safetensors`` + ``rng.json``:
  optimizer and RNG states (python, numpy, torch CPU, CUDA), tensors in safetensors and the
  structure around them in JSON, so nothing is unpickled on resume;
- ``state.json``: step, data position, scheduler state, history, best eval loss, the
  fingerprint of the params and data that made it, and (lora.init pissa) the digest of the
  residual base weights it trained on, which a resumed run must recompute to the bit.

With several processes (qlorapipe.train.distributed) a checkpoint is still one directory, written by
all ranks together into one temporary directory that rank 0 completes with ``state.json`` and
renames once every rank's part is on disk. Under DDP every rank holds the same adapter and
optimizer state, so rank 0 writes the single-process files and ranks N > 0 add only their RNG
states in ``rank-N/``; any process count (one included) can resume it. Under FSDP each rank
holds only its shard and writes all its tensors into ``rank-N/``; only the same number of FSDP
processes can resume it, and any other run is refused with the setting that would resume it.

It is written into a temporary sibling directory, flushed to disk, and renamed into place,
so a directory named ``step-*`` is always complete; leftovers of an interrupted write are
deleted. A checkpoint whose fingerprint differs from the run's (other params, data or base)
is discarded with a log message, never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir
from qlorapipe.records import directory_digest, read_source_record
from qlorapipe.train.distributed import SingleProcess
from qlorapipe.train.tensor_tree import load_tree, save_tree, split_tree, write_tree

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
ADAPTER_FILE = "adapter.safetensors"
BEST_ADAPTER_FILE = "best_adapter.safetensors"
FORMAT_VERSION = 1
_PREFIX = "step-"


def fingerprint(**parts: Any) -> str:
    """A sha256 of JSON-serialisable parts (params sections, data and base digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def run_fingerprint(base_dir: Path, data_dir: Path, **sections: Any) -> str:
    """What a checkpoint must share with a run to be resumed: base weights, data and params.

    Args:
        base_dir: the base model directory (its recorded weights sha256, else its files).
        data_dir: the prepared dataset directory (its files).
        sections: the params sections (frozen dataclasses) that shape training.
    """
    values = {name: dataclasses.asdict(section) for name, section in sections.items()}
    # How often checkpoints are written does not change what is trained.
    values.get("training", {}).pop("checkpoint_every_steps", None)
    base = read_source_record(base_dir).content_sha256
    return fingerprint(base=base, data=directory_digest(data_dir), **values)


def rng_states() -> dict:
    """Every random number generator the training step draws from."""
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Put back the generators saved by :func:`rng_states` (CUDA only where there is a GPU)."""
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_state(model) -> dict:
    """Copies of every trainable tensor, by parameter name (the adapter as it trains)."""
    from qlorapipe.train.tensor_tree import host_copy

    return {name: host_copy(p) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict) -> None:
    """Copy tensors saved by :func:`trainable_state` back into ``model``'s trainable parameters."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(tensors[name].to(param.device, param.dtype))


# ---- the store -----------------------------------------------------------------------------


def layout(processes) -> dict:
    """How a run holds its trainable state: whole on every rank, or sharded over ``num_processes`` (FSDP)."""
    return _layout(processes.shards_state, processes.num_processes)


def layout_of(strategy: str, num_processes: int) -> dict:
    """``layout`` of the processes ``distributed.strategy`` and ``num_processes`` launch."""
    return _layout(strategy == "fsdp" and num_processes > 1, num_processes)


def _layout(sharded: bool, num_processes: int) -> dict:
    return {"sharded": sharded, "num_processes": num_processes if sharded else 1}


def written_any(directory: Path) -> bool:
    """Whether ``directory`` holds any checkpoint, complete or not (nothing to resume or refuse without one)."""
    return any(Path(directory).glob(f"{_PREFIX}*"))


def describe_layout(value: dict) -> str:
    if value["sharded"]:
        return f"sharded over {value['num_processes']} FSDP processes"
    return "whole (one process or DDP)"


@dataclass
class Checkpoint:
    """A complete checkpoint read back from disk; ``files`` holds this rank's tensors."""

    path: Path
    step: int
    state: dict
    files: Path | None = None
    rng_files: Path | None = None  # this rank's RNG states (DDP: each rank's own GPU generators)

    def __post_init__(self):
        self.files = self.files or self.path
        self.rng_files = self.rng_files or self.files

    def adapter(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.files / ADAPTER_FILE))

    def best_adapter(self) -> dict | None:
        from safetensors.torch import load_file

        path = self.files / BEST_ADAPTER_FILE
        return load_file(str(path)) if path.is_file() else None

    def optimizer_state(self) -> dict:
        return load_tree(self.files, "optimizer")

    def rng_states(self) -> dict:
        return load_tree(self.rng_files, "rng")


def _rank_dir(rank: int) -> str:
    return f"rank-{rank}"


class CheckpointStore:
    """The checkpoint directory of one training run, identified by its fingerprint.

    Args:
        directory: the persisted output directory (``models/checkpoints``).
        every_steps: write a checkpoint every this many optimizer steps (0: never).
        run_fingerprint: :func:`fingerprint` of everything that determines the result.
        processes: the distributed.SingleProcess / AcceleratedProcesses of this rank (None:
            one process). With several, every method is called by every rank together.
        init_digest: a digest of frozen weights the run computed before training and a checkpoint
            does not hold (lora.init pissa's residual base, ``adapter_init.pissa_digest``), or None.
            A checkpoint made from other such weights is refused, not resumed.
    """

    def __init__(self, directory: Path, every_steps: int, run_fingerprint: str, processes=None,
                 init_digest: str | None = None):
        self.directory = Path(directory)
        self.every_steps = every_steps
        self.fingerprint = run_fingerprint
        self.processes = processes or SingleProcess(None)
        self.layout = layout(self.processes)
        self.init_digest = init_digest
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._pending_path: Path | None = None

    def due(self, step: int, last: bool) -> bool:
        """Whether to write a checkpoint after ``step`` (always after the last step, when enabled).

        Raises:
            UserError: the checkpoint written in the background before failed (see ``wait``): said at the
                step after it failed, not a whole interval later.
        """
        if self._pending is not None and self._pending.done() and self._pending.exception() is not None:
            self.wait()
        return self.every_steps > 0 and (last or step % self.every_steps == 0)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint of this run; others are deleted, each with a log line.

        Creates the directory when it is missing (it is a declared output even when empty).
        With several processes rank 0 cleans up first and the others read what it left.

        Raises:
            UserError: the newest checkpoint of this run was written by another process layout
                (FSDP shards) than this run's, or from other initial weights (``init_digest``);
                that checkpoint is kept.
        """
        self.wait()  # this store's own checkpoint being written, if any, first
        processes = self.processes
        if not processes.is_main:
            processes.barrier()  # rank 0 has deleted what is not to be resumed
            found = self._find(clean=False)
        else:
            try:
                found = self._find(clean=True)
            finally:
                processes.barrier()
        if found is None:
            return None
        self._refuse_other_layout(found, self.layout)
        made_from = found.state.get("init_sha256")
        if made_from != self.init_digest:
            raise UserError(
                f"{found.path} was trained from a PiSSA residual base (sha256 {str(made_from)[:12]}) that this run "
                f"did not recompute (sha256 {str(self.init_digest)[:12]}: another device or library version gives "
                f"another SVD); resume it where it was made, or delete {self.directory} to start over"
            )
        own = found.path / _rank_dir(processes.rank)
        if self.layout["sharded"]:  # as written: another layout was refused above
            found.files = own
        found.rng_files = own if (own / "rng.json").is_file() else found.files
        return found

    def refuse_other_layout(self, launching: dict) -> None:
        """Before processes are launched: refuse, in one line, a newest checkpoint of this run that the
        layout ``launching`` (``layout_of``) could not resume; nothing is deleted.

        Raises:
            UserError: as ``latest`` would raise in every launched process.
        """
        found = self._find(clean=False)
        if found is not None:
            self._refuse_other_layout(found, launching)

    def _refuse_other_layout(self, found: Checkpoint, wanted: dict) -> None:
        written = found.state.get("layout", {"sharded": False, "num_processes": 1})
        if written != wanted:
            raise UserError(
                f"{found.path} holds the training state {describe_layout(written)}, this run needs it "
                f"{describe_layout(wanted)}: to resume it set distributed.strategy to "
                f"{'fsdp' if written['sharded'] else 'ddp'}"
                + (f" and distributed.num_processes to {written['num_processes']}" if written["sharded"] else "")
                + f", or delete {self.directory} to start over"
            )

    def _find(self, clean: bool) -> Checkpoint | None:
        """The newest usable checkpoint; with ``clean``, delete every other one and interrupted writes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if clean:
            for leftover in self.directory.glob(f".{_PREFIX}*.tmp-*"):
                logger.info("Deleting %s: a checkpoint write that was interrupted", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        found = None
        # Newest first; (length, name) orders step-1000000 after step-999999.
        for path in sorted(self.directory.glob(f"{_PREFIX}*"), key=lambda p: (len(p.name), p.name), reverse=True):
            reason = self._unusable(path)
            if reason is None and found is None:
                state = json.loads((path / STATE_FILE).read_text())
                found = Checkpoint(path, state["step"], state)
            elif clean:
                if reason is not None:
                    logger.warning("Discarding checkpoint %s: %s", path, reason)
                shutil.rmtree(path, ignore_errors=True)
        return found

    def _unusable(self, path: Path) -> str | None:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            return "incomplete (no readable state.json)"
        if state.get("format") != FORMAT_VERSION:
            return f"written by checkpoint format {state.get('format')}, this code reads {FORMAT_VERSION}"
        if state.get("fingerprint") != self.fingerprint:
            return ("made with different params, data or base model "
                    f"(fingerprint {str(state.get('fingerprint'))[:12]}, this run {self.fingerprint[:12]})")
        return None

    def save(self, step: int, model, optimizer, state: dict, best: dict | None) -> Path:
        """Write a checkpoint atomically, then delete the older ones.

        With one process the tensors are copied to host memory now and written in the background
        (files, fsync, rename) while training goes on; the next ``save`` or ``wait`` waits for it. With
        several, every rank writes its part before this returns.

        Args:
            step: optimizer steps completed.
            model: the model whose trainable parameters are saved.
            optimizer: its optimizer (state saved through :func:`save_tree`).
            state: JSON-serialisable loop state (data position, scheduler, history, ...).
            best: trainable tensors at the best eval loss so far, or None.

        Returns:
            The checkpoint directory.
        """
        path = self.directory / f"{_PREFIX}{step:06d}"
        record = {**state, "step": step, "format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "layout": self.layout, "init_sha256": self.init_digest}
        if self.processes.num_processes > 1:
            self._save_together(path, model, optimizer, record, best)
        else:
            self.wait()  # one snapshot in host memory at a time
            snapshot, text = _snapshot(model, optimizer, best), _state_text(record)  # both taken now
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
            self._pending, self._pending_path = self._writer.submit(self._write, path, snapshot, text), path
        return path

    def wait(self) -> None:
        """Return once the checkpoint being written in the background is on disk.

        Raises:
            UserError: naming what stopped it (an OSError: its temporary directory is gone, the checkpoint
                before it kept).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except OSError as error:
            raise UserError(f"checkpoint {self._pending_path} could not be written ({error}): free disk space or "
                            f"point --checkpoints elsewhere (the checkpoint before it is kept)") from error

    def settle(self, last: Path | None) -> Path | None:
        """The newest checkpoint on disk once the one being written is done, for a run that stops: ``last`` (the
        last one saved), or, when that write failed (logged, not raised), the newest complete one before it."""
        writing = self._pending_path
        try:
            self.wait()
        except UserError as error:
            logger.warning("Checkpoint %s was not written: %s", writing, error.__cause__)
            written = sorted(p for p in self.directory.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file())
            return written[-1] if written else None
        return last

    def _write(self, path: Path, snapshot: _Snapshot, state_text: str) -> None:
        with atomic_dir(path) as tmp:
            _write_snapshot(tmp, snapshot)
            _write_state(tmp, state_text)
        self._delete_older(path)

    def _save_together(self, path: Path, model, optimizer, record: dict, best: dict | None) -> None:
        """Every rank writes its part into one temporary directory that rank 0 completes and renames.

        Sharded (FSDP): each rank's tensors go to ``rank-N/``. Whole (DDP): rank 0 writes the
        single-process files, the other ranks only their RNG states (each GPU has its own).
        """
        processes = self.processes
        tmp = self.directory / f".{path.name}.tmp-ranks"
        if processes.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        processes.barrier()
        ok = True
        try:
            if processes.is_main and not self.layout["sharded"]:
                _write_tensors(tmp, model, optimizer, best)
            else:
                own = tmp / _rank_dir(processes.rank)
                own.mkdir()
                if self.layout["sharded"]:
                    _write_tensors(own, model, optimizer, best)
                else:
                    save_tree(own, "rng", rng_states())
                    _fsync_tree(own)
        except OSError:
            logger.exception("rank %d could not write its part of checkpoint %s", processes.rank, path)
            ok = False
        if not processes.all_true(ok):  # a collective: every rank has finished writing
            raise UserError(f"a training process could not write its part of {path} (see the messages above): "
                            "free disk space or point --checkpoints elsewhere")
        if processes.is_main:
            _write_state(tmp, _state_text(record))
            os.replace(tmp, path)
            self._delete_older(path)
        processes.barrier()

    def _delete_older(self, path: Path) -> None:
        _fsync_dir(self.directory)
        for older in self.directory.glob(f"{_PREFIX}*"):
            if older != path:
                shutil.rmtree(older, ignore_errors=True)


@dataclass(frozen=True)
class _Snapshot:
    """A checkpoint's tensors in host memory of their own: what training changes next cannot reach them."""

    adapter: dict
    best: dict | None  # host copies already (``trainable_state``), replaced, never changed, by the loop
    optimizer: tuple  # split_tree's (structure, tensors)
    rng: tuple


def _snapshot(model, optimizer, best: dict | None) -> _Snapshot:
    return _Snapshot(trainable_state(model), best, split_tree("optimizer", optimizer.state_dict()),
                     split_tree("rng", rng_states()))


def _write_snapshot(directory: Path, snapshot: _Snapshot) -> None:
    from safetensors.torch import save_file

    save_file(snapshot.adapter, str(directory / ADAPTER_FILE))
    if snapshot.best is not None:
        save_file(snapshot.best, str(directory / BEST_ADAPTER_FILE))
    write_tree(directory, "optimizer", *snapshot.optimizer)
    write_tree(directory, "rng", *snapshot.rng)
    _fsync_tree(directory)  # a rename can reach the disk before the data it names


def _write_tensors(directory: Path, model, optimizer, best: dict | None) -> None:
    _write_snapshot(directory, _snapshot(model, optimizer, best))


def _state_text(record: dict) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def _write_state(directory: Path, state_text: str) -> None:
    (directory / STATE_FILE).write_text(state_text)
    _fsync_tree(directory)


def _fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_dir():
            continue  # a rank's shard, synced by that rank
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Checkpointed blocks' inputs kept in host memory (``acceleration.offload_checkpoints``).

A checkpointed block keeps only its input (the residual stream, batch x seq x hidden) for
its backward pass, where it runs the block again. With every block checkpointed those
inputs are what grows with the number of blocks: Llama-2-7B at 2 x 2,048 tokens keeps 32 x
34 MB. Offloaded, each input is copied to pinned host memory on a copy stream while the
next block computes, and copied back one block ahead of the backward pass that needs it,
so the GPU holds one or two of them at a time.

It works through autograd's saved-tensor hooks around each checkpointed block: torch's
(non-reentrant) checkpoint saves the block's inputs as saved tensors outside its own hooks,
so ``pack`` sees exactly those. The host buffers are allocated once per block and shape and
reused, and every copy is ordered by CUDA events, so a step runs the same way eagerly and as
a CUDA graph (``cuda_graphs``): the graph records the copies and the waits.
"""

from __future__ import annotations

import functools

from qlorapipe.train.fast.checkpointing import decoder_layers

# Saved tensors smaller than this stay on the GPU (rotary tables, masks): copying them costs more than it saves.
MIN_BYTES = 1 << 20


class _Saved:
    """One block's input: its host copy, and the GPU tensor until the copy is known to be done."""

    __slots__ = ("arrived", "block", "copied", "fetched", "host", "on_gpu")

    def __init__(self, block: int, host, on_gpu, copied):
        self.block, self.host, self.on_gpu, self.copied = block, host, on_gpu, copied
        self.fetched = self.arrived = None


class CheckpointOffload:
    """Saved-tensor hooks that move checkpointed blocks' inputs to host memory and back."""

    def __init__(self, device):
        self.device = device
        self._stream = None
        self.buffers: dict = {}  # (block, shape, dtype): pinned host tensor, reused every step
        self.pending: list[_Saved] = []  # this forward pass's inputs, in block order

    @property
    def stream(self):
        """The copy stream (made at the first copy: a model without checkpointed blocks needs none)."""
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def hooks(self, block: int):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, block), self.unpack)

    def pack(self, block: int, tensor):
        import torch

        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_BYTES:
            return tensor
        if self.pending and self.pending[-1].block >= block:
            self.pending = []  # a new forward pass
        compute = torch.cuda.current_stream(self.device)
        for saved in self.pending:  # the earlier copies are done once the compute stream has waited for them
            if saved.on_gpu is not None:
                compute.wait_event(saved.copied)
                saved.on_gpu = None
        key = (block, tuple(tensor.shape), tensor.dtype)
        host = self.buffers.get(key)
        if host is None:
            host = self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        saved = _Saved(block, host, tensor, copied)
        self.pending.append(saved)
        return saved

    def unpack(self, saved):
        import torch

        if not isinstance(saved, _Saved):
            return saved
        compute = torch.cuda.current_stream(self.device)
        if saved.on_gpu is not None:  # the last block's input: still on the GPU
            compute.wait_event(saved.copied)
            tensor, saved.on_gpu = saved.on_gpu, None
        elif saved.fetched is not None:
            compute.wait_event(saved.arrived)
            tensor, saved.fetched = saved.fetched, None
        else:
            tensor = saved.host.to(self.device, non_blocking=True)
        self._fetch_before(saved, compute)
        return tensor

    def _fetch_before(self, saved: _Saved, compute) -> None:
        """Start copying the previous block's input back while this block runs its backward pass."""
        import torch

        earlier = [s for s in self.pending if s.block < saved.block]
        if not earlier:
            return
        previous = earlier[-1]
        if previous.on_gpu is not None or previous.fetched is not None:
            return
        previous.fetched = torch.empty(previous.host.shape, dtype=previous.host.dtype, device=self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            previous.fetched.copy_(previous.host, non_blocking=True)
            previous.arrived = torch.cuda.Event()
            previous.arrived.record(self.stream)


def offload_checkpoints(model, device) -> bool:
    """Offload the inputs of the model's checkpointed blocks to host memory (CUDA only).

    Blocks that keep their activations (``uncheckpointed_layers``) are left alone: their
    activations are saved inside the block, not as checkpoint inputs. Undone by ``remove``.

    Returns:
        True when any block was changed.
    """
    return device.type == "cuda" and wrap_checkpoints(model, CheckpointOffload(device))


def wrap_checkpoints(model, offload) -> bool:
    """Run each block's checkpoint function under ``offload.hooks(block)`` (saved-tensor hooks)."""
    changed = False
    for block, layer in enumerate(decoder_layers(model)):
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if checkpoint is None or "_qlorapipe_checkpoint" in vars(layer):
            continue
        layer._qlorapipe_checkpoint = checkpoint
        layer._gradient_checkpointing_func = functools.partial(_offloaded, checkpoint, offload, block)
        changed = True
    return changed


def offloaded(model) -> bool:
    """Whether ``offload_checkpoints`` (or ``wrap_checkpoints``) changed any of the model's blocks."""
    return any("_qlorapipe_checkpoint" in vars(layer) for layer in decoder_layers(model))


def _offloaded(checkpoint, offload: CheckpointOffload, block: int, *args, **kwargs):
    with offload.hooks(block):
        return checkpoint(*args, **kwargs)


def remove(module) -> None:
    """Undo ``offload_checkpoints`` on one module."""
    checkpoint = vars(module).pop("_qlorapipe_checkpoint", None)
    if checkpoint is not None:
        module._gradient_checkpointing_func = checkpoint

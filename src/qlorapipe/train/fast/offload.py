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

from qlorapipe.train.fast.checkpointing import decoder_layers, recomputed_layers

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
        if checkpoint is None or "_qlorapipe_checkpoint" in vars(layer) or "_qlorapipe_host_kept" in vars(layer):
            continue  # a host-kept block is not recomputed: its input goes to the host with its other tensors
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
    """Undo ``offload_checkpoints`` and ``keep_in_host_memory`` on one module."""
    _let_go_of_host(module)
    checkpoint = vars(module).pop("_qlorapipe_checkpoint", None)
    if checkpoint is not None:
        module._gradient_checkpointing_func = checkpoint


class _Kept:
    """One tensor a host-kept block saved: its host copy, and where it is on the GPU meanwhile."""

    __slots__ = ("block", "fetched", "host", "on_gpu", "uses")

    def __init__(self, block: int, host, on_gpu):
        self.block, self.host, self.on_gpu, self.uses = block, host, on_gpu, 1
        self.fetched = None


class HostKept:
    """Saved-tensor hooks that keep whole blocks' activations in host memory (``host_kept_layers``).

    A block run under ``hooks(block)`` is not recomputed: every tensor its autograd nodes save
    (1 MB or more, parameters and views of them aside) is copied to pinned host memory on a copy stream as it is
    saved, and the GPU copy is let go once the next host-kept block starts (so one block's copies at
    most are in flight) or ``RELEASE_AFTER`` blocks later. In the backward pass the block's tensors are copied back when
    the gradient reaches the block ``FETCH_AHEAD`` blocks above it (a hook on that block's output),
    while those blocks run their backward passes. A tensor several nodes save (the normed input
    of q, k and v) travels once. Each copy is ordered by CUDA events as in ``CheckpointOffload``,
    so a CUDA graph records them.
    """

    FETCH_AHEAD = 2  # blocks of backward pass that a fetch overlaps
    RELEASE_AFTER = 3  # blocks of forward pass after which a block's copies are waited for, if no host-kept one came

    def __init__(self, device, blocks, weights=()):
        self.device, self.blocks = device, sorted(blocks)
        self.weights = {weight.untyped_storage().data_ptr() for weight in weights}  # never copied, nor views of them
        self._stream = None
        self.buffers: dict = {}  # (block, index, shape, stride, dtype): pinned host tensor, reused every step
        self.saved: dict[int, list[_Kept]] = {}  # this forward pass's tensors, by block
        self.arrived: dict[int, object] = {}  # block: the event its fetch records
        self._keys: dict = {}  # the block being saved: its tensors by storage, offset, shape, stride

    stream = CheckpointOffload.stream

    def hooks(self, block: int):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, block), self.unpack)

    def pack(self, block: int, tensor):
        import torch

        if (tensor.device.type != self.device.type or 0 in tensor.stride()
                or tensor.numel() * tensor.element_size() < MIN_BYTES or isinstance(tensor, torch.nn.Parameter)):
            return tensor
        storage = tensor.untyped_storage().data_ptr()
        if storage in self.weights:
            return tensor
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        kept = self._keys.get(key)
        if kept is not None:
            kept.uses += 1
            return kept
        index = len(self.saved[block])
        buffer_key = (block, index, *key[2:])
        host = self.buffers.get(buffer_key)
        if host is None:
            host = self.buffers[buffer_key] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                                  pin_memory=True)
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
        kept = self._keys[key] = _Kept(block, host, tensor)
        self.saved[block].append(kept)
        return kept

    def begin(self, block: int) -> None:
        """``block``'s forward pass starts: a new step's if it ran before; let go of the earlier blocks'."""
        if any(b >= block for b in self.saved):
            self.saved, self.arrived = {}, {}
        self._release_before(block)
        self.saved[block], self._keys = [], {}

    def reached(self, block: int, module=None, args=None) -> None:
        """A forward pre-hook on every block: let go of host-kept blocks ``RELEASE_AFTER`` or more below."""
        if self.saved and block not in self.saved and max(self.saved) < block:
            self._release_before(block - self.RELEASE_AFTER + 1)

    def _release_before(self, block: int) -> None:
        """Let go of the GPU copies of the blocks saved before ``block``: once the compute stream
        has waited for their host copies to finish."""
        import torch

        earlier = [kept for b, saved in self.saved.items() if b < block for kept in saved if kept.on_gpu is not None]
        if not earlier:
            return
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for kept in earlier:
            kept.on_gpu = None

    def unpack(self, kept):
        import torch

        if not isinstance(kept, _Kept):
            return kept
        compute = torch.cuda.current_stream(self.device)
        if kept.on_gpu is not None:  # never let go (the last host-kept block): its copy may still read it
            tensor = kept.on_gpu
        else:
            if kept.block not in self.arrived:
                self.fetch(kept.block)  # not fetched ahead (the first blocks of a model): now, and wait for it
            compute.wait_event(self.arrived[kept.block])
            tensor = kept.fetched
        kept.uses -= 1
        if not kept.uses:
            if kept.on_gpu is not None:
                compute.wait_stream(self.stream)  # its copy to the host done before its memory can be reused
            kept.on_gpu = kept.fetched = None
        return tensor

    def fetch(self, block: int) -> None:
        """Start copying ``block``'s saved tensors back to the GPU (those it let go)."""
        import torch

        if block in self.arrived or block not in self.saved:
            return
        away = [kept for kept in self.saved[block] if kept.on_gpu is None and kept.fetched is None and kept.uses]
        compute = torch.cuda.current_stream(self.device)
        for kept in away:  # allocated in the compute stream's order, written once it has got there
            kept.fetched = torch.empty_strided(kept.host.shape, kept.host.stride(), dtype=kept.host.dtype,
                                               device=self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for kept in away:
                kept.fetched.copy_(kept.host, non_blocking=True)
            arrived = self.arrived[block] = torch.cuda.Event()
            arrived.record(self.stream)

    def fetch_hook(self, block: int, module, args, output):
        """A forward hook on the block ``FETCH_AHEAD`` above ``block``: once the gradient reaches that
        block's output, fetch ``block``'s tensors."""
        import torch

        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self.fetch(block))


def host_kept_blocks(n_blocks: int, count: int) -> list[int]:
    """Which of ``n_blocks`` blocks keep their activations in host memory: ``count`` of them, evenly
    spread from the first, so that each one's copies overlap the blocks after it."""
    count = min(count, n_blocks)
    return sorted({i * n_blocks // count for i in range(count)}) if count else []


def keep_in_host_memory(model, device, count: int) -> bool:
    """Let ``count`` checkpointed blocks keep their activations in host memory instead of running
    again in the backward pass (``acceleration.host_kept_layers``; ``apply`` does it on CUDA only, where
    the copies run on a side stream into pinned memory). Blocks that keep their activations on the
    GPU (``uncheckpointed_layers``) are not among them. Undone by ``remove``.

    Returns:
        True when any block was changed.
    """
    if count <= 0:
        return False
    layers = decoder_layers(model)
    recomputed = {id(layer) for layer in recomputed_layers(model)}
    candidates = [i for i, layer in enumerate(layers)
                  if id(layer) in recomputed and getattr(layer, "_gradient_checkpointing_func", None)]
    if not candidates:
        return False
    chosen = [candidates[i] for i in host_kept_blocks(len(candidates), count)]
    kept = HostKept(device, chosen, weights=model.parameters())
    for block, layer in enumerate(layers):
        layer._qlorapipe_reached = layer.register_forward_pre_hook(functools.partial(kept.reached, block))
    for block in chosen:
        layer = layers[block]
        layer._qlorapipe_host_kept = (layer._gradient_checkpointing_func,
                                      layers[min(block + HostKept.FETCH_AHEAD, len(layers) - 1)]
                                      .register_forward_hook(functools.partial(kept.fetch_hook, block)))
        layer._gradient_checkpointing_func = functools.partial(_host_kept, kept, block)
    return True


def host_kept(model) -> int:
    """How many blocks keep their activations in host memory: changed by ``keep_in_host_memory`` and still
    checkpointed (a block that keeps them on the GPU never calls the function that sends them away)."""
    return sum("_qlorapipe_host_kept" in vars(layer) and getattr(layer, "gradient_checkpointing", False)
               for layer in decoder_layers(model))


def host_kept_bytes(model) -> int:
    """Bytes of pinned host memory the host-kept blocks' copies take (after a step has run): each buffer
    as torch's caching host allocator reserves it, rounded up to a power of two."""
    kept = {id(keeper): keeper for layer in decoder_layers(model) if "_qlorapipe_host_kept" in vars(layer)
            for keeper in layer._gradient_checkpointing_func.args[:1]}
    sizes = [host.untyped_storage().nbytes() for keeper in kept.values() for host in keeper.buffers.values()]
    return sum(1 << max(size - 1, 0).bit_length() for size in sizes)


def release_pinned_cache() -> None:
    """Give the pinned host memory torch's caching host allocator holds unused back to the system (CUDA
    builds of torch that have the call; elsewhere nothing)."""
    import torch

    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available():
        empty()


def bring_back(model) -> None:
    """Undo ``keep_in_host_memory`` only: the blocks are recomputed again (offloaded inputs stay offloaded)."""
    for layer in decoder_layers(model):
        _let_go_of_host(layer)


def _let_go_of_host(module) -> None:
    """Undo ``keep_in_host_memory`` on one module: its pre-hook, and its checkpoint function and fetch hook."""
    reached = vars(module).pop("_qlorapipe_reached", None)
    if reached is not None:
        reached.remove()
    host_kept = vars(module).pop("_qlorapipe_host_kept", None)
    if host_kept is not None:
        module._gradient_checkpointing_func, fetch_hook = host_kept
        fetch_hook.remove()


def _host_kept(kept: HostKept, block: int, function, *args, **kwargs):
    """In place of a block's checkpoint function: run the block once, its saved tensors sent to the host."""
    kept.begin(block)
    with kept.hooks(block):
        return function(*args, **kwargs)

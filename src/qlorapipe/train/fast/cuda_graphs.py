"""A micro-batch's forward and backward as one CUDA graph (``acceleration.cuda_graphs``)."""

from __future__ import annotations

import contextlib
import functools
import logging

from qlorapipe import memory
from qlorapipe.params import AccelerationParams

logger = logging.getLogger(__name__)


def packed_causal_mask(position_ids):
    """The (batch, 1, seq, seq) boolean mask of packed rows: causal, and only within a document.

    A document starts wherever the position does not continue the previous one by 1, as
    transformers decides for packed rows it is given ``position_ids`` for
    (masking_utils.find_packed_sequence_indices). True means "may attend".
    """
    import torch

    steps = position_ids[:, 1:] - position_ids[:, :-1]
    starts = torch.nn.functional.pad(steps != 1, (1, 0), value=False)
    document = starts.cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


class GraphedStep:
    """Forward and backward of one micro-batch, captured once as a CUDA graph and then replayed.

    The step is host-bound on a GPU: Python, peft, bitsandbytes and autograd issue about
    10,000 small kernels per step, and the GPU waits for them (docs/benchmarks.md). A CUDA
    graph records those kernels once and replays them with one launch, so the host no
    longer paces the GPU. What the graph computes is the eager step's function: the same
    kernels on the same weights; the trainable weights, their gradients (accumulated in
    place, so the optimizer must zero them without freeing them) and the inputs stay at
    fixed addresses. Packed rows get their block-diagonal mask as an input (transformers
    decides whether rows are packed with a host-side check, which a graph cannot contain).

    One graph, for the shape of the first micro-batch of ``rows`` rows (any, when None): other
    shapes (a short last batch) run eagerly. Given ``rows``, a run resumed at an epoch's short
    last micro-batch graphs the same micro-batches as the uninterrupted run, not that one and
    then none. If capturing fails, a warning says why and every step runs eagerly. A ``probe`` (a step the
    memory planner measures) says nothing, and a capture that ran out of memory raises that error: the step
    does not fit, captured or not.
    """

    WARMUP_RUNS = 2  # eager runs on a side stream first, as torch.cuda.graphs documents

    def __init__(self, model, rows: int | None = None, probe: bool = False):
        self.model = model
        self.rows = rows
        self.probe = probe
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.graph = None
        self.static: dict = {}
        self.loss = None
        self.key = None
        self.failed: str | None = None
        self.replays = 0
        self.arena = None  # the graph that holds the pool's first segment (``arena``), for as long as ``graph``

    def __call__(self, inputs: dict, labels, scale: float):
        """Run forward and ``(loss * scale).backward()``; return the loss, or None to run eagerly."""
        key = (tuple(inputs["input_ids"].shape), "position_ids" in inputs)
        if self.failed or (self.key is not None and key != self.key) or self.rows not in (None, key[0][0]):
            return None
        if self.graph is None:
            self.key = key
            if not self._capture(inputs, labels, scale):
                return None
        self._load(inputs, labels, scale)
        self.graph.replay()
        self.replays += 1
        return self.loss

    def pool_bytes(self) -> tuple[int, int]:
        """The captured graph's private memory pool: the bytes it reserved and the bytes allocated in it now (0, 0
        before a capture). The pool keeps all it reserved until the graph goes, the unused part of its segments
        included: nothing else can allocate there, so a run holds the pool's reserved size beside what is
        allocated outside it (``arena`` keeps that unused part small)."""
        import torch

        if self.graph is None:
            return 0, 0
        pool = tuple(self.graph.pool())
        segments = [segment for segment in torch.cuda.memory_snapshot() if tuple(segment["segment_pool_id"]) == pool]
        return sum(s["total_size"] for s in segments), sum(s["allocated_size"] for s in segments)

    def held_bytes(self, device=None) -> int:
        """What the run holds with this graph captured: the bytes allocated outside its pool and the pool's reserved
        bytes whole (``pool_bytes``); the memory planner's measure of a captured step."""
        import torch

        reserved, allocated = self.pool_bytes()
        return torch.cuda.memory_allocated(device) - allocated + reserved

    def _load(self, inputs: dict, labels, scale: float) -> None:
        self.static["input_ids"].copy_(inputs["input_ids"])
        self.static["labels"].copy_(labels)
        self.static["scale"].fill_(scale)
        if "position_ids" in inputs:
            self.static["position_ids"].copy_(inputs["position_ids"])
            self.static["attention_mask"].copy_(packed_causal_mask(inputs["position_ids"]))

    def _run(self):
        static = self.static
        kwargs = {name: static[name] for name in ("input_ids", "position_ids", "attention_mask") if name in static}
        loss = self.model(**kwargs, labels=static["labels"], use_cache=False).loss
        (loss * static["scale"]).backward()
        return loss

    def _capture(self, inputs: dict, labels, scale: float) -> bool:
        import torch

        self.static = {"input_ids": inputs["input_ids"].clone(), "labels": labels.clone(),
                       "scale": torch.full((), scale, dtype=torch.float32, device=labels.device)}
        if "position_ids" in inputs:
            self.static["position_ids"] = inputs["position_ids"].clone()
            self.static["attention_mask"] = packed_causal_mask(inputs["position_ids"])
        # The warm-up runs really accumulate gradients: put back what the step had so far
        # (usually nothing: the first micro-batch of a step).
        kept = [None if param.grad is None else param.grad.clone() for param in self.trainable]
        for param in self.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        # A capture that fails part-way leaves the CUDA generator in capture mode, and every
        # later random draw (dropout) would fail: its state is put back from this copy.
        generator = torch.cuda.default_generators[labels.device.index or 0]
        generator_state = generator.clone_state()
        # The warm-up runs draw dropout masks too. The first replay must draw what this micro-batch
        # would have drawn without them: a run resumed from a checkpoint captures at another step,
        # and its steps must be the uninterrupted run's, bit for bit.
        position = generator.get_state()
        try:
            side = _warmup_stream(labels.device.index or 0)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for run in range(self.WARMUP_RUNS):
                    if run == self.WARMUP_RUNS - 1:  # the last warm-up's own peak: what the step holds at once
                        # (the training step's keeps the stage's peak so far; the planner's probes are its own)
                        (torch.cuda.reset_peak_memory_stats if self.probe else memory.restart_peak)(labels.device)
                        before = torch.cuda.memory_allocated(labels.device)
                    self._run()
            held = torch.cuda.max_memory_allocated(labels.device) - before
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's activations: the graph gets its own pool
            pool, seed = arena(held, side) if held >= ARENA_MIN_BYTES else (None, None)
            graph = torch.cuda.CUDAGraph()
            with (torch.cuda.graph(graph, pool=pool, stream=side),  # the warm-up's cuBLAS workspace, not one more
                  unpacked_rows_while_capturing(packed="position_ids" in self.static)):
                loss = self._run()
            self.loss = loss.detach()  # the kernels are in the graph; the autograd objects can go
            generator.set_state(position)  # seed and offset, in the state the graph replays from
            self.graph, self.arena = graph, seed
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            graph = seed = None  # a failed capture's pool goes now, not with the traceback that holds this frame
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            if not self.probe:
                logger.warning("CUDA graphs off (acceleration.cuda_graphs), training eagerly: capturing the step "
                               "failed with %s", self.failed)
            torch.cuda.synchronize()
            generator.graphsafe_set_state(generator_state)
            if self.probe and isinstance(error, torch.cuda.OutOfMemoryError):
                raise
        with torch.no_grad():
            for param, grad in zip(self.trainable, kept, strict=True):
                param.grad.zero_() if grad is None else param.grad.copy_(grad)
        return self.graph is not None


# Below this, a step is captured into a fresh pool: the allocator gives a request under 10 MB a segment of 20 MiB
# and rounds larger ones to 2 MiB, so an arena of a few MB saves nothing.
ARENA_MIN_BYTES = 2**26


def arena(nbytes: int, stream):
    """A graph memory pool that already holds one free segment of ``nbytes`` (rounded up to 2 MiB), for a step
    to be captured into on ``stream``; and the graph that put it there, which must live as long as the step's.

    Captured into a fresh pool, a step's requests each get a segment of their own as they come, and a larger
    request later finds the freed bytes in pieces too small: the pool reserved 1.44 GB for the 1.12 GB a Qwen2.5-3B
    step held at once (every block checkpointed, 1,024 x 4 tokens), 2.25 GB for 1.80 GB at Llama-2-7B (2,048 x 2).
    Given one segment of what the step holds at once, requests split it and freed neighbours coalesce: 0.10 GB over
    (``benchmarks/memory_breakdown.py --arena``, docs/benchmarks.md). The segment comes from a first capture into
    the pool (graphs may share a pool when they are never replayed at once; this one is never replayed): a
    ``torch.cuda.MemPool`` would do it too, but torch 2.11 aborted when one went after its graph (its destructor
    empties the pool's cache, which raised once the graph had given the pool up).

    Returns:
        (pool, graph): the pool's id for ``torch.cuda.graph(pool=...)``, and the graph that holds the segment.
    """
    import torch

    pool = torch.cuda.graph_pool_handle()
    seed = torch.cuda.CUDAGraph()
    with torch.cuda.graph(seed, pool=pool, stream=stream):
        block = torch.empty(-(-nbytes // (2 << 20)) * (2 << 20), dtype=torch.uint8, device=stream.device)
        block[:1].zero_()  # a kernel: torch warns about a capture that recorded none
        del block  # freed into the pool, which keeps the segment for the step's capture
    return pool, seed


@contextlib.contextmanager
def unpacked_rows_while_capturing(packed: bool):
    """While a step is captured, let transformers see that rows given no position ids are not packed.

    Eagerly, transformers rules out packing by reading the position ids it makes itself
    (0, 1, 2, ...; ``masking_utils.find_packed_sequence_indices``) and then hands sdpa no mask
    and ``is_causal=True``. Under stream capture it must not read a tensor, so it assumes the
    rows may be packed and builds a (batch, 1, seq, seq) mask: sdpa then runs its masked kernel
    over every (query, key) pair instead of its causal one (docs/benchmarks.md: 3x the causal
    kernel's time at Llama-2-7B, 2 x 2,048 tokens). Rows captured without position ids are
    never packed (packed rows come with position ids and their mask, ``packed_causal_mask``),
    so the answer is the eager one: not packed. ``packed`` rows are left to transformers.
    """
    from transformers import masking_utils

    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if packed or find is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = _not_packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


def _not_packed(position_ids):
    return None


@functools.cache
def _warmup_stream(device_index: int):
    """One side stream per device for every capture's warm-up runs and the capture itself.

    torch keeps a cuBLAS workspace for every stream that ran a matmul, for the life of the
    process (0.068 GB on an H200): a new stream per capture would leave one behind each time, and
    capturing on torch's own capture stream rather than this one kept a second (measured with
    benchmarks/memory_breakdown.py at the Qwen2.5-3B shape: 0.136 GB of workspaces after a graphed
    step, 0.068 GB capturing here; the step's peak 0.067 GB lower).
    """
    import torch

    return torch.cuda.Stream(device=device_index)


def graphed_step(model, params: AccelerationParams, device, num_processes: int = 1,
                 rows: int | None = None) -> GraphedStep | None:
    """A GraphedStep for ``model`` (graphing micro-batches of ``rows`` rows) when ``params.cuda_graphs`` is on,
    on CUDA, in one process.

    Several processes would need their gradient all-reduce inside the graph; they run eagerly.
    Compiled blocks failed to capture (torch 2.11, H100): with ``compile_layers`` the step runs
    compiled and eager, without a graph.
    """
    if not params.cuda_graphs or device.type != "cuda" or num_processes != 1:
        return None
    if params.compile_layers:
        logger.info("acceleration.cuda_graphs is not combined with compile_layers: training without CUDA graphs")
        return None
    if any(type(module).__name__ == "Linear8bitLt" for module in model.modules()):
        # LLM.int8() picks outlier columns on the host at every call: nothing a graph can replay.
        logger.info("acceleration.cuda_graphs does not apply to 8-bit layers: training without CUDA graphs")
        return None
    logger.info("Acceleration: cuda_graphs (captured at the first micro-batch)")
    return GraphedStep(model, rows)

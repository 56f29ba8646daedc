"""What the trained model holds in memory before a step, tensor kind by tensor kind.

    PYTHONPATH=src python benchmarks/memory_breakdown.py --shape qwen2.5-3b --out bench-out/memory

Loads a random-init model of the shape as the train stage does (``modeling.load_base_model``,
``modeling.add_lora``, ``fast.apply`` with the defaults and every block checkpointed) and sums the
bytes of every distinct storage reachable from it: 4-bit weights, their quantization statistics
(absmax, the nested absmax and its statistics, the code book), other frozen params by dtype,
LoRA params, buffers. On a GPU it sets that sum beside ``torch.cuda.memory_allocated()``: what
the allocator holds that no tensor of the model explains is the first thing to look at when our
footprint is above a peer's; then it runs one graphed step (--batch x --seq tokens) and reports
what stays allocated after it, with and without cuBLAS's per-stream workspaces, and how the graph's
private pool grew during the capture (which requests made it reserve a segment, and how much was free in
it then: what it reserves beyond the most it held at once is gaps; where each request was made only with
BREAKDOWN_STACKS=1, which a checkpointed step's capture does not survive). Prints tables;
writes breakdown.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from qlorapipe import modeling
from qlorapipe.params import AccelerationParams, QuantizationParams
from qlorapipe.train import fast


def quant_state_tensors(state) -> dict[str, torch.Tensor]:
    """The tensors of a bitsandbytes QuantState, nested statistics included, by kind."""
    found = {}
    for name in ("absmax", "code"):
        tensor = getattr(state, name, None)
        if isinstance(tensor, torch.Tensor):
            found[name] = tensor
    nested = getattr(state, "state2", None)
    if nested is not None:
        found.update({f"nested {k}": v for k, v in quant_state_tensors(nested).items()})
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        found["offset"] = offset
    return found


def breakdown(model) -> dict[str, int]:
    """Bytes per kind over the distinct storages reachable from ``model`` (a storage counted once)."""
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = defaultdict(int)

    def add(kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.data_ptr() == 0 or key in seen:
            return
        seen.add(key)
        totals[kind] += storage.nbytes()

    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit":
            add("4-bit weights", param)
            for kind, tensor in quant_state_tensors(param.quant_state).items():
                add(f"4-bit {kind}", tensor)
        elif param.requires_grad:
            add(f"trainable {str(param.dtype).removeprefix('torch.')}", param)
        else:
            add(f"frozen {'embedding/head' if 'embed' in name or 'lm_head' in name else 'other'} "
                f"{str(param.dtype).removeprefix('torch.')}", param)
    for _, buffer in model.named_buffers():
        add(f"buffers {str(buffer.dtype).removeprefix('torch.')}", buffer)
    return dict(sorted(totals.items()))


def after_a_graphed_step(model, seq: int, batch: int, before: int, arena: bool = False) -> dict:
    """What stays allocated after one forward and backward captured and replayed as the train stage runs
    it (``cuda_graphs.GraphedStep``), once the graph is gone, and how much of that is cuBLAS's
    workspaces (torch keeps them for every stream that ran a matmul, until told to free them); and how the
    graph's private pool grew while the step was captured (``pool_growth``)."""
    import gc

    from qlorapipe.train.fast import cuda_graphs

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    graphed = cuda_graphs.GraphedStep(model)
    # The allocator's events, for pool_growth; with their Python frames only when asked: recording frames made the
    # capture of a checkpointed step fail (torch 2.11, docs/benchmarks.md, forty-fifth run).
    frames = "alloc" if os.environ.get("BREAKDOWN_STACKS") else None
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=frames, stacks="python")
    graphed({"input_ids": ids}, ids, 1.0)  # the warm-up runs and the capture, recorded
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    graphed({"input_ids": ids}, ids, 1.0)
    torch.cuda.synchronize()
    figures = {"graph_failed": graphed.failed, "step_peak_gb": (torch.cuda.max_memory_allocated() - before) / 1e9}
    if graphed.graph is not None:
        pool = tuple(graphed.graph.pool())
        segments = [s for s in snapshot["segments"] if tuple(s["segment_pool_id"]) == pool]
        figures["pool"] = pool_growth(snapshot["device_traces"][torch.cuda.current_device()], segments)
        figures["measure_gb"] = (graphed.held_bytes() - before) / 1e9
    del graphed
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    if "pool" in figures and arena:
        figures["arena"] = captured_in_an_arena(model, ids, figures["pool"]["peak_live_bytes"], before)
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    figures["allocated_after_step_gb"] = (torch.cuda.memory_allocated() - before) / 1e9
    torch._C._cuda_clearCublasWorkspaces()  # in every CUDA build of torch since 1.13
    figures["allocated_without_cublas_workspaces_gb"] = (torch.cuda.memory_allocated() - before) / 1e9
    return figures


def captured_in_an_arena(model, ids, arena_bytes: int, before: int) -> dict:
    """The same step captured into a pool that already holds one free segment of ``arena_bytes`` (the most the
    default capture's pool held allocated at once): its larger requests split that one segment, freed neighbours
    coalesce, and the pool grows only where a request finds no piece large enough. The experiment that led to
    ``cuda_graphs.arena`` (the train stage seeds its pool with a first capture instead: in torch 2.11 a MemPool
    that went after its graph aborted the process; docs/benchmarks.md, forty-sixth run)."""
    import functools
    from unittest import mock

    from qlorapipe.train.fast import cuda_graphs

    arena = torch.cuda.MemPool()
    # On the stream the step is captured on: the allocator gives a free block only to requests of its stream.
    with torch.cuda.use_mem_pool(arena), torch.cuda.stream(cuda_graphs._warmup_stream(torch.cuda.current_device())):
        block = torch.empty(-(-arena_bytes // (2 << 20)) * (2 << 20), dtype=torch.uint8, device="cuda")
    del block  # freed into the arena's pool, which keeps the segment
    torch.cuda.reset_peak_memory_stats()
    graphed = cuda_graphs.GraphedStep(model)
    with mock.patch.object(torch.cuda, "graph", functools.partial(torch.cuda.graph, pool=arena.id)):
        graphed({"input_ids": ids}, ids, 1.0)
    graphed({"input_ids": ids}, ids, 1.0)
    torch.cuda.synchronize()
    reserved, _ = graphed.pool_bytes()
    found = {"graph_failed": graphed.failed, "arena_bytes": arena_bytes, "pool_reserved_bytes": reserved,
             "step_peak_gb": (torch.cuda.max_memory_allocated() - before) / 1e9,
             "measure_gb": (graphed.held_bytes() - before) / 1e9}
    del graphed
    return found


def pool_growth(events: list[dict], segments: list[dict], top: int = 12) -> dict:
    """How a CUDA graph's private pool grew during its capture, from the allocator's recorded events.

    ``segments`` are the pool's segments after the capture (``torch.cuda.memory._snapshot()``), ``events``
    the device's trace from before it. The pool's events are those at its segments' addresses after the last
    segment given back there (the pool gives none back while its graph lives: earlier events at its addresses
    were the warm-up's, in memory ``empty_cache`` gave back before the capture).
    Returns the pool's reserved bytes, the most it held allocated at once (what a pool without gaps would
    reserve), its segments by size, and the allocations that made it reserve a new segment: the request,
    the segment it got, what was free in the pool then (a request smaller than that was refused only
    because the free bytes lay in pieces) and where it was made (the innermost frame outside torch).
    """
    spans = sorted((s["address"], s["address"] + s["total_size"]) for s in segments)

    def in_pool(address: int) -> bool:
        return any(start <= address < end for start, end in spans)

    pool_events = [e for e in events if e["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free",
                                                        "segment_unmap") and in_pool(e["addr"])]
    # The pool gives nothing back while its graph lives: memory given back at its addresses was the warm-up's.
    first = 1 + max((i for i, e in enumerate(pool_events) if e["action"] in ("segment_free", "segment_unmap")),
                    default=-1)
    live = reserved = peak = 0
    live_sizes: dict[int, int] = {}
    growth, pending = [], None
    for event in pool_events[first:]:
        if event["action"] == "segment_alloc":
            pending = {"segment_bytes": event["size"], "reserved_before": reserved, "free_before": reserved - live}
            reserved += event["size"]
        elif event["action"] == "alloc":
            live -= live_sizes.pop(event["addr"], 0)  # its free was not recorded as completed
            live_sizes[event["addr"]] = event["size"]
            live += event["size"]
            peak = max(peak, live)
            if pending is not None:
                growth.append({**pending, "request_bytes": event["size"], "live_before": live - event["size"],
                               "where": _frame(event.get("frames", []))})
                pending = None
        else:
            live -= live_sizes.pop(event["addr"], 0)
    by_size: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for segment in segments:
        size = segment["total_size"]
        kind = "2 MB" if size == 2 << 20 else "20 MB" if size == 20 << 20 else "other"
        by_size[kind][0] += 1
        by_size[kind][1] += size
    largest = sorted(growth, key=lambda g: g["segment_bytes"], reverse=True)[:top]
    return {"reserved_bytes": sum(s["total_size"] for s in segments), "peak_live_bytes": peak,
            "segments": {kind: {"count": n, "bytes": b} for kind, (n, b) in sorted(by_size.items())},
            "new_segments": len(growth),
            "new_segments_with_enough_free_bytes": sum(g["free_before"] >= g["request_bytes"] for g in growth),
            "largest_new_segments": largest}


def _frame(frames: list[dict]) -> str:
    """The innermost recorded frame outside torch itself, as ``file:line function``."""
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" not in name and not name.startswith("??"):
            return f"{'/'.join(Path(name).parts[-2:])}:{frame.get('line')} {frame.get('name')}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row of the graphed step (GPU only)")
    parser.add_argument("--batch", type=int, default=4, help="rows of the graphed step (GPU only)")
    parser.add_argument("--arena", action="store_true",
                        help="capture the step again into a pool holding one segment of the most the first capture's "
                             "pool held at once (captured_in_an_arena; GPU only)")
    args = parser.parse_args()
    from train_speed import lora_params, save_random_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir, _ = save_random_model(args.shape, args.workdir)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    model, compute_dtype = modeling.load_base_model(model_dir, QuantizationParams(), device)
    loaded = torch.cuda.memory_allocated() - before if device.type == "cuda" else None
    model = modeling.add_lora(model, lora_params(), quantized=True, gradient_checkpointing=True)
    applied = fast.apply(model, replace(AccelerationParams(), uncheckpointed_layers=0), device, compute_dtype)
    model.train()  # as the train stage steps it: checkpointing and dropout act only in training mode
    found = breakdown(model)
    row = {"shape": args.shape, "device": str(device), "applied": applied, "bytes": found,
           "sum_gb": sum(found.values()) / 1e9}
    if device.type == "cuda":
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated() - before
        row.update(allocated_after_load_gb=loaded / 1e9, allocated_gb=allocated / 1e9,
                   unexplained_gb=(allocated - sum(found.values())) / 1e9)
        row.update(after_a_graphed_step(model, args.seq, args.batch, before, args.arena))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breakdown.json").write_text(json.dumps(row, indent=1))
    print("| kind | GB |\n| --- | --- |")
    for kind, nbytes in found.items():
        print(f"| {kind} | {nbytes / 1e9:.3f} |")
    print(json.dumps({k: v for k, v in row.items() if k not in ("bytes", "pool")}))  # the arena's figures too
    pool = row.get("pool")
    if pool:
        print(f"graph pool: {pool['reserved_bytes'] / 1e9:.3f} GB reserved, {pool['peak_live_bytes'] / 1e9:.3f} GB "
              f"allocated at most; segments {pool['segments']}; {pool['new_segments']} new segments, "
              f"{pool['new_segments_with_enough_free_bytes']} of them while the pool had the request's bytes free")
        print("| request MB | segment MB | pool free before MB | pool live before MB | where |")
        print("| --- | --- | --- | --- | --- |")
        for g in pool["largest_new_segments"]:
            mib = [f"{g[key] / 2**20:.1f}" for key in ("request_bytes", "segment_bytes", "free_before", "live_before")]
            print(f"| {' | '.join(mib)} | {g['where']} |")


if __name__ == "__main__":
    main()

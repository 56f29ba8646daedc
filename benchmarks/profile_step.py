"""Where a training step's time goes on the GPU: host-bound or device-bound, and on what.

    PYTHONPATH=src python benchmarks/profile_step.py --cases B,A --out bench-out/profile

Builds this project's train path on each case's random-init shape (as train_speed.py does),
runs a few warm-up steps per variant, then records two steps with torch.profiler and prints,
per variant: wall ms per step, GPU-busy ms per step (the union of kernel intervals), kernel
launches per step, and the operators with the most host time and the kernels with the most
GPU time. A step whose GPU-busy time is far below its wall time is host-bound: fewer, larger
kernels (or graphs) pay there, faster kernels do not.

With ``--graphed`` each step runs as the train stage runs it: forward and backward replayed as
one CUDA graph (``cuda_graphs.GraphedStep``), then the optimizer, with no sync between steps.
The row then also gives the step's wall time unprofiled, the busy time of each CUDA stream
(compute, and the offload's copies), the compute stream's idle time inside the step, and its
longest gaps with the kernels on either side: where a graphed step waits, and for what.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from train_speed import CASES, DEFAULT, build_ours, randomize_lora_b, save_random_model, shape_config

from qlorapipe.train import fast
from qlorapipe.train import loop as training
from qlorapipe.train.fast import cuda_graphs

VARIANTS = {
    "defaults": DEFAULT,
    "defaults + uncheckpointed_layers=24": replace(DEFAULT, uncheckpointed_layers=24),
    "defaults + uncheckpointed_layers=28": replace(DEFAULT, uncheckpointed_layers=28),
    "defaults + uncheckpointed_layers=36": replace(DEFAULT, uncheckpointed_layers=36),
    "defaults + compile_layers": replace(DEFAULT, compile_layers=True),
    "defaults + compile_layers + flat_absmax": replace(DEFAULT, compile_layers=True),
    # Every case's shape: each block recomputed (with its input offloaded: the smallest footprint), or none.
    "every block checkpointed + offload": replace(DEFAULT, uncheckpointed_layers=0, offload_checkpoints=True),
    "every block kept": replace(DEFAULT, uncheckpointed_layers=10**6),
}


def flatten_absmax(model) -> int:
    """Dequantize double-quantized absmax once (frozen weights: it never changes); returns weights changed.

    An experiment: it removes one small kernel and its Python per 4-bit matmul, and costs
    about 0.4 bits per weight (fp32 absmax per 64 weights instead of 8-bit).
    """
    import bitsandbytes.functional as F

    changed = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not state.nested:
            continue
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        state.absmax, state.nested, state.state2, state.offset = absmax.float(), False, None, None
        changed += 1
    return changed


def busy_ms(events) -> float:
    """Milliseconds during which at least one kernel ran (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, -1.0
    for start, stop in spans:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000


# Kernel-name fragments -> category, first match wins (names as CUDA reports them).
CATEGORIES = (
    ("host copies (offload)", ("memcpy htod", "memcpy dtoh")),  # on their own stream, overlapping kernels
    ("flash attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul")),
    ("nf4 dequantize", ("dequantize", "kDequant")),
    ("triton (liger)", ("_rms_norm", "_swiglu", "triton")),
    ("dropout / random", ("dropout", "philox", "fused_dropout", "bernoulli", "rand")),
    ("copy / cast", ("copy", "cast", "direct_copy", "to_copy", "cat", "transpose")),
    ("reduction", ("reduce", "norm", "sum", "softmax", "log_softmax", "nll")),
    ("optimizer", ("optimizer", "kOptimizer", "adam")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "silu")),
)


def kernel_categories(kernels, steps: int) -> dict:
    """GPU milliseconds per step by kernel category, largest first."""
    totals: dict[str, float] = {}
    for event in kernels:
        name = event.name.lower()
        category = next((c for c, parts in CATEGORIES if any(p.lower() in name for p in parts)), "other")
        totals[category] = totals.get(category, 0.0) + (event.time_range.end - event.time_range.start) / 1000 / steps
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def stream_timeline(prof, steps: int, gaps: int = 12) -> dict:
    """Busy milliseconds per step of each CUDA stream, and the main stream's idle time and longest gaps.

    The main stream is the one with the most kernel time (compute); a gap is the time between
    one of its kernels ending and the next starting, inside the profiled span.
    """
    spans: dict[int, list] = {}
    for event in prof.profiler.kineto_results.events():
        if (event.device_type() != torch.autograd.DeviceType.CUDA or event.is_user_annotation()
                or event.name().startswith("Optimizer.")):
            continue
        start = event.start_ns() / 1e6
        spans.setdefault(event.device_resource_id(), []).append((start, start + event.duration_ns() / 1e6,
                                                                 event.name()))
    busy = {stream: sum(end - start for start, end, _ in events) for stream, events in spans.items()}
    main = max(busy, key=busy.get)
    events = sorted(spans[main])
    holes = [(events[i + 1][0] - events[i][1], events[i][2][:60], events[i + 1][2][:60])
             for i in range(len(events) - 1) if events[i + 1][0] > events[i][1]]
    idle = sum(hole for hole, _, _ in holes)
    return {
        "stream_busy_ms_per_step": {("compute" if s == main else f"stream {s}"): round(b / steps, 1)
                                    for s, b in sorted(busy.items(), key=lambda kv: -kv[1])},
        "compute_idle_ms_per_step": round(idle / steps, 1),
        "compute_gaps_over_50us_ms_per_step": round(sum(h for h, _, _ in holes if h > 0.05) / steps, 1),
        "compute_gaps_under_50us_per_step": sum(1 for h, _, _ in holes if h <= 0.05) // steps,
        "longest_compute_gaps_ms": [[round(h, 3), before, after] for h, before, after in
                                    sorted(holes, key=lambda hole: -hole[0])[:gaps]],
    }


def profile_variant(model, batches, trainable, label: str, case: str, out: Path, rows: int = 25,
                    graphed: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    optimizer = training.make_optimizer("adamw_8bit", trainable, 2e-4, 0.0, sync_each_parameter=not graphed)
    graph = cuda_graphs.GraphedStep(model) if graphed else None

    def one_step(input_ids):
        if graph is None or graph({"input_ids": input_ids}, input_ids, 1.0) is None:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=graph is None)

    for input_ids in batches[:-2]:
        one_step(input_ids)
    torch.cuda.synchronize()
    unprofiled = None
    if graphed:  # the step as training runs it: no sync between steps
        started = time.perf_counter()
        for input_ids in batches[:-2]:
            one_step(input_ids)
        torch.cuda.synchronize()
        unprofiled = round((time.perf_counter() - started) * 1000 / len(batches[:-2]), 1)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for input_ids in batches[-2:]:
            one_step(input_ids)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) * 1000 / 2
    events = prof.events()
    # GPU-side events, less the user annotations torch.profiler also puts on the GPU timeline
    # (such as the whole "Optimizer.step#..." span), which are not kernels.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and not e.name.startswith("Optimizer.")]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                "cudaGraphLaunch")]
    row = {
        "case": case, "variant": label + (" (graphed)" if graphed else ""),
        "wall_ms_per_step": unprofiled,
        "wall_ms_per_step_profiled": round(wall, 1),
        "gpu_busy_ms_per_step": round(busy_ms(kernels) / 2, 1),
        "kernels_per_step": len(kernels) // 2,
        "launch_calls_per_step": len(launches) // 2,
        "gpu_ms_per_step_by_category": kernel_categories(kernels, 2),
        **stream_timeline(prof, 2),
    }
    if graph is not None:
        row["cuda_graph_replays"], row["cuda_graph_failed"] = graph.replays, graph.failed
    averages = prof.key_averages()
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    gpu_table = averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)
    # The same GPU time by operator and input shapes: which tensors the copies and adds are.
    shapes_table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=70)
    name = f"{case}-{label.replace(' ', '').replace('+', '_').replace('=', '')}{'-graphed' if graphed else ''}"
    (out / f"{name}-shapes.txt").write_text(shapes_table)
    (out / f"{name}-cpu.txt").write_text(cpu_table)
    (out / f"{name}-gpu.txt").write_text(gpu_table)
    print(json.dumps(row), flush=True)
    print(cpu_table[:6000], flush=True)
    print(gpu_table[:12000], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="B,A")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/profile"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--steps", type=int, default=5, help="warm-up steps before the two profiled ones")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed in the GPU table")
    parser.add_argument("--graphed", action="store_true",
                        help="replay forward + backward as one CUDA graph, as the train stage does")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    cases = args.cases.split(",")
    rows = []
    for shape in dict.fromkeys(CASES[case][0] for case in cases):  # one model per shape, its cases in turn
        model_dir, _ = save_random_model(shape, args.workdir)
        config = shape_config(shape)
        model, compute_dtype = build_ours(model_dir)
        randomize_lora_b(model)
        for label in args.variants.split(","):
            fast.remove(model, upcast_dtype=torch.float32)
            applied = fast.apply(model, VARIANTS[label], device, compute_dtype)
            if label.endswith("flat_absmax"):
                applied.append(f"flat_absmax on {flatten_absmax(model)} weights")
            trainable = [p for p in model.parameters() if p.requires_grad]
            for case in (case for case in cases if CASES[case][0] == shape):
                _, seq, batch = CASES[case]
                generator = torch.Generator().manual_seed(3)
                batches = [torch.randint(0, config.vocab_size, (batch, seq), generator=generator).cuda()
                           for _ in range(args.steps + 2)]
                row = profile_variant(model, batches, trainable, label, case, args.out, args.rows, args.graphed)
                row["applied"] = applied
                rows.append(row)
                (args.out / "profile.json").write_text(json.dumps(rows, indent=1))
                gc.collect()
                torch.cuda.empty_cache()
        fast.remove(model, upcast_dtype=torch.float32)
        del model, trainable
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

"""What the trained model holds in memory before a step, tensor kind by tensor kind.

    PYTHONPATH=src python benchmarks/memory_breakdown.py --shape qwen2.5-3b --out bench-out/memory

Loads a random-init model of the shape as the train stage does (``modeling.load_base_model``,
``modeling.add_lora``, ``fast.apply`` with the defaults and every block checkpointed) and sums the
bytes of every distinct storage reachable from it: 4-bit weights, their quantization statistics
(absmax, the nested absmax and its statistics, the code book), other frozen params by dtype,
LoRA params, buffers. On a GPU it sets that sum beside ``torch.cuda.memory_allocated()``: what
the allocator holds that no tensor of the model explains is the first thing to look at when our
footprint is above a peer's; then it runs one graphed step (--batch x --seq tokens) and reports
what stays allocated after it, with and without cuBLAS's per-stream workspaces. Prints a table;
writes breakdown.json under --out.
"""

from __future__ import annotations

import argparse
import json
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


def after_a_graphed_step(model, seq: int, batch: int, before: int) -> dict:
    """What stays allocated after one forward and backward captured and replayed as the train stage runs
    it (``cuda_graphs.GraphedStep``), once the graph is gone, and how much of that is cuBLAS's
    workspaces (torch keeps them for every stream that ran a matmul, until told to free them)."""
    import gc

    from qlorapipe.train.fast import cuda_graphs

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    graphed = cuda_graphs.GraphedStep(model)
    graphed({"input_ids": ids}, ids, 1.0)
    graphed({"input_ids": ids}, ids, 1.0)
    torch.cuda.synchronize()
    figures = {"graph_failed": graphed.failed, "step_peak_gb": (torch.cuda.max_memory_allocated() - before) / 1e9}
    del graphed
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    figures["allocated_after_step_gb"] = (torch.cuda.memory_allocated() - before) / 1e9
    torch._C._cuda_clearCublasWorkspaces()  # in every CUDA build of torch since 1.13
    figures["allocated_without_cublas_workspaces_gb"] = (torch.cuda.memory_allocated() - before) / 1e9
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row of the graphed step (GPU only)")
    parser.add_argument("--batch", type=int, default=4, help="rows of the graphed step (GPU only)")
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
    found = breakdown(model)
    row = {"shape": args.shape, "device": str(device), "applied": applied, "bytes": found,
           "sum_gb": sum(found.values()) / 1e9}
    if device.type == "cuda":
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated() - before
        row.update(allocated_after_load_gb=loaded / 1e9, allocated_gb=allocated / 1e9,
                   unexplained_gb=(allocated - sum(found.values())) / 1e9)
        row.update(after_a_graphed_step(model, args.seq, args.batch, before))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breakdown.json").write_text(json.dumps(row, indent=1))
    print("| kind | GB |\n| --- | --- |")
    for kind, nbytes in found.items():
        print(f"| {kind} | {nbytes / 1e9:.3f} |")
    print(json.dumps({k: v for k, v in row.items() if k != "bytes"}))


if __name__ == "__main__":
    main()

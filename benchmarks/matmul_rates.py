"""How fast the GPU runs the bf16 matmuls of each case's projections, and what could run them faster.

    PYTHONPATH=src python benchmarks/matmul_rates.py --cases A,C,D --out bench-out/matmuls

The step of every case is mostly its projections' base matmuls (speed.md, "Why case C stays level").
For each case of train_speed.py (its shape and tokens per micro-batch, M), each projection's forward
matmul ``x @ W^T`` (M x K by N x K) and its input-gradient matmul ``g @ W`` (M x N by N x K) are timed
on random bf16 tensors, with:

- ``default``: ``torch.mm`` as the train stage calls it (cuBLAS through torch's default BLAS choice);
- ``cublaslt``: the same call with ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
- ``grouped``: the projections that read the same input (q, k and v; gate and up) as one matmul over
  their concatenated weights, against the sum of their separate matmuls (forward and input gradient).

Each figure is a median of CUDA-event timings over ``--reps`` calls after warm-up, with its rate in
TFLOP/s; ``reference`` is a 8,192-cube matmul on the same GPU. The JSON lists every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from train_speed import CASES, shape_config


def timed(function, reps: int) -> float:
    """Median milliseconds of ``function()`` over ``reps`` calls (after three warm-up calls)."""
    for _ in range(3):
        function()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection's weight for ``shape``."""
    config = shape_config(shape)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    return {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, q),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def with_library(name: str, function):
    """``function`` run with ``name`` as torch's preferred BLAS library."""
    def run():
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(name)
        try:
            return function()
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    return run


def measure_case(case: str, reps: int) -> dict:
    shape, seq, batch = CASES[case][:3]
    m = seq * batch
    weights = projections(shape)
    rows = []
    for name, (n, k) in weights.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        for direction, (a, b, dims) in {"forward": (x, w.t(), (m, n, k)),
                                        "input_grad": (g, w, (m, k, n))}.items():
            row = {"projection": name, "direction": direction, "m": dims[0], "n": dims[1], "k": dims[2]}
            variants = {"default": lambda a=a, b=b: torch.mm(a, b)}
            variants["cublaslt"] = with_library("cublaslt", variants["default"])
            for label, function in variants.items():
                ms = timed(function, reps)
                row[f"{label}_ms"] = round(ms, 4)
                row[f"{label}_tflops"] = round(tflops(*dims, ms), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    grouped = []
    for group in (("q", "k", "v"), ("gate", "up")):
        k = weights[group[0]][1]
        parts = [torch.randn(weights[p][0], k, device="cuda", dtype=torch.bfloat16) / k**0.5 for p in group]
        joined = torch.cat(parts)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        grads = [torch.randn(m, w.shape[0], device="cuda", dtype=torch.bfloat16) for w in parts]
        grad_joined = torch.cat(grads, dim=1)

        def separate_backward():
            out = grads[0] @ parts[0]
            for grad, w in zip(grads[1:], parts[1:]):
                out.addmm_(grad, w)
            return out

        figures = {
            "forward_separate_ms": timed(lambda: [x @ w.t() for w in parts], reps),
            "forward_grouped_ms": timed(lambda: x @ joined.t(), reps),
            "input_grad_separate_ms": timed(separate_backward, reps),
            "input_grad_grouped_ms": timed(lambda: grad_joined @ joined, reps),
            "input_grad_grouped_with_cat_ms": timed(lambda: torch.cat(grads, dim=1) @ joined, reps),
        }
        row = {"group": "+".join(group), **{key: round(v, 4) for key, v in figures.items()}}
        grouped.append(row)
        print(json.dumps(row), flush=True)
    return {"case": case, "shape": shape, "tokens": m, "matmuls": rows, "grouped": grouped}


def reference(reps: int) -> float:
    """Milliseconds of one 8,192-cube bf16 matmul."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return timed(lambda: big @ big, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="A,C,D")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench-out/matmuls"))
    args = parser.parse_args()
    reference_ms = reference(args.reps)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "reference_8192_cube": {"ms": round(reference_ms, 4),
                                      "tflops": round(tflops(8192, 8192, 8192, reference_ms), 1)},
              "cases": []}
    print(json.dumps(result["reference_8192_cube"]), flush=True)
    for case in args.cases.split(","):
        result["cases"].append(measure_case(case, args.reps))
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "matmul-rates.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

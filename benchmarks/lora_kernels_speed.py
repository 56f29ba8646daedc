"""Speed of the fused LoRA-dropout kernels (fused_lora.lora_down and its two gradients) on a GPU.

    PYTHONPATH=src python benchmarks/lora_kernels_speed.py --out bench-out/kernels [--sweep]

At the shapes the 3B benchmark runs (512 and 4,096 rows; 2,048 and 11,008 columns, the inputs
of the attention / MLP up projections and of the MLP down projection; rank 16, dropout 0.05,
bfloat16), each kernel is timed as a replayed CUDA graph (triton.testing.do_bench_cudagraph: GPU time,
no launch overhead, as the train stage runs it) and set
against the time of a copy that reads and writes as many bytes as the kernel must move at
least (``x`` once; for the input's gradient the gradient read and written), so ``x copy`` says
how far from the memory bound each kernel is. With --sweep, every launch configuration of
fused_lora.KERNEL_CONFIGS' grid is timed too, each checked against the default's result, and
the fastest per kernel (summed over the shapes) is written to kernel_configs.json for
train_speed.py --kernel-configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from qlorapipe.train.fast import fused_lora

SHAPES = [(4096, 2048), (4096, 11008), (512, 2048), (512, 11008)]
RANK, P = 16, 0.05
SWEEP = {"BLOCK_M": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3, 4)}


def calls(m: int, k: int):
    """Each kernel as (a zero-argument call, the bytes it must move at least, a call that
    returns its result from fresh outputs: the input's gradient accumulates in place)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=generator).bfloat16()
    a = (torch.randn(RANK, k, device="cuda", generator=generator) * 0.05).bfloat16()
    g = torch.randn(m, RANK, device="cuda", generator=generator).bfloat16()
    grad = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    seed = fused_lora.new_seed("cuda")
    def input_grad_from_zeros():
        fresh = torch.zeros_like(grad)
        fused_lora.lora_input_grad_(fresh, g, a, P, seed)
        return fresh

    down = lambda: fused_lora.lora_down(x, a, P, seed)  # noqa: E731
    down_grad = lambda: fused_lora.lora_down_grad(g, x, P, seed)  # noqa: E731
    return {
        "lora_down": (down, 2 * m * k, down),
        "lora_down_grad": (down_grad, 2 * m * k, down_grad),
        "lora_input_grad": (lambda: fused_lora.lora_input_grad_(grad, g, a, P, seed), 4 * m * k,
                            input_grad_from_zeros),
    }


def copy_ms(n_bytes: int) -> float:
    """A device copy moving ``n_bytes`` in all (half read, half written)."""
    import triton.testing

    src = torch.empty(n_bytes // 4, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return triton.testing.do_bench_cudagraph(lambda: dst.copy_(src))


def timings() -> list[dict]:
    import triton.testing

    rows = []
    for m, k in SHAPES:
        for name, (call, n_bytes, _) in calls(m, k).items():
            ms = triton.testing.do_bench_cudagraph(call)
            bound = copy_ms(n_bytes)
            rows.append({"kernel": name, "m": m, "k": k, "ms": ms, "x_copy_ms": bound, "x_copy": ms / bound,
                         "config": dict(getattr(fused_lora, "KERNEL_CONFIGS", {}).get(name, {}))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def sweep() -> tuple[list[dict], dict]:
    """Every configuration of SWEEP for each kernel; the fastest (sum over SHAPES) per kernel."""
    import triton.testing

    defaults = {name: dict(config) for name, config in fused_lora.KERNEL_CONFIGS.items()}
    rows, best = [], {}
    for name in defaults:
        totals = {}
        for values in itertools.product(*SWEEP.values()):
            config = dict(zip(SWEEP, values))
            if name == "lora_input_grad" and config["num_stages"] > 1:
                continue  # no loop to pipeline
            key = json.dumps(config, sort_keys=True)
            total = 0.0
            for m, k in SHAPES:
                call, _, result = calls(m, k)[name]
                fused_lora.KERNEL_CONFIGS[name] = defaults[name]
                want = result().float()
                fused_lora.KERNEL_CONFIGS[name] = config
                try:
                    got = result().float()
                    ms = triton.testing.do_bench_cudagraph(call)
                except Exception as error:  # noqa: BLE001 - a config the compiler refuses (shared memory)
                    rows.append({"kernel": name, "m": m, "k": k, "config": config, "error": str(error)[:200]})
                    total = float("inf")
                    break
                same = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))
                rows.append({"kernel": name, "m": m, "k": k, "config": config, "ms": ms, "matches_default": same})
                if not same:
                    total = float("inf")
                    break
                total += ms
            totals[key] = total
            print(json.dumps({"kernel": name, "config": config, "total_ms": total}), flush=True)
        fused_lora.KERNEL_CONFIGS[name] = defaults[name]
        best[name] = json.loads(min(totals, key=totals.get))
        print(json.dumps({"kernel": name, "best": best[name], "total_ms": min(totals.values()),
                          "default_total_ms": totals.get(json.dumps(defaults[name], sort_keys=True))}), flush=True)
    return rows, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "timings": timings()}
    if args.sweep and hasattr(fused_lora, "KERNEL_CONFIGS"):
        result["sweep"], best = sweep()
        (args.out / "kernel_configs.json").write_text(json.dumps(best, indent=1))
        for name, config in best.items():
            fused_lora.KERNEL_CONFIGS[name] = config
        result["timings_best"] = timings()
    (args.out / "lora_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

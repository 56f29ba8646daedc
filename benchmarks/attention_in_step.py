"""What attention costs inside the graphed train step, with and without the causal mask a capture builds.

    PYTHONPATH=src python benchmarks/attention_in_step.py --cases C --out bench-out/attention

For each case of train_speed.py (random-init shape, 4-bit base, LoRA r=16 on the seven projections,
the default fast paths) and each of two layouts (every block kept; every block checkpointed with its
input offloaded), the step runs as the train stage runs it: forward and backward replayed as one
CUDA graph (``cuda_graphs.GraphedStep``), then the optimizer, no sync between steps. Three rows:

- ``sdpa``: the train stage's step;
- ``sdpa, masked as captured``: the same without ``cuda_graphs.unpacked_rows_while_capturing``, so
  the capture builds transformers' explicit (batch, 1, seq, seq) causal mask and sdpa runs its masked
  kernel (what every graphed step did before that fix);
- ``no attention``: sdpa replaced by a copy of its values (wrong outputs, right shapes): the step less
  attention, so ``sdpa`` minus this row is what attention costs inside the step.

It also times the same attention alone (forward and backward of every block, back to back): the
floor that attention's cost inside the step can be held against.
"""

from __future__ import annotations

import argparse
import contextlib
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

LAYOUTS = {
    "every block kept": replace(DEFAULT, uncheckpointed_layers=10**6),
    "every block checkpointed + offload": replace(DEFAULT, uncheckpointed_layers=0, offload_checkpoints=True),
}
ROWS = ("sdpa", "sdpa, masked as captured", "no attention")


@contextlib.contextmanager
def attention_as(row: str):
    """sdpa as the train stage runs it, without the capture's fix, or replaced by a copy of its values."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    unpacked = cuda_graphs.unpacked_rows_while_capturing
    if row == "no attention":
        torch.nn.functional.scaled_dot_product_attention = (  # grouped key/value heads repeated to the query's
            lambda q, k, v, **kwargs: v.repeat_interleave(q.shape[1] // v.shape[1], dim=1) * 1.0)
    elif row == "sdpa, masked as captured":
        cuda_graphs.unpacked_rows_while_capturing = lambda packed: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        cuda_graphs.unpacked_rows_while_capturing = unpacked


def step_ms(model, batches, warmup: int) -> tuple[float, dict]:
    """Wall milliseconds per graphed step (optimizer included), and the graph's replay count / failure."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.make_optimizer("adamw_8bit", trainable, 2e-4, 0.0, sync_each_parameter=False)
    graphed = cuda_graphs.GraphedStep(model)

    def one(input_ids):
        assert graphed({"input_ids": input_ids}, input_ids, 1.0) is not None, graphed.failed
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for input_ids in batches[:warmup]:
        one(input_ids)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for input_ids in batches[warmup:]:
        one(input_ids)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / len(batches[warmup:]), {"cuda_graph_replays": graphed.replays}


def attention_alone_ms(config, seq: int, batch: int, reps: int = 4) -> float:
    """Forward and backward of causal sdpa at the case's shape, once per block, back to back (ms per step)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def tensor(n):  # (batch, seq, heads, head_dim), seen as (batch, heads, seq, head_dim) as in the model
        return torch.randn(batch, seq, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)

    def once():
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               is_causal=True, enable_gqa=heads != kv_heads)
        torch.autograd.grad(out.transpose(1, 2), (q, k, v), grad)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(config.num_hidden_layers * reps):
        once()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="C")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/attention"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    rows = []
    for case in args.cases.split(","):
        shape, seq, batch = CASES[case]
        model_dir, _ = save_random_model(shape, args.workdir)
        config = shape_config(shape)
        model, compute_dtype = build_ours(model_dir)
        randomize_lora_b(model)
        generator = torch.Generator().manual_seed(3)
        batches = [torch.randint(0, config.vocab_size, (batch, seq), generator=generator).cuda()
                   for _ in range(args.warmup + args.steps)]
        alone = round(attention_alone_ms(config, seq, batch), 1)
        for layout in args.layouts.split(","):
            fast.remove(model, upcast_dtype=torch.float32)
            fast.apply(model, LAYOUTS[layout], device, compute_dtype)
            times = {}
            for row in ROWS:
                with attention_as(row):
                    ms, graph = step_ms(model, batches, args.warmup)
                times[row] = ms
                rows.append({"case": case, "layout": layout, "row": row, "ms_per_step": round(ms, 1),
                             "tokens_per_s": round(batch * seq / ms * 1000), **graph})
                print(json.dumps(rows[-1]), flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            rows.append({"case": case, "layout": layout, "attention_alone_ms_per_step": alone,
                         "attention_in_step_ms": round(times["sdpa"] - times["no attention"], 1),
                         "masked_attention_in_step_ms": round(times["sdpa, masked as captured"]
                                                              - times["no attention"], 1)})
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "attention.json").write_text(json.dumps(rows, indent=1))
        fast.remove(model, upcast_dtype=torch.float32)
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""What one decoder block costs, part by part, and what recomputing it costs, on one GPU.

    PYTHONPATH=src python benchmarks/block_costs.py --cases C,A,D --out bench-out/blocks

For each case of train_speed.py (its shape, sequence length and micro-batch), a one-block model of
that shape (random init, saved and loaded 4-bit as the train stage loads it, LoRA r=16 on the seven
projections, dropout 0.05, the default fast paths) runs its block's two halves on a random residual
stream that needs a gradient, as training runs them:

- attention half: the input norm, q/k/v projections, RoPE, sdpa, the output projection;
- MLP half: the post-attention norm, gate and up projections, SwiGLU and the down projection;
- the same MLP half as ``lean_recompute`` recomputes it (the down projection's base matmul skipped);
- the MLP half and the gate projection again with their adapters unjoined (``fused_lora.JOIN_WIDE`` off);
- each half's backward pass (with everything it saved kept), and single projections alone, with their
  adapters and without (the 4-bit base layer only: dequantization and matmul), and the matmul alone on
  weights dequantized beforehand;
- on GPUs with float8 matmuls (compute capability 8.9 and up), the same matmuls in float8 (e4m3, one scale
  per token and per output channel, the input's quantization included) with their error against bf16: what
  a float8 base matmul could take off the step.

A checkpointed block costs its forward pass again in the backward pass: attention + lean MLP. The
figures times the blocks give the recomputation's share of the step (against train_speed.py's step
times for the same case). Each part is captured as a CUDA graph, as the train stage replays its
step, and timed by CUDA events over ``--reps`` replays.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import replace
from pathlib import Path

import torch
from train_speed import CASES, DEFAULT, adapters_joined, build_ours, randomize_lora_b, shape_config

from qlorapipe.train import fast
from qlorapipe.train.fast import fused_lora, lean_recompute
from qlorapipe.train.fast.checkpointing import decoder_layers


def save_one_block(shape: str, workdir: Path) -> tuple[Path, int]:
    """A random-init bf16 model of ``shape`` with one decoder block; returns (dir, the shape's block count)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    n_blocks = config.num_hidden_layers
    path = workdir / f"{shape}-one-block"
    if not (path / "config.json").is_file():
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):  # Qwen2's per-block attention kinds: one per block
            config.layer_types = config.layer_types[:1]
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return path, n_blocks


def gpu_ms(fn, reps: int, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()``: captured as one CUDA graph (as the train stage replays its step) and
    replayed ``reps`` times between two CUDA events; queued eagerly where the capture fails (CPU: wall time)."""
    if not torch.cuda.is_available():
        import time

        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - started) * 1000 / reps
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture asks
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):  # the warm-up's stream, as the train stage captures
            fn()
        run = graph.replay
    except RuntimeError as exc:
        print(f"capture failed, timed eagerly: {exc}"[:200], flush=True)
        graph, run = None, fn
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


FLOAT8_TOP = torch.finfo(torch.float8_e4m3fn).max


def float8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as 2-D float8 e4m3 rows, each with its own scale (returned as an (M, 1) float32 column)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_TOP
    return (flat / scale).to(torch.float8_e4m3fn), scale


def float8_matmul(weight: torch.Tensor):
    """``x @ weight.t()`` in float8 e4m3 (a scale per row of x and per output channel, bf16 out), as a closure
    over the weight quantized once that takes x's rows from ``float8_rows``. None where the GPU has no float8
    matmul (compute capability below 8.9)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return None
    w8, w_scale = float8_rows(weight)

    def matmul(x8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=weight.dtype)

    return matmul


def adapter_parts(layer, x: torch.Tensor, dtype, name: str) -> dict:
    """Where a LoRA projection's time beyond its 4-bit base goes, on its (weight dequantized beforehand):
    the adapter's two rank-r matmuls, the base matmul writing its output and accumulating onto the adapter's
    (as ``fused_lora`` runs it), and one matmul over [x | dropout(x) A^T] and [W | B * scaling] (the adapter
    folded into the base matmul's depth) with the copy that builds its input."""
    lora_a, lora_b, base, scaling, p = fused_lora.lora_parts(layer)
    x2 = x.reshape(-1, x.shape[-1])
    # detached: a use of the LoRA weights outside the block's own passes would move their gradient
    # accumulation's stream, and a capture of the block's backward pass then fails
    a, b = lora_a.detach().to(dtype), (lora_b.detach() * scaling).to(dtype)
    seed = fused_lora.new_seed(x2.device)
    fused = p > 0 and fused_lora.fuses_dropout(x2, a)

    def down():
        return fused_lora.lora_down(x2, a, p, seed) if fused else fused_lora.dropout(x2, p, seed) @ a.t()

    weight = fused_lora.frozen_weight(base, dtype)
    hidden = down()
    accumulated = hidden @ b.t()
    joined_x, joined_w = torch.cat([x2, hidden], 1), torch.cat([weight, b], 1)
    return {
        f"{name}_adapter_down": down,
        f"{name}_adapter_up": lambda: hidden @ b.t(),
        f"{name}_matmul_accumulating": lambda: accumulated.addmm_(x2, weight.t()),
        f"{name}_matmul_joined": lambda: joined_x @ joined_w.t(),
        f"{name}_join_input": lambda: torch.cat([x2, hidden], 1),
    }


def measure(case: str, workdir: Path, reps: int, device=None) -> dict:
    shape, seq, batch = CASES[case]
    model_dir, n_blocks = save_one_block(shape, workdir)
    model, compute_dtype = build_ours(model_dir, device=device)
    randomize_lora_b(model)
    device = next(model.parameters()).device
    applied = fast.apply(model, replace(DEFAULT, uncheckpointed_layers=0), device, compute_dtype)
    layer = decoder_layers(model)[0]
    config = model.config
    hidden = torch.randn(batch, seq, config.hidden_size, device=device, dtype=compute_dtype, requires_grad=True)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    rotary = model.get_base_model().model.rotary_emb
    with torch.no_grad():
        position_embeddings = rotary(hidden, positions)
    grad = torch.randn_like(hidden) * 1e-3

    def attention():
        return layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                               attention_mask=None)[0]

    def mlp():
        return layer.mlp(layer.post_attention_layernorm(hidden))

    def lean_mlp():  # as a recomputation runs it
        down = layer.mlp.down_proj
        marked = vars(down).get(lean_recompute.UNREAD, False)
        setattr(down, lean_recompute.UNREAD, True)
        lean_recompute._STATE.on = True
        try:
            return mlp()
        finally:
            lean_recompute._STATE.on = False
            setattr(down, lean_recompute.UNREAD, marked)

    def with_backward(half):
        def run():
            half().backward(grad)
            hidden.grad = None
            model.zero_grad(set_to_none=True)
        return run

    def unjoined(part):  # as before wide projections folded their adapter into the base matmul
        def run():
            with adapters_joined(False):
                return part()
        return run

    normed = layer.input_layernorm(hidden).detach()
    intermediate = torch.randn(batch, seq, config.intermediate_size, device=device, dtype=compute_dtype)
    attn, mlp_ = layer.self_attn, layer.mlp
    # The 16-bit weights, dequantized once: the matmul alone, against the base layer that dequantizes at each
    # call; the difference bounds what a dequantization fused into the matmul could take off.
    q_weight = fused_lora.frozen_weight(attn.q_proj.base_layer, compute_dtype)
    down_weight = fused_lora.frozen_weight(mlp_.down_proj.base_layer, compute_dtype)
    parts = {
        "attention_forward": attention,
        "mlp_forward": mlp,
        "mlp_forward_lean_recompute": lean_mlp,
        "attention_forward_backward": with_backward(attention),
        "mlp_forward_backward": with_backward(mlp),
        "mlp_forward_unjoined": unjoined(mlp),
        "mlp_forward_backward_unjoined": unjoined(with_backward(mlp)),
        "input_norm": lambda: layer.input_layernorm(hidden),
        "q_proj": lambda: attn.q_proj(normed),
        "k_proj": lambda: attn.k_proj(normed),
        "v_proj": lambda: attn.v_proj(normed),
        "o_proj": lambda: attn.o_proj(normed),
        "gate_proj": lambda: mlp_.gate_proj(normed),
        "gate_proj_unjoined": unjoined(lambda: mlp_.gate_proj(normed)),
        "up_proj": lambda: mlp_.up_proj(normed),
        "q_proj_base_only": lambda: attn.q_proj.base_layer(normed),  # what the adapter adds: q_proj less this
        "gate_proj_base_only": lambda: mlp_.gate_proj.base_layer(normed),
        "down_proj_base_only": lambda: mlp_.down_proj.base_layer(intermediate),
        "q_proj_matmul_only": lambda: normed @ q_weight.t(),
        "down_proj_matmul_only": lambda: intermediate @ down_weight.t(),
    }
    parts.update(adapter_parts(mlp_.gate_proj, normed, compute_dtype, "gate_proj"))
    row = {"case": case, "shape": shape, "seq": seq, "batch": batch, "blocks": n_blocks, "applied": applied}
    q8, down8 = float8_matmul(q_weight), float8_matmul(down_weight)
    if q8 is not None:  # the matmul with x's quantization (unfused torch ops, compiled), and on x quantized beforehand
        normed8, intermediate8 = float8_rows(normed), float8_rows(intermediate)
        parts["q_proj_matmul_float8"] = lambda: q8(*float8_rows(normed))
        parts["down_proj_matmul_float8"] = lambda: down8(*float8_rows(intermediate))
        fused_rows = torch.compile(float8_rows)  # the quantization as one generated kernel: a fused one's cost
        parts["down_proj_matmul_float8_compiled_quantize"] = lambda: down8(*fused_rows(intermediate))
        parts["q_proj_matmul_float8_prequantized"] = lambda: q8(*normed8)
        parts["down_proj_matmul_float8_prequantized"] = lambda: down8(*intermediate8)
        with torch.no_grad():
            exact = intermediate @ down_weight.t()
            error = (down8(*intermediate8).reshape(exact.shape) - exact).norm() / exact.norm()
            row["down_proj_float8_relative_error"] = round(float(error), 5)
    ms = {name: round(gpu_ms(fn, reps), 3) for name, fn in parts.items()}
    ms["attention_backward"] = round(ms.pop("attention_forward_backward") - ms["attention_forward"], 3)
    ms["mlp_backward"] = round(ms.pop("mlp_forward_backward") - ms["mlp_forward"], 3)
    ms["mlp_backward_unjoined"] = round(ms.pop("mlp_forward_backward_unjoined") - ms["mlp_forward_unjoined"], 3)
    row["ms_per_block"] = ms
    forward = ms["attention_forward"] + ms["mlp_forward"]
    recompute = ms["attention_forward"] + ms["mlp_forward_lean_recompute"]
    backward = ms["attention_backward"] + ms["mlp_backward"]
    row["derived_ms_per_block"] = {
        "forward": round(forward, 3),
        "backward": round(backward, 3),
        "recompute_lean": round(recompute, 3),
        "recompute_attention_share": round(ms["attention_forward"] / recompute, 3),
        "recompute_over_kept_block": round(recompute / (forward + backward), 3),
    }
    row["derived_ms_per_step_all_blocks"] = {
        "kept": round(n_blocks * (forward + backward), 1),
        "all_recomputed_lean": round(n_blocks * (forward + backward + recompute), 1),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="C,A")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-out/blocks"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        rows.append(measure(case, args.workdir, args.reps))
        gc.collect()  # the case's model, freed when measure returned
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "block_costs.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        ms, derived = row["ms_per_block"], row["derived_ms_per_block"]
        print(f"{row['case']} ({row['shape']}, {row['batch']} x {row['seq']}): per block forward {derived['forward']} ms "
              f"(attention {ms['attention_forward']}, MLP {ms['mlp_forward']}), backward {derived['backward']}, "
              f"lean recompute {derived['recompute_lean']} (attention {100 * derived['recompute_attention_share']:.0f} %), "
              f"{100 * derived['recompute_over_kept_block']:.0f} % of a kept block's forward + backward")
        print(f"  wide projections' adapters joined / unjoined: gate {ms['gate_proj']} / {ms['gate_proj_unjoined']} ms, "
              f"MLP forward {ms['mlp_forward']} / {ms['mlp_forward_unjoined']}, "
              f"backward {ms['mlp_backward']} / {ms['mlp_backward_unjoined']}")
        if "down_proj_matmul_float8" in ms:
            print("  float8 matmul against bf16 (x quantized at each call / beforehand): "
                  + ", ".join(f"{p} {ms[f'{p}_proj_matmul_only'] / ms[f'{p}_proj_matmul_float8']:.2f}x / "
                              f"{ms[f'{p}_proj_matmul_only'] / ms[f'{p}_proj_matmul_float8_prequantized']:.2f}x"
                              for p in ("q", "down"))
                  + f" (relative error {row['down_proj_float8_relative_error']})")


if __name__ == "__main__":
    main()

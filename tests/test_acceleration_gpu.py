"""The fast paths on a real GPU: same loss and LoRA gradients as the plain bf16-autocast recipe."""

from __future__ import annotations

import pytest
import torch

from qlorapipe import acceleration, modeling
from qlorapipe.params import AccelerationParams, LoraParams, QuantizationParams

pytestmark = pytest.mark.gpu


def _loss_and_grads(model, input_ids, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return float(loss), grads


def _tiny_lora(tiny_qwen2_dir, params: AccelerationParams | None, dropout: float = 0.0):
    """The tiny Qwen2 in 4-bit with LoRA (B non-zero), training mode; ``params``' levers applied unless None."""
    device = torch.device("cuda")
    model, dtype = modeling.load_base_model(tiny_qwen2_dir, QuantizationParams(), device)
    assert dtype in (torch.bfloat16, torch.float16)
    torch.manual_seed(0)
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, dropout=dropout), quantized=True,
                              gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.train()
    if params is not None:
        acceleration.apply(model, params, device, dtype)
    return model, dtype


@pytest.mark.parametrize("params", [AccelerationParams(), AccelerationParams(uncheckpointed_layers=1)])
def test_fast_paths_match_the_plain_recipe_on_cuda(tiny_qwen2_dir, params):
    device = torch.device("cuda")
    model, dtype = _tiny_lora(tiny_qwen2_dir, None)
    input_ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids, autocast=True)
    applied = acceleration.apply(model, params, device, dtype)
    assert {"keep_frozen_dtype", "lora_fast_forward", "chunked_cross_entropy", "fused_kernels"} <= set(applied)
    assert sum(type(m).__name__.endswith("RMSNorm") and "forward" in vars(m) for m in model.modules()) > 2
    loss, grads = _loss_and_grads(model, input_ids, autocast=False)
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)  # bfloat16 rounding
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("packed", [False, True])
def test_a_graphed_step_computes_the_eager_loss_and_accumulates_the_eager_gradients(tiny_qwen2_dir, packed):
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams())
    trainable = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    generator = torch.Generator(device).manual_seed(0)
    batches = [torch.randint(4, 300, (2, 64), device=device, generator=generator) for _ in range(3)]
    positions = torch.cat([torch.arange(40), torch.arange(24)]).repeat(2, 1).to(device)

    def inputs(ids):
        return {"input_ids": ids, **({"position_ids": positions} if packed else {})}

    # Eager: two micro-batches of one step accumulate half of each gradient.
    model.zero_grad(set_to_none=True)
    eager_losses = []
    for ids in batches[1:]:
        loss = model(**inputs(ids), labels=ids).loss
        (loss / 2).backward()
        eager_losses.append(float(loss))
    del loss  # a live autograd graph would tie the gradient accumulators to this stream
    eager = torch.cat([p.grad.flatten() for p in trainable])

    graphed = acceleration.GraphedStep(model)
    model.zero_grad(set_to_none=True)
    assert graphed(inputs(batches[0]), batches[0], 0.5) is not None  # captured on another batch
    for p in trainable:
        p.grad.zero_()
    losses = [float(graphed(inputs(ids), ids, 0.5)) for ids in batches[1:]]
    assert graphed.failed is None and graphed.replays == 3
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    replayed = torch.cat([p.grad.flatten() for p in trainable])
    assert torch.allclose(replayed, eager, rtol=1e-3, atol=1e-6)
    # Another shape is declined (the caller runs it eagerly), not captured again.
    assert graphed(inputs(batches[0][:1]), batches[0][:1], 0.5) is None


def test_the_train_stage_replays_cuda_graphs_and_reports_it(tmp_path, tiny_qwen2_dir, corpus_file):
    import json

    from conftest import load_stage, tiny_params, train_args, write_params

    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_qwen2_dir, corpus_file, **{
        "training.max_steps": 4, "training.gradient_accumulation_steps": 2, "model.dtype": "bfloat16"}))
    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "base")])
    load_stage("prepare").main(["--params", str(params), "--base", str(tmp_path / "base"), "--out",
                                str(tmp_path / "data"), "--report", str(tmp_path / "data.json"),
                                "--lengths", str(tmp_path / "l.csv"), "--lengths-plot", str(tmp_path / "l.png")])
    load_stage("train").main(train_args(params, tmp_path / "base", tmp_path / "data", tmp_path))
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["cuda_graph_replays"] >= 6  # 8 micro-batches; a short last one may run eagerly
    assert metrics["eval_loss"] < 20


def test_a_step_that_cannot_be_captured_runs_eagerly_and_training_goes_on(tiny_qwen2_dir, caplog):
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams())
    def read_on_host(module, inputs, output):  # a host read of a GPU value, as some layers do: not capturable
        float(output.sum())

    hook = model.get_base_model().model.norm.register_forward_hook(read_on_host)
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(1))
    graphed = acceleration.GraphedStep(model)
    model.zero_grad(set_to_none=True)
    assert graphed({"input_ids": ids}, ids, 1.0) is None
    assert graphed.failed and "CUDA graphs off" in caplog.text
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)
    loss = model(input_ids=ids, labels=ids).loss  # the eager step after the failed capture
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert graphed({"input_ids": ids}, ids, 1.0) is None  # it does not try again
    hook.remove()

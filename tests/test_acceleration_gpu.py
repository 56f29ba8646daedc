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


@pytest.mark.parametrize("params", [AccelerationParams(), AccelerationParams(uncheckpointed_layers=1)])
def test_fast_paths_match_the_plain_recipe_on_cuda(tiny_qwen2_dir, params):
    device = torch.device("cuda")
    model, dtype = modeling.load_base_model(tiny_qwen2_dir, QuantizationParams(), device)
    assert dtype in (torch.bfloat16, torch.float16)
    torch.manual_seed(0)
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, dropout=0.0), quantized=True,
                              gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.train()
    input_ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids, autocast=True)
    applied = acceleration.apply(model, params, device, dtype)
    assert {"keep_frozen_dtype", "lora_fast_forward", "chunked_cross_entropy"} <= set(applied)
    loss, grads = _loss_and_grads(model, input_ids, autocast=False)
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)  # bfloat16 rounding
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

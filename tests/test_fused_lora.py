"""The fused LoRA autograd functions: the unfused function and gradients, less kept for backward (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_under_triton_interpreter, tiny_lora_model

from qlorapipe.train.fast import fused_lora, lora_forward
from qlorapipe.train.fast.checkpointing import decoder_layers


def _base(kind: str, in_features: int, out_features: int, bias: bool = False, nested: bool = True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    if kind == "linear":
        return linear.requires_grad_(False)
    import bitsandbytes as bnb

    quantized = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                                  quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=nested)
    if bias:
        quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized.to("cpu")


def _mask(p: float, torch_seed: int, shape) -> torch.Tensor:
    """The mask the fused function draws after torch.manual_seed(torch_seed), scaled by 1 / (1 - p)."""
    torch.manual_seed(torch_seed)
    return fused_lora.dropout(torch.ones(shape), p, fused_lora.new_seed("cpu"))


def _lora(in_features, out_features, rank=4):
    generator = torch.Generator().manual_seed(1)
    lora_a = (torch.randn(rank, in_features, generator=generator) * 0.2).requires_grad_()
    lora_b = (torch.randn(out_features, rank, generator=generator) * 0.2).requires_grad_()
    return lora_a, lora_b


def _assert_lora_linear_matches(base, lora_a, lora_b, x, grad_out, p, mask_for, tol=1e-5):
    """LoraLinear's output and gradients equal base(x) + (x * mask) @ A^T @ B^T * 2 and its
    gradients, where ``mask_for(seed)`` redraws the layer's mask from the seed it drew."""
    torch.manual_seed(7)
    out = fused_lora.LoraLinear.apply(x, lora_a, lora_b, base, 2.0, p)
    out.backward(grad_out)
    got = [out.detach(), x.grad, lora_a.grad, lora_b.grad]
    for tensor in (x, lora_a, lora_b):
        tensor.grad = None
    torch.manual_seed(7)
    mask = mask_for(fused_lora.new_seed("cpu")) if p > 0 else 1.0
    ref = base(x) + (x * mask) @ lora_a.t() @ lora_b.t() * 2.0
    ref.backward(grad_out)
    for value, expected in zip(got, [ref.detach(), x.grad, lora_a.grad, lora_b.grad], strict=True):
        assert torch.allclose(value, expected, atol=tol, rtol=1e-4)
    return got


@pytest.mark.parametrize("kind,bias", [("linear", False), ("nf4", False), ("nf4", True)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_is_the_unfused_function_with_its_gradients(kind, bias, p):
    base = _base(kind, 16, 24, bias)
    lora_a, lora_b = _lora(16, 24)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_out = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(3))
    got = _assert_lora_linear_matches(base, lora_a, lora_b, x, grad_out, p,
                                      lambda seed: fused_lora.dropout(torch.ones(15, 16), p, seed).view(3, 5, 16))
    if p > 0:  # the mask really drops: the function differs from the undropped one
        assert not torch.allclose(got[0], base(x) + x @ lora_a.t() @ lora_b.t() * 2.0, atol=1e-3)


def check_dropout_draws() -> None:
    """The same seed redraws the same mask at the rate asked; the backward form applies it too."""
    seed = torch.tensor([12345])
    x = torch.randn(200, 301)  # not a multiple of the kernel's block: the tail is masked too
    first, second = fused_lora.dropout(x, 0.25, seed), fused_lora.dropout(x, 0.25, seed)
    assert torch.equal(first, second)
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(first[kept], x[kept] / 0.75)
    # every quarter of the kernel's block draws its own uniforms (no repeated pattern)
    assert not torch.equal(kept.flatten()[:512], kept.flatten()[512:1024])
    other = fused_lora.dropout(x, 0.25, torch.tensor([54321]))
    assert not torch.equal(first, other)
    # the backward form: the same mask on a gradient, added in place, with or without x
    grad, into = torch.randn(200, 301), torch.ones(200, 301)
    again = fused_lora.dropout(x, 0.25, seed, grad, into)
    assert torch.equal(again, first)
    assert torch.allclose(into, torch.where(kept, grad / 0.75, 0.0) + 1, atol=1e-6)
    only = torch.zeros(200, 301)
    assert fused_lora.dropout(None, 0.25, seed, grad, only) is None
    assert torch.allclose(only, into - 1, atol=1e-6)


def test_the_same_seed_draws_the_same_mask_at_the_rate_asked():
    check_dropout_draws()


@pytest.mark.parametrize(("p", "kept"), [(1e-7, 1.0), (0.5, 0.5), (1 - 1e-6, 1 / 65536), (1 - 1e-7, 0.0)])
def test_the_cpu_mask_keeps_at_the_rate_of_its_16_bit_threshold_up_to_the_ends(p, kept):
    """p to 1/65536: below half a step everything is kept, within half a step of 1 nothing (no int16 wrap)."""
    mask = fused_lora._keep_mask((512, 1024), p, torch.tensor([7]), "cpu")
    assert mask.dtype == torch.bool and mask.shape == (512, 1024)
    for dtype in (torch.bfloat16, torch.float32):  # the same mask as 0 and 1 in the dtype dropout multiplies in
        assert torch.equal(fused_lora._keep_mask((512, 1024), p, torch.tensor([7]), "cpu", dtype), mask.to(dtype))
    assert abs(mask.float().mean().item() - kept) < 0.005
    if kept in (0.0, 1.0):
        assert bool(mask.all()) == (kept == 1.0) and bool(mask.any()) == (kept == 1.0)


def test_the_cpu_dropout_in_bfloat16_rounds_once_as_float32_would():
    """x * mask / (1 - p) and into + grad * mask / (1 - p), each computed in float32 and rounded once."""
    seed, p = torch.tensor([11]), 0.1
    generator = torch.Generator().manual_seed(3)
    x, grad = (torch.randn(64, 256, generator=generator).to(torch.bfloat16) for _ in range(2))
    start = torch.randn(64, 256, generator=generator).to(torch.bfloat16)
    into = start.clone()
    dropped = fused_lora.dropout(x, p, seed, grad, into)
    keep = fused_lora._keep_mask(x.shape, p, seed, "cpu")
    assert torch.equal(dropped, torch.where(keep, x.float() / (1 - p), 0.0).to(torch.bfloat16))
    # float32's a + alpha * b may fuse its multiply-add: the two roundings of the reference tip a few
    # elements; rounding alpha to bfloat16 first (a bfloat16 add_) moved 28 % of them.
    expected = (start.double() + torch.where(keep, grad.double() / (1 - p), 0.0)).to(torch.bfloat16)
    assert (into != expected).float().mean().item() < 0.005


def test_the_triton_dropout_kernel_draws_masks_the_same_way():
    """The kernel the GPU runs, under Triton's interpreter on CPU tensors."""
    run_under_triton_interpreter("import test_fused_lora as t; t.check_dropout_draws()")


def fused_mask(m: int, k: int, r: int, p: float, seed: torch.Tensor, device="cpu", dtype=torch.float32):
    """The mask (times 1 / (1 - p)) the fused LoRA-dropout kernels draw from ``seed``: the input
    gradient of a rank-r A whose first row is ones, from a one-hot gradient."""
    one_hot = torch.zeros(m, r, device=device, dtype=dtype)
    ones = torch.zeros(r, k, device=device, dtype=dtype)
    one_hot[:, 0], ones[0] = 1.0, 1.0
    mask = torch.zeros(m, k, device=device, dtype=torch.float32)
    fused_lora.lora_input_grad_(mask, one_hot, ones, p, seed)
    return mask


def check_fused_dropout_kernels(device="cpu", dtype=torch.float32, tol=1e-4) -> None:
    """The three LoRA-dropout kernels draw one mask, the one the LoRA layer's gradients use."""
    torch.manual_seed(0)
    m, k, r, p = 70, 256, 16, 0.3  # 70 rows: blocks and splits end part-way
    x, a, grad_hidden = (torch.randn(m, k, device=device).to(dtype), (torch.randn(r, k, device=device) * 0.1).to(dtype),
                         torch.randn(m, r, device=device).to(dtype))
    seed = torch.tensor([77], device=device)
    assert fused_lora.fuses_dropout(x, a) and not fused_lora.fuses_dropout(x[:, :200].contiguous(), a)
    mask = fused_mask(m, k, r, p, seed, device, dtype)
    kept = mask != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    assert torch.allclose(mask[kept], torch.tensor(1 / (1 - p), device=device))
    assert not torch.equal(kept[:, :128], kept[:, 128:]) and not torch.equal(kept[:35], kept[35:])
    assert not torch.equal(fused_mask(m, k, r, p, torch.tensor([78], device=device), device, dtype), mask)
    dropped = (x.float() * mask).to(dtype)
    assert torch.allclose(fused_lora.lora_down(x, a, p, seed).float(), (dropped @ a.t()).float(), atol=tol, rtol=tol)
    assert torch.allclose(fused_lora.lora_down_grad(grad_hidden, x, p, seed),
                          grad_hidden.t().float() @ dropped.float(), atol=tol, rtol=tol)
    grad = torch.randn(m, k, device=device).to(dtype)
    want = grad.float() + (grad_hidden.float() @ a.float()) * mask
    fused_lora.lora_input_grad_(grad, grad_hidden, a, p, seed)
    assert torch.allclose(grad.float(), want, atol=tol, rtol=tol)
    if device != "cpu":
        return
    # the LoRA layer takes them, forward and backward, with the mask its seed draws
    base = _base("nf4", k, 24, bias=True)
    lora_a, lora_b = _lora(k, 24, rank=16)
    x3 = torch.randn(2, 35, k, requires_grad=True)
    grad_out = torch.randn(2, 35, 24)
    _assert_lora_linear_matches(base, lora_a, lora_b, x3, grad_out, p,
                                lambda seed: fused_mask(70, k, 16, p, seed).view(2, 35, k), tol=1e-4)


def test_the_fused_lora_dropout_kernels_draw_one_mask():
    """Under Triton's interpreter on CPU tensors."""
    run_under_triton_interpreter("import test_fused_lora as t; t.check_fused_dropout_kernels()")


def check_joined_wide_adapter() -> None:
    """A wide NF4 projection (more outputs than inputs) folds its adapter into the base matmul: the
    dequantization kernel writes exactly bitsandbytes' values into the first K columns of a wider buffer,
    and the layer is still the unfused function with its gradients."""
    for nested in (True, False):
        base = _base("nf4", 64, 160, nested=nested)
        assert base.weight.quant_state.nested is nested
        for dtype in (torch.float32, torch.bfloat16):
            wide = torch.full((160, 64 + 16), float("nan"), dtype=dtype)
            fused_lora.dequantize_into(base, wide[:, :64])
            want = fused_lora.frozen_weight(base, dtype)
            if dtype == torch.float32:
                assert torch.equal(wide[:, :64], want)
            else:  # the interpreter rounds to bfloat16 toward zero; CUDA is exact (tests/test_acceleration_gpu.py)
                assert torch.allclose(wide[:, :64].float(), want.float(), rtol=2 ** -7, atol=0)
            assert wide[:, 64:].isnan().all()  # nothing written past the weight's columns
        lora_a, lora_b = _lora(64, 160, rank=16)
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        assert fused_lora.joins(x.detach().reshape(10, 64), base, lora_b)
        assert not fused_lora.joins(torch.zeros(10, 160), _base("nf4", 160, 64), _lora(160, 64, rank=16)[1])
        grad_out = torch.randn(2, 5, 160, generator=torch.Generator().manual_seed(3))
        for p in (0.0, 0.3):
            _assert_lora_linear_matches(base, lora_a, lora_b, x, grad_out, p,
                                        lambda seed: fused_lora.dropout(torch.ones(10, 64), p, seed).view(2, 5, 64),
                                        tol=1e-4)
            x.grad = lora_a.grad = lora_b.grad = None  # the reference's, left by the check


def test_wide_nf4_projections_fold_their_adapter_into_the_base_matmul():
    """Under Triton's interpreter on CPU tensors (the GPU tests run it on CUDA)."""
    run_under_triton_interpreter("import test_fused_lora as t; t.check_joined_wide_adapter()")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_swiglu_lora_linear_is_down_of_silu_gate_times_up_with_its_gradients(p):
    base = _base("nf4", 32, 8)
    lora_a, lora_b = _lora(32, 8)
    generator = torch.Generator().manual_seed(4)
    gate = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    up = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 6, 8, generator=generator)
    torch.manual_seed(9)
    out = fused_lora.SwigluLoraLinear.apply(gate * 1, up * 1, lora_a, lora_b, base, 0.5, p)
    out.backward(grad_out)
    got = [out.detach(), gate.grad, up.grad, lora_a.grad, lora_b.grad]
    for tensor in (gate, up, lora_a, lora_b):
        tensor.grad = None
    product = torch.nn.functional.silu(gate) * up
    mask = _mask(p, 9, (12, 32)).view(2, 6, 32) if p > 0 else 1.0
    ref = base(product) + (product * mask) @ lora_a.t() @ lora_b.t() * 0.5
    ref.backward(grad_out)
    for value, expected in zip(got, [ref.detach(), gate.grad, up.grad, lora_a.grad, lora_b.grad], strict=True):
        assert torch.allclose(value, expected, atol=1e-5, rtol=1e-4)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass of ``fn()``."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def _lora_model(model_dir, dropout: float, checkpointing: bool = True):
    return tiny_lora_model(model_dir, dropout=dropout, gradient_checkpointing=checkpointing)[0]


def test_a_fused_block_keeps_far_less_for_backward_than_peft(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir, dropout=0.1, checkpointing=False)
    block = decoder_layers(model)[0]
    hidden = torch.randn(2, 64, model.config.hidden_size, requires_grad=True)
    position_embeddings = model.get_base_model().model.rotary_emb(hidden, torch.arange(64)[None].expand(2, 64))

    def run():
        block(hidden, position_embeddings=position_embeddings)

    peft_bytes = _saved_bytes(run)
    assert lora_forward.use_fast_lora_forward(model)
    fused_bytes = _saved_bytes(run)
    # peft keeps each of the 7 projections' dropped-out input and mask; the fused layers keep
    # the inputs the block holds anyway.
    assert fused_bytes < 0.75 * peft_bytes, (fused_bytes, peft_bytes)


def test_checkpointed_blocks_redraw_the_masks_of_their_forward_pass(tiny_llama_dir):
    """Same seeds, with and without recomputation: the same loss and gradients, so the
    backward pass used the forward pass's masks; and dropout really acts."""
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (True, False):
        model = _lora_model(tiny_llama_dir, dropout=0.3, checkpointing=checkpointing)
        assert lora_forward.use_fast_lora_forward(model)
        torch.manual_seed(11)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results.append((loss.detach(), grads))
        model.eval()
        with torch.no_grad():
            undropped = model(input_ids=input_ids, labels=input_ids).loss
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(results[0][0], undropped, atol=1e-4)

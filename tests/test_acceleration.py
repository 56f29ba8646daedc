"""The GPU fast paths: switches, and that each computes the plain function (pure-PyTorch parts on CPU)."""

from __future__ import annotations

import contextlib
import logging
import math
import types

import pytest
import torch
from conftest import run_under_triton_interpreter, tiny_lora_model
from transformers.modeling_layers import GradientCheckpointingLayer

from qlorapipe.errors import UserError
from qlorapipe.params import AccelerationParams, parse_section
from qlorapipe.train import fast
from qlorapipe.train.fast import (
    checkpointing,
    chunked_loss,
    cuda_graphs,
    frozen_dtype,
    fused_kernels,
    fused_lora,
    lean_recompute,
    lora_forward,
    memory_plan,
    offload,
)


def _quantized_lora_model(model_dir, seed=0, load_in="4bit"):
    return tiny_lora_model(model_dir, seed=seed, load_in=load_in)


def _loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return loss.detach(), grads


def test_params_defaults_turn_the_function_preserving_levers_on():
    params = parse_section("acceleration", {})
    assert params == AccelerationParams()
    assert params.keep_frozen_dtype and params.lora_fast_forward and params.chunked_cross_entropy
    assert params.uncheckpointed_layers == "auto" and params.memory_budget_gb is None and not params.compile_layers
    assert params.host_kept_layers == "auto"  # timed only where memory is short (CUDA); every block fitting: none


def test_params_refuse_bad_values_naming_the_key():
    with pytest.raises(UserError, match=r"acceleration.uncheckpointed_layers must be an integer >= 0 .* or 'auto'"):
        parse_section("acceleration", {"uncheckpointed_layers": -1})
    with pytest.raises(UserError, match="did you mean 'chunked_cross_entropy'"):
        parse_section("acceleration", {"chunked_cross_entropy_loss": True})
    with pytest.raises(UserError, match="acceleration.compile_layers: must be true or false"):
        parse_section("acceleration", {"compile_layers": "yes"})


def test_uncheckpointed_layers_take_a_count_or_auto_with_a_memory_budget():
    assert parse_section("acceleration", {"uncheckpointed_layers": "auto"}).uncheckpointed_layers == "auto"
    assert parse_section("acceleration", {"uncheckpointed_layers": 28}).uncheckpointed_layers == 28
    assert parse_section("acceleration", {"uncheckpointed_layers": 0}).uncheckpointed_layers == 0
    # YAML or `dvc exp run -S acceleration.memory_budget_gb=12.5` may give the number as a string.
    assert parse_section("acceleration", {"memory_budget_gb": "12.5"}).memory_budget_gb == 12.5
    assert parse_section("acceleration", {"memory_budget_gb": 40}).memory_budget_gb == 40.0
    assert parse_section("acceleration", {"memory_budget_gb": None}).memory_budget_gb is None
    for bad in ("all", "Auto", 2.5, True, [4]):
        with pytest.raises(UserError, match=r"acceleration.uncheckpointed_layers: must be an integer or 'auto', got"):
            parse_section("acceleration", {"uncheckpointed_layers": bad})
    with pytest.raises(UserError, match=r"acceleration.memory_budget_gb: must be a finite number or null"):
        parse_section("acceleration", {"memory_budget_gb": float("nan")})
    for bad in (0, -1.5):
        with pytest.raises(UserError, match=r"acceleration.memory_budget_gb must be > 0 \(GB\) or null"):
            parse_section("acceleration", {"memory_budget_gb": bad})
    with pytest.raises(UserError, match="acceleration.memory_budget_gb: must be a number or null, got 'lots'"):
        parse_section("acceleration", {"memory_budget_gb": "lots"})
    # The dataclass built directly is checked the same way.
    assert AccelerationParams(uncheckpointed_layers="all").check() == [
        "acceleration.uncheckpointed_layers must be an integer >= 0 (0 checkpoints every block) or 'auto' "
        "(as many as fit in acceleration.memory_budget_gb), got 'all'"]


def test_blocks_within_budget_is_the_most_blocks_on_the_measured_line():
    # Qwen2.5-3B at 4,096 tokens on an H200: 10.90 GB with 24 blocks kept, 0.31 GB a block.
    assert memory_plan.blocks_within_budget(10.90, 24, 0.31, 12.35, 36) == 28  # 12.14 GB measured with 28
    assert memory_plan.blocks_within_budget(3.79, 1, 0.31, 12.35, 36) == 28  # the same line from one block
    assert memory_plan.blocks_within_budget(10.90, 24, 0.31, 10.90, 36) == 24  # exactly on the budget
    assert memory_plan.blocks_within_budget(10.90, 24, 0.31, 10.89, 36) == 23
    assert memory_plan.blocks_within_budget(3.79, 1, 0.25, 3.79 + 3 * 0.25, 36) == 4  # a float sum, kept
    assert memory_plan.blocks_within_budget(10.90, 24, 0.31, 80.0, 36) == 36  # clamped to the blocks there are
    assert memory_plan.blocks_within_budget(10.90, 24, 0.31, float("inf"), 36) == 36
    assert memory_plan.blocks_within_budget(3.79, 1, 0.31, 3.0, 36) == 0  # not even the line fits: none
    assert memory_plan.blocks_within_budget(4.0, 2, 0.0, 5.0, 6) == 6  # nothing measurable per block: all fit
    assert memory_plan.blocks_within_budget(4.0, 2, -0.001, 3.0, 6) == 0  # ... unless the peak itself does not


def _checkpointing_flags(model):
    return [(layer.gradient_checkpointing, "_qlorapipe_uncheckpointed" in vars(layer))
            for layer in checkpointing.decoder_layers(model)]


def test_fitting_to_a_gpu_budget_does_nothing_on_the_cpu(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    before = _checkpointing_flags(model)
    assert before == [(True, False), (True, False)]
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    cpu = torch.device("cpu")
    assert memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids}, ids, None, cpu) == (0, {})
    assert memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids}, ids, 1.0, cpu) == (0, {})
    assert _checkpointing_flags(model) == before


def test_auto_on_the_cpu_keeps_every_block_host_memory_holds_computing_the_same_step(tiny_llama_dir):
    # LoRA dropout draws masks in the step: the probe must not draw any of its own.
    checkpointed, _ = tiny_lora_model(tiny_llama_dir, seed=5, dropout=0.1)
    model, _ = tiny_lora_model(tiny_llama_dir, seed=5, dropout=0.1)
    assert any(isinstance(module, torch.nn.Dropout) for module in model.modules())
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    expected_loss, expected_grads = _loss_and_grads(checkpointed, ids)
    checkpointed.zero_grad(set_to_none=True)
    model.eval()
    modes = [module.training for module in model.modules()]
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    kept = memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(), {"input_ids": ids, "labels": ids},
                                                  torch.device("cpu"))
    assert kept == 2 and _checkpointing_flags(model) == [(False, True), (False, True)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert [module.training for module in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    model.train()
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, expected_loss) and torch.equal(grads, expected_grads)


def test_auto_on_the_cpu_counts_what_a_block_saves_and_keeps_what_fits(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    config = model.config
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    kept, measured = memory_plan.fit_on_host(model, {"input_ids": ids}, ids, available=1e12)
    per_block, rest = measured["per_block_bytes"], measured["rest_bytes"]
    # At least each linear layer's float32 input: attention's and the MLP's (normed hidden), o_proj's, down_proj's.
    assert per_block >= ids.numel() * (3 * config.hidden_size + config.intermediate_size) * 4
    # Outside the blocks, at least the float32 logits the loss saves.
    assert rest >= ids.numel() * config.vocab_size * 4
    assert kept == 2 and measured == {"per_block_bytes": per_block, "rest_bytes": rest, "room_bytes": 0.5e12,
                                      "kept": 2, "n_blocks": 2}
    # The probe runs one row and scales by the rows: a real two-row pass saves a little less (what the rows
    # share, such as RoPE's tables, counts once there), so the scaled figure is a near upper bound.
    layers = checkpointing.decoder_layers(model)
    checkpointing.checkpoint_again(layers)
    block, everything = memory_plan.saved_bytes(model, {"input_ids": ids}, ids, layers[-1])
    assert block <= per_block <= 1.05 * block and everything - block <= rest <= 1.05 * (everything - block)
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    assert _checkpointing_flags(model) == [(True, False), (True, False)]

    # Packed rows (position_ids restarting within a row) are probed too, on the row holding the most examples.
    positions = torch.stack([torch.arange(16), torch.cat([torch.arange(8), torch.arange(8)])])
    _, packed = memory_plan.fit_on_host(model, {"input_ids": ids, "position_ids": positions}, ids, available=1e12)
    assert packed["kept"] == 2 and packed["per_block_bytes"] >= per_block and packed["rest_bytes"] >= rest

    for room, expected in ((rest + 1.5 * per_block, [(True, False), (False, True)]),
                           (rest + 0.5 * per_block, [(True, False), (True, False)]),
                           (0.5 * rest, [(True, False), (True, False)])):
        model, _ = _quantized_lora_model(tiny_llama_dir)
        kept, _ = memory_plan.fit_on_host(model, {"input_ids": ids}, ids, available=room / memory_plan.HOST_SHARE)
        assert kept == sum(not flag for flag, _ in expected) and _checkpointing_flags(model) == expected


def test_the_cpu_probe_leaves_no_trace_when_the_forward_pass_fails(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    model.eval()
    layers = checkpointing.decoder_layers(model)
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises((ValueError, RuntimeError)):
        memory_plan.fit_on_host(model, {"input_ids": ids}, ids[:, :5], available=1e12)  # labels of another length
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    assert _checkpointing_flags(model) == [(True, False), (True, False)]
    assert not any(module.training for module in model.modules())


def test_the_cpu_probe_keeps_every_block_checkpointed_where_it_cannot_count(tiny_llama_dir):
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    eight_bit, _ = _quantized_lora_model(tiny_llama_dir, load_in="8bit")
    assert memory_plan.fit_on_host(eight_bit, {"input_ids": ids}, ids, available=1e12) == (
        0, {"why_none": "8-bit layers keep their inputs where the probe cannot count them"})
    model, _ = _quantized_lora_model(tiny_llama_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_plan, "host_available", lambda: None)
        assert memory_plan.fit_on_host(model, {"input_ids": ids}, ids) == (
            0, {"why_none": "no figure for the host memory available"})
    # A last block the forward pass never runs (here: taken out of the model's layer list) is not counted as empty.
    inner = model.base_model.model.model
    last = inner.layers[-1]
    inner.layers = inner.layers[:-1]
    inner.config.num_hidden_layers -= 1
    model.add_module("unused_block", last)
    assert memory_plan.fit_on_host(model, {"input_ids": ids}, ids, available=1e12) == (
        0, {"why_none": "the last block saved nothing in a forward pass"})
    assert _checkpointing_flags(model) == [(True, False), (True, False)]


def test_a_count_of_uncheckpointed_layers_applies_on_the_cpu(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    cpu = torch.device("cpu")
    assert memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(uncheckpointed_layers=1), batch, cpu) == 1
    assert _checkpointing_flags(model) == [(True, False), (False, True)]
    model, _ = _quantized_lora_model(tiny_llama_dir)
    assert memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(), batch, cpu, num_processes=2) == 0
    assert _checkpointing_flags(model) == [(True, False), (True, False)]


class _Block(GradientCheckpointingLayer):
    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = True


class _BlocksModel(torch.nn.Module):
    """Decoder blocks that only carry their checkpointing flag, and a loss from one weight."""

    def __init__(self, n_blocks: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(n_blocks))
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, input_ids, labels):
        return types.SimpleNamespace(loss=(self.weight * input_ids).sum())


def _simulated_gpu(monkeypatch, model, peak_gb, capacity_gb=math.inf, free_gb=100.0) -> list[int]:
    """torch.cuda's memory calls answering ``peak_gb(blocks kept)`` for each step ``model`` runs.

    Returns:
        The list each step's count of kept blocks is appended to.
    """
    steps = []

    def max_memory_allocated(device=None):
        kept = sum(not block.gradient_checkpointing for block in model.blocks)
        steps.append(kept)
        if peak_gb(kept) > capacity_gb:
            raise torch.cuda.OutOfMemoryError("simulated")
        return peak_gb(kept) * 1e9

    calls = {"max_memory_allocated": max_memory_allocated, "reset_peak_memory_stats": lambda device=None: None,
             "synchronize": lambda device=None: None, "empty_cache": lambda: None,
             "memory_allocated": lambda device=None: 0, "mem_get_info": lambda device=None: (free_gb * 1e9, 0)}
    for name, call in calls.items():
        monkeypatch.setattr(torch.cuda, name, call)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    return steps


def _h200_peak(kept: int) -> float:
    """Qwen2.5-3B at 4,096 tokens on an H200: 3.79 GB all checkpointed, then 0.31 GB a block past the first."""
    return 3.79 + max(kept - 1, 0) * 0.31


def _fit(model, budget_gb):
    ids = torch.ones(3)
    return memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids}, ids, budget_gb, torch.device("cuda", 0))


def test_the_probe_keeps_the_blocks_the_measured_line_fits_in_the_budget(monkeypatch):
    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, _h200_peak)
    model.eval()
    grad = model.weight.grad = torch.full((3,), 7.0)
    kept, measured = _fit(model, 12.35)
    assert kept == 28 and steps == [36, 0, 1, 2, 28]  # all kept, 0, 1 and 2, then the count predicted
    assert [block.gradient_checkpointing for block in model.blocks] == [True] * 8 + [False] * 28
    assert checkpointing.uncheckpointed_count(model) == 28
    assert measured == {"peak_all_checkpointed_gb": 3.79, "per_block_gb": 0.31, "budget_gb": 12.35, "kept": 28,
                        "n_blocks": 36, "peak_gb": 12.16}
    assert model.weight.grad is grad and not model.training and not model.blocks[0].training  # put back


def test_the_probe_measures_one_step_when_every_block_kept_fits(monkeypatch):
    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, _h200_peak)
    kept, measured = _fit(model, 14.7)  # 36 kept: 3.79 + 35 * 0.31 = 14.64 GB
    assert kept == 36 and steps == [36] and checkpointing.uncheckpointed_count(model) == 36
    assert measured == {"peak_all_checkpointed_gb": None, "per_block_gb": None, "budget_gb": 14.7, "kept": 36,
                        "n_blocks": 36, "peak_gb": 14.64}
    assert not offload.offloaded(model)
    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, _h200_peak)
    kept, measured = _fit(model, 14.6)  # just below: the line is drawn, and it keeps 35
    assert kept == 35 and steps == [36, 0, 1, 2, 35] and measured["peak_all_checkpointed_gb"] == 3.79


def test_the_probe_steps_down_until_a_measured_peak_fits(monkeypatch):
    # Each block costing a little more than the last: the line from blocks 1 and 2 predicts too many.
    def peak(kept):
        return 3.0 + 0.25 * kept + 0.004 * kept**2

    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, peak)
    kept, measured = _fit(model, 10.0)
    assert steps == [36, 0, 1, 2, 26, 19] and kept == 19  # 26 peaks at 12.2 GB; the line through it and 2 gives 19
    assert peak(kept) <= 10.0 < peak(21) and measured["peak_gb"] == round(peak(19), 3)


def test_the_probe_halves_the_way_down_when_a_step_runs_out_of_memory(monkeypatch):
    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, _h200_peak, capacity_gb=8.0, free_gb=100.0)
    kept, measured = _fit(model, None)  # 90% of (100 GB free + nothing allocated): more than the GPU holds
    assert measured["budget_gb"] == 90.0
    assert steps == [36, 0, 1, 2, 19, 10] and kept == 10  # 36 and 19 ran out of memory


def test_the_probe_keeps_every_block_checkpointed_below_the_budget(monkeypatch):
    model = _BlocksModel(36)
    steps = _simulated_gpu(monkeypatch, model, _h200_peak)
    kept, measured = _fit(model, 3.5)
    assert kept == 0 and steps == [36, 0, 1, 2] and measured["peak_all_checkpointed_gb"] == 3.79
    assert all(block.gradient_checkpointing for block in model.blocks)
    one = _BlocksModel(1)
    _simulated_gpu(monkeypatch, one, _h200_peak)
    assert _fit(one, 12.35)[0] == 1 and not one.blocks[0].gradient_checkpointing


def test_the_probe_offloads_checkpointed_inputs_when_recomputing_every_block_is_above_the_budget(monkeypatch):
    model = _BlocksModel(36)
    for block in model.blocks:
        block._gradient_checkpointing_func = lambda run, *args: run(*args)

    def peak(kept):  # offloaded: 36 blocks' inputs of 17 MB less
        return _h200_peak(kept) - (0.6 if offload.offloaded(model) else 0.0)

    steps = _simulated_gpu(monkeypatch, model, peak)
    kept, measured = _fit(model, 3.55)  # offloaded 3.19 GB; the line less the 0.6 GB saved: two blocks at 3.50
    assert kept == 2 and steps == [36, 0, 1, 2, 0, 2] and offload.offloaded(model)
    assert measured["peak_all_checkpointed_gb"] == 3.79 and measured["offloaded"]
    assert measured["peak_offloaded_all_checkpointed_gb"] == 3.19 and measured["peak_gb"] == 3.5
    assert [block.gradient_checkpointing for block in model.blocks] == [True] * 34 + [False] * 2
    fast.remove(model)

    def heavier(kept):  # offloading saves less with each block kept: the line's count peaks over, one fewer fits
        return peak(kept) + (0.2 * kept if offload.offloaded(model) else 0.0)

    steps = _simulated_gpu(monkeypatch, model, heavier)
    kept, measured = _fit(model, 3.75)  # the line: two (3.50 GB); measured 3.90, then one at 3.39
    assert steps == [36, 0, 1, 2, 0, 2, 1] and kept == 1 and measured["peak_gb"] == round(heavier(1), 3)
    assert checkpointing.uncheckpointed_count(model) == 1 and not model.blocks[-1].gradient_checkpointing
    fast.remove(model)

    def steeper(kept):  # offloading saves 2.79 GB, but each block kept beside it takes 0.6 GB
        return 1.0 + 0.6 * kept if offload.offloaded(model) else _h200_peak(kept)

    steps = _simulated_gpu(monkeypatch, model, steeper, capacity_gb=5.0)
    kept, measured = _fit(model, 3.5)  # the line: seven, out of memory (5.2 GB); halfway down: three at 2.8
    assert steps == [36, 0, 1, 2, 0, 7, 3] and kept == 3 and measured["peak_gb"] == 2.8
    assert checkpointing.uncheckpointed_count(model) == 3
    fast.remove(model)
    steps = _simulated_gpu(monkeypatch, model, peak)
    kept, measured = _fit(model, 3.19)  # no room beside the offloaded step: nothing more measured
    assert steps == [36, 0, 1, 2, 0] and kept == 0 and measured["peak_gb"] == 3.19
    fast.remove(model)
    assert not offload.offloaded(model)
    _simulated_gpu(monkeypatch, model, peak)
    assert "offloaded" not in _fit(model, 4.0)[1]  # every block checkpointed fits: nothing offloaded


def test_auto_is_left_to_the_probe_and_kept_off_with_several_processes(tiny_llama_dir, caplog):
    """No CUDA call is made on these paths, so a CUDA device is named without one."""
    model, dtype = _quantized_lora_model(tiny_llama_dir)
    cuda = torch.device("cuda")
    only_layers = dict(keep_frozen_dtype=False, lora_fast_forward=False, chunked_cross_entropy=False,
                       lean_recompute=False, fused_kernels=False)
    assert fast.apply(model, AccelerationParams(**only_layers), cuda, dtype) == []  # auto: not here
    assert _checkpointing_flags(model) == [(True, False), (True, False)]
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long)}
    with caplog.at_level("INFO", logger="qlorapipe.train.fast"):
        assert memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(), batch, cuda, num_processes=2) == 0
    assert "auto keeps every block checkpointed with 2 processes" in caplog.text
    assert _checkpointing_flags(model) == [(True, False), (True, False)]
    # A count is applied by apply and reported as it is.
    fixed = AccelerationParams(**only_layers, uncheckpointed_layers=1)
    assert fast.apply(model, fixed, cuda, dtype) == ["uncheckpointed_layers=1"]
    assert memory_plan.plan_uncheckpointed_layers(model, fixed, batch, cuda, num_processes=2) == 1
    assert checkpointing.uncheckpointed_count(model) == 1
    fast.remove(model)
    assert _checkpointing_flags(model) == [(True, False), (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_linear_cross_entropy_matches_plain_cross_entropy(dtype, chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 7))
    labels[0, 2] = labels[1, 5] = -100  # ignored positions
    loss = chunked_loss.linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    # transformers' ForCausalLMLoss: shift left, ignore -100, mean, float32 logits.
    logits = (hidden @ weight.t()).float()
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got[0].dtype == torch.float32
    assert torch.allclose(got[0], ref.detach(), rtol=tol, atol=tol)
    assert torch.allclose(got[1].float(), hidden.grad.float(), rtol=tol, atol=tol * 0.1)
    assert torch.allclose(got[2].float(), weight.grad.float(), rtol=tol, atol=tol * 0.1)
    assert got[1].dtype == dtype


def test_the_liger_kernel_loss_is_the_same_function():
    """On CUDA the chunked loss runs liger-kernel's cross-entropy kernel (here under Triton's
    interpreter on CPU tensors): the same loss and gradients, ignored rows included."""
    run_under_triton_interpreter(
        "import torch, test_acceleration as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for rows in (1, 5, 64):\n"
        "        t.test_linear_cross_entropy_matches_plain_cross_entropy(dtype, rows)\n"
        "t.test_linear_cross_entropy_without_weight_grad_and_all_ignored()\n")


def check_fused_rope(model_dir) -> None:
    """liger-kernel's RoPE on the tiny model: the same loss and LoRA gradients; the kernel runs
    inside the patched model's attention only, and not after ``remove``."""
    from liger_kernel.ops.rope import LigerRopeFunction

    calls = []
    apply = LigerRopeFunction.apply
    LigerRopeFunction.apply = staticmethod(lambda *args: calls.append(1) or apply(*args))
    model, dtype = _quantized_lora_model(model_dir)
    other, _ = _quantized_lora_model(model_dir)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert fused_kernels.use_fused_rope(model)
    loss, grads = _loss_and_grads(model, ids)
    n_layers = len(checkpointing.decoder_layers(model))
    # once per block in the forward pass and once in its recomputation (the blocks are
    # checkpointed): the recomputation takes the same kernel, so it recomputes the same values
    assert len(calls) == 2 * n_layers
    assert torch.allclose(loss, ref_loss, atol=1e-5) and torch.allclose(grads, ref_grads, atol=1e-5, rtol=1e-4)
    _loss_and_grads(other, ids)  # another model in the process keeps transformers' RoPE
    fast.remove(model)
    _loss_and_grads(model, ids)
    assert len(calls) == 2 * n_layers


def test_the_fused_rope_keeps_the_function_and_stays_on_its_instance(tiny_llama_dir):
    run_under_triton_interpreter(
        f"import test_acceleration as t, pathlib; t.check_fused_rope(pathlib.Path({str(tiny_llama_dir)!r}))")


def test_linear_cross_entropy_without_weight_grad_and_all_ignored():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    loss = chunked_loss.linear_cross_entropy(hidden, weight, torch.full((2, 4), -100), chunk_rows=3)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(hidden.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_on_the_cpu_switches_on_the_plain_pytorch_levers_only(tiny_llama_dir, dtype):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.dtype == torch.float32]
    everything = AccelerationParams(compile_layers=True, offload_checkpoints=True, uncheckpointed_layers=1)
    applied = fast.apply(model, everything, torch.device("cpu"), dtype)
    upcast = ["keep_frozen_dtype"] if dtype != torch.float32 else []  # float32 norms are float32 already
    assert applied == [*upcast, "lora_fast_forward", "chunked_cross_entropy", "lean_recompute"]
    params = dict(model.named_parameters())
    assert frozen and all(params[n].dtype == dtype for n in frozen)
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)  # LoRA weights stay float32
    patched = {type(m).__name__ for m in model.modules() if "forward" in vars(m)}
    assert patched == {"Linear4bit", "LlamaForCausalLM"}  # the LoRA layers and the loss; no compile, no offload
    assert checkpointing.uncheckpointed_count(model) == 0  # a count is applied by the planner on the CPU
    fast.remove(model, upcast_dtype=torch.float32)
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(params[n].dtype == torch.float32 for n in frozen)


def test_a_trained_lm_head_keeps_the_norms_float32_and_trains_in_bfloat16(tiny_llama_dir, caplog):
    """modules_to_save's float32 lm_head takes the last norm's output: keep_frozen_dtype stays off."""
    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    def lora_model(compute_dtype: str):
        model, dtype = modeling.load_base_model(tiny_llama_dir, QuantizationParams(compute_dtype=compute_dtype),
                                                torch.device("cpu"))
        torch.manual_seed(0)  # the same adapter init for both
        return modeling.add_lora(model, LoraParams(rank=8, alpha=16, modules_to_save=["lm_head"]), quantized=True,
                                 gradient_checkpointing=True).train(), dtype

    model, dtype = lora_model("bfloat16")
    with caplog.at_level("INFO", logger="qlorapipe.train.fast"):
        applied = fast.apply(model, AccelerationParams(), torch.device("cpu"), dtype)
    assert applied == ["lora_fast_forward", "lean_recompute"]  # the chunked loss takes a plain lm_head only
    assert "keep_frozen_dtype: off, lora.modules_to_save trains float32 layers (base_model.model.lm_head)" in caplog.text
    norms = [m.weight for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    head = model.get_output_embeddings()
    assert norms and all(w.dtype == torch.float32 for w in norms)  # what keep_frozen_dtype would have rounded
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    input_ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, input_ids)
    fast.remove(model)  # peft's own forward on the same weights
    plain_loss, plain_grads = _loss_and_grads(model, input_ids)
    exact_loss, exact = _loss_and_grads(lora_model("float32")[0], input_ids)
    # In bfloat16 the tiny model's LoRA gradients are rounded by about a tenth (a sum of few products); the
    # fast paths must land as close to the float32 function as peft's forward does.
    assert abs(loss - exact_loss) < 0.01 and abs(plain_loss - exact_loss) < 0.01
    error, plain_error = ((g - exact).norm() / exact.norm() for g in (grads, plain_grads))
    assert error < 1.25 * plain_error and plain_error < 0.3, (error, plain_error)
    assert torch.nn.functional.cosine_similarity(grads, exact, dim=0) > 0.98


def test_a_trained_embedding_keeps_the_frozen_params_float32_and_evaluates(tiny_llama_dir, caplog):
    """modules_to_save's float32 embed_tokens would carry float32 activations to a compute-dtype lm_head."""
    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    model, dtype = modeling.load_base_model(tiny_llama_dir, QuantizationParams(compute_dtype="bfloat16"),
                                            torch.device("cpu"))
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, modules_to_save=["embed_tokens"]), quantized=True,
                              gradient_checkpointing=True)
    with caplog.at_level("INFO", logger="qlorapipe.train.fast"):
        applied = fast.apply(model, AccelerationParams(), torch.device("cpu"), dtype)
    assert "keep_frozen_dtype" not in applied
    assert "lora.modules_to_save trains float32 layers (base_model.model.model.embed_tokens)" in caplog.text
    input_ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model.train(), input_ids)
    with torch.no_grad():  # evaluation: the plain forward, no chunked loss
        eval_loss = model.eval()(input_ids=input_ids, labels=input_ids).loss
    assert torch.isfinite(loss) and grads.abs().sum() > 0 and torch.isfinite(eval_loss)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_lora_forward_and_chunked_loss_compute_the_plain_function(arch, tiny_llama_dir, tiny_qwen2_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids)
    assert lora_forward.use_fast_lora_forward(model)
    assert chunked_loss.use_chunked_loss(model)
    loss, grads = _loss_and_grads(model, input_ids)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.9999
    assert torch.allclose(grads, ref_grads, atol=1e-5, rtol=1e-3)
    # Evaluation (no labels) still returns logits; removing restores peft's forward.
    with torch.no_grad():
        assert model(input_ids=input_ids).logits.shape == (2, 24, model.config.vocab_size)
    fast.remove(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.allclose(_loss_and_grads(model, input_ids)[0], ref_loss)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_biases_get_their_gradients_from_the_fast_forward(tiny_qwen2_dir, bias):
    """lora.bias all / lora_only trains the base layers' biases (Qwen2's q, k and v have them): those layers take
    the unfused fast path, whose base layer is a module autograd sees through."""
    from qlorapipe.train.fast import fused_lora

    model, _ = tiny_lora_model(tiny_qwen2_dir, bias=bias)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("base_layer.bias")]
    assert len(trained) == 2 * 3  # two blocks' q, k and v
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids)
    assert lora_forward.use_fast_lora_forward(model)
    assert all(fused_lora.lora_parts(m) is None for m in model.modules()
               if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A") and m.base_layer.bias is not None)
    loss, grads = _loss_and_grads(model, input_ids)  # a bias without its gradient fails here (p.grad is None)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert torch.allclose(grads, ref_grads, atol=1e-5, rtol=1e-3)


def test_fast_lora_forward_honours_disabled_adapters(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    input_ids = torch.randint(4, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    lora_forward.use_fast_lora_forward(model)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=input_ids).logits
    fast.remove(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(model(input_ids=input_ids).logits, base_logits)


def test_keep_frozen_dtype_undoes_the_upcast_of_frozen_params_only(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()
              and type(p).__name__ != "Params4bit"]
    assert frozen and all(p.dtype == torch.float32 for p in frozen)  # what prepare_model_for_kbit_training leaves
    assert frozen_dtype.keep_frozen_dtype(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # master weights
    fast.remove(model, upcast_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in frozen)


def test_skip_checkpointing_turns_it_off_for_the_last_blocks(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    layers = checkpointing.decoder_layers(model)
    assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)
    assert checkpointing.skip_checkpointing(model, 1)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    fast.remove(model)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not checkpointing.skip_checkpointing(model, 0)


def test_unpaged_optimizer_swaps_only_paged_8bit_adamw_and_only_on_cuda():
    from qlorapipe.params import TrainingParams

    paged = TrainingParams(optimizer="paged_adamw_8bit")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    unpaged = AccelerationParams(unpaged_optimizer=True)
    assert fast.training_params(paged, unpaged, cuda).optimizer == "adamw_8bit"
    assert fast.training_params(paged, unpaged, cpu) is paged
    assert fast.training_params(paged, AccelerationParams(), cuda).optimizer == "adamw_8bit"  # on by default
    assert fast.training_params(paged, AccelerationParams(unpaged_optimizer=False), cuda) is paged
    torch_adamw = TrainingParams(optimizer="adamw_torch")
    assert fast.training_params(torch_adamw, unpaged, cuda) is torch_adamw


def test_cuda_graphs_are_on_by_default_and_only_taken_on_cuda_in_one_process(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    assert AccelerationParams().cuda_graphs
    cuda = torch.device("cuda")  # the choice touches no GPU: it runs on a CPU-only machine too
    assert cuda_graphs.graphed_step(model, AccelerationParams(), torch.device("cpu")) is None
    assert isinstance(cuda_graphs.graphed_step(model, AccelerationParams(), cuda), cuda_graphs.GraphedStep)
    assert cuda_graphs.graphed_step(model, AccelerationParams(cuda_graphs=False), cuda) is None
    assert cuda_graphs.graphed_step(model, AccelerationParams(), cuda, num_processes=2) is None
    assert cuda_graphs.graphed_step(model, AccelerationParams(compile_layers=True), cuda) is None
    import bitsandbytes as bnb

    eight_bit = torch.nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False))  # LLM.int8(): host-side choices
    assert cuda_graphs.graphed_step(eight_bit, AccelerationParams(), cuda) is None


def test_a_graphed_step_of_full_micro_batches_leaves_a_short_one_to_the_eager_step(tiny_llama_dir):
    """A resumed run may start at an epoch's short last micro-batch: graphing it would leave every full one eager."""
    model, _ = _quantized_lora_model(tiny_llama_dir)
    step = cuda_graphs.GraphedStep(model, rows=4)
    ids = torch.randint(4, 300, (3, 16))
    assert step({"input_ids": ids}, ids, 1.0) is None  # declined before anything is captured
    assert step.graph is None and step.key is None and step.failed is None


def test_the_packed_mask_is_causal_within_each_document_only():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6]])  # documents [0, 3), [3, 5), [5, 7) (5 does not follow 1)
    mask = cuda_graphs.packed_causal_mask(positions)[0, 0]
    document = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    want = (document[:, None] == document[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    assert mask.dtype == torch.bool and torch.equal(mask, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_packed_mask_is_what_transformers_builds_from_position_ids(arch, tiny_llama_dir, tiny_qwen2_dir):
    """The graphed step passes the mask explicitly; the model must compute what position_ids alone give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir,
                                                 dtype=torch.float32).eval()
    input_ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(10)) + list(range(14)), list(range(7, 20)) + list(range(11))])
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
        masked = model(input_ids=input_ids, position_ids=positions, use_cache=False,
                       attention_mask=cuda_graphs.packed_causal_mask(positions)).logits
        causal = model(input_ids=input_ids, position_ids=positions, use_cache=False,
                       attention_mask=torch.ones(2, 1, 24, 24, dtype=torch.bool).tril()).logits
    assert torch.allclose(masked, packed, atol=1e-5)
    assert not torch.allclose(causal[:, 14:], packed[:, 14:], atol=1e-3)  # the documents really are kept apart


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_captured_step_of_unpacked_rows_gives_sdpa_no_mask_as_the_eager_step_does(arch, tiny_llama_dir,
                                                                                     tiny_qwen2_dir, monkeypatch):
    """Under stream capture transformers cannot rule out packing and builds a full mask (sdpa's slow masked
    kernel); the graphed step tells it what the eager step finds: rows without position ids are not packed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import import_utils

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir,
                                                 dtype=torch.float32).eval()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks = []

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        masks.append((attn_mask, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    input_ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(capturing: bool, context=contextlib.nullcontext):
        monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: capturing)
        masks.clear()
        with torch.no_grad(), context():
            logits = model(input_ids=input_ids, use_cache=False).logits
        assert masks
        return logits, masks[0]

    eager, (mask, causal) = run(capturing=False)
    assert mask is None and causal
    captured, (mask, causal) = run(capturing=True)
    assert mask is not None and mask.shape[-2:] == (24, 24) and not causal  # what capture alone gets
    fixed, (mask, causal) = run(True, lambda: cuda_graphs.unpacked_rows_while_capturing(packed=False))
    assert mask is None and causal
    packed, (mask, _) = run(True, lambda: cuda_graphs.unpacked_rows_while_capturing(packed=True))
    assert mask is not None  # packed rows are left to transformers (the graphed step gives their mask)
    assert torch.allclose(fixed, eager, atol=1e-5) and torch.allclose(captured, eager, atol=1e-5)
    from transformers import masking_utils

    assert masking_utils.find_packed_sequence_indices is not cuda_graphs._not_packed  # put back


def test_fused_kernels_are_on_by_default_and_leave_the_cpu_path_alone(tiny_qwen2_dir):
    assert AccelerationParams().fused_kernels
    model, dtype = _quantized_lora_model(tiny_qwen2_dir)
    assert "fused_kernels" not in fast.apply(model, AccelerationParams(), torch.device("cpu"), dtype)
    assert not any("forward" in vars(m) for m in model.modules() if "Norm" in type(m).__name__ or "MLP" in type(m).__name__)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_the_async_optimizer_makes_the_same_updates_without_a_sync_per_parameter(name, monkeypatch):
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from qlorapipe.train import loop as training

    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: syncs.append(tensor))
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 300, generator=generator) for _ in range(3)]  # > 4,096 elements: 8-bit states
    finals = []
    for sync_each_parameter in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = training.make_optimizer(name, params, 1e-2, 0.01, sync_each_parameter=sync_each_parameter)
        syncs.clear()
        for step in range(3):
            for i, param in enumerate(params):
                param.grad = torch.sin(param.detach() * (step + i + 1))
            optimizer.step()
        finals.append([p.detach().clone() for p in params])
        # bitsandbytes: one sync per parameter and step, plus one per step when paged.
        assert len(syncs) == ((9 + 3 * name.startswith("paged")) if sync_each_parameter else 0)
        assert isinstance(optimizer, type(training.make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], 1e-2, 0)))
    assert not torch.equal(finals[0][0], start[0])
    for stock, ours in zip(*finals, strict=True):
        assert torch.equal(stock, ours)


def test_fast_lora_forward_on_8bit_layers_computes_the_plain_function(tiny_llama_dir):
    """8-bit bases are not fused (fused_lora.lora_parts declines them): they take the unfused fast path."""
    from qlorapipe.train.fast import fused_lora

    model, _ = _quantized_lora_model(tiny_llama_dir, load_in="8bit")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt" and hasattr(m, "lora_A")]
    assert layers and all(fused_lora.lora_parts(m) is None for m in layers)
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids)
    assert lora_forward.use_fast_lora_forward(model)
    loss, grads = _loss_and_grads(model, input_ids)
    assert torch.allclose(loss, ref_loss, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.999


class _RecordingOffload:
    """offload.CheckpointOffload's hooks without CUDA: each saved tensor is kept as a copy, and recorded."""

    def __init__(self):
        self.packed: list[tuple[int, tuple]] = []

    def hooks(self, block):
        def pack(tensor):
            # Empty tensors are not recorded: on a machine with a GPU (seen on an H100's host) torch's checkpoint
            # also saves an empty placeholder per block, and the real hooks leave anything under MIN_BYTES alone.
            if tensor.numel():
                self.packed.append((block, tuple(tensor.shape)))
            return tensor.detach().clone()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda copy: copy)


def test_offloaded_checkpoints_see_only_each_blocks_input_and_keep_the_function(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids)
    recorder = _RecordingOffload()
    assert offload.wrap_checkpoints(model, recorder)
    loss, grads = _loss_and_grads(model, input_ids)
    blocks = checkpointing.decoder_layers(model)
    # torch's checkpoint saves the block's input outside its own hooks; what the block saves inside is recomputed.
    assert recorder.packed == [(i, (2, 24, model.config.hidden_size)) for i in range(len(blocks))]
    assert torch.equal(loss, ref_loss) and torch.equal(grads, ref_grads)
    checkpointing.skip_checkpointing(model, 1)  # a kept block saves its activations itself: not offloaded
    recorder.packed.clear()
    _loss_and_grads(model, input_ids)
    assert [block for block, _ in recorder.packed] == list(range(len(blocks) - 1))
    fast.remove(model)
    assert not any("_qlorapipe_checkpoint" in vars(m) for m in model.modules())
    recorder.packed.clear()
    _loss_and_grads(model, input_ids)
    assert recorder.packed == []


def test_offload_checkpoints_changes_nothing_on_the_cpu(tiny_llama_dir):
    model, _ = _quantized_lora_model(tiny_llama_dir)
    assert not offload.offload_checkpoints(model, torch.device("cpu"))
    assert not any("_qlorapipe_checkpoint" in vars(m) for m in model.modules())


def test_host_kept_layers_are_spread_from_the_first_block_and_checked_like_the_other_counts(tiny_llama_dir):
    assert offload.host_kept_blocks(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert offload.host_kept_blocks(32, 3) == [0, 10, 21]
    assert offload.host_kept_blocks(4, 9) == [0, 1, 2, 3] and offload.host_kept_blocks(4, 0) == []
    assert parse_section("acceleration", {"host_kept_layers": 8}).host_kept_layers == 8
    assert parse_section("acceleration", {"host_kept_layers": "auto"}).host_kept_layers == "auto"
    with pytest.raises(UserError, match=r"acceleration.host_kept_layers must be an integer >= 0 \(0: none\) or "
                                        r"'auto' \(the count that trains fastest within "
                                        r"acceleration.memory_budget_gb\), got -1"):
        parse_section("acceleration", {"host_kept_layers": -1})
    for bad in ("all", 2.5):
        with pytest.raises(UserError, match=rf"acceleration.host_kept_layers: must be an integer or 'auto', "
                                            rf"got {bad!r}"):
            parse_section("acceleration", {"host_kept_layers": bad})
    model, _ = _quantized_lora_model(tiny_llama_dir)
    assert "host_kept_layers" not in " ".join(fast.apply(model, AccelerationParams(host_kept_layers=2),
                                                         torch.device("cpu"), torch.float32))
    assert offload.host_kept(model) == 0  # a CUDA lever: copies on a side stream into pinned memory


def _stream(*args, **kwargs):
    """A CUDA stream or event stood in for on the CPU, where every copy is done when it returns: waiting
    for one or recording one has nothing to do."""
    return types.SimpleNamespace(**dict.fromkeys(("wait_stream", "wait_event", "record"), lambda *args: None))


def test_host_kept_blocks_send_each_saved_tensor_once_and_fetch_it_back_ahead(tiny_llama_dir, monkeypatch):
    # HostKept's bookkeeping on the CPU: CUDA's streams, events and pinned memory stood in for (the GPU
    # test checks the copies' order on a real device).
    empty_strided = torch.empty_strided
    monkeypatch.setattr(torch, "empty_strided", lambda *a, pin_memory=False, **k: empty_strided(*a, **k))
    for name in ("Stream", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, _stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    model, _ = tiny_lora_model(tiny_llama_dir, dropout=0.1)
    layers = checkpointing.decoder_layers(model)
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref_loss, ref_grads = _loss_and_grads(model, input_ids)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    assert len(layers) >= 2 and offload.keep_in_host_memory(model, torch.device("cpu"), 1)
    kept = layers[0]._gradient_checkpointing_func.args[0]
    fetched = []
    monkeypatch.setattr(kept, "fetch", lambda block, fetch=kept.fetch: (fetched.append(block), fetch(block))[1])
    packed = []
    monkeypatch.setattr(kept, "pack", lambda block, tensor, pack=kept.pack:
                        packed.append((tensor, pack(block, tensor))) or packed[-1][1])
    for _ in range(2):  # the second step reuses the host buffers
        torch.manual_seed(0)
        loss, grads = _loss_and_grads(model, input_ids)
        assert torch.equal(loss, ref_loss) and torch.equal(grads, ref_grads)
    assert kept.blocks == [0] and {key[0] for key in kept.buffers} == {0}
    # Block 0 ran once a step, the others again in the backward pass; its tensors went out and came back.
    assert calls == [2] + [4] * (len(layers) - 1), calls
    assert fetched and set(fetched) == {0} and all(not k.uses and k.fetched is None for k in kept.saved[0])
    # A tensor several nodes save has one host copy.
    sent = [result for _, result in packed if isinstance(result, offload._Kept)]
    assert len({id(result) for result in sent}) < len(sent)
    # Parameters, and views of them (the transposed LoRA weights), stay where they are.
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    assert all(result is tensor for tensor, result in packed if tensor.untyped_storage().data_ptr() in weights)
    assert any(tensor.untyped_storage().data_ptr() in weights for tensor, _ in packed)
    assert max(k.uses for k in kept.saved[0]) == 0
    fast.remove(model)
    assert offload.host_kept(model) == 0
    assert not any(getattr(getattr(hook, "func", None), "__self__", None) is kept for layer in layers
                   for hook in (*layer._forward_hooks.values(), *layer._forward_pre_hooks.values()))


def _timed_gpu(monkeypatch, model, seconds, peak=lambda on_gpu, in_host: 42.0, host_gb_per_block=0.9):
    """``memory_plan.measure_step`` answering ``peak(blocks kept on the GPU, blocks kept in host memory)`` (GB;
    inf runs out of memory) and ``seconds(blocks kept in host memory)`` for each step ``model`` runs, and each
    host-kept block holding ``host_gb_per_block`` of pinned memory.

    Returns:
        The list each measurement's (on the GPU, in host memory, timed steps) is appended to.
    """
    _simulated_gpu(monkeypatch, model, lambda kept: 0.0)
    calls = []

    def measure_step(model_, inputs, labels, device, cuda_graphs=False, timed=0, eager_when_out_of_memory=False):
        on_gpu, in_host = sum(not b.gradient_checkpointing for b in model.blocks), offload.host_kept(model)
        calls.append((on_gpu, in_host, timed))
        if math.isinf(peak(on_gpu, in_host)):
            raise torch.cuda.OutOfMemoryError("simulated")
        return peak(on_gpu, in_host), (seconds[in_host] if timed else None)

    monkeypatch.setattr(memory_plan, "measure_step", measure_step)
    monkeypatch.setattr(offload, "host_kept_bytes", lambda m: offload.host_kept(m) * host_gb_per_block * 1e9)
    monkeypatch.setattr(memory_plan, "host_available", lambda: 1e12)
    for block in model.blocks:
        block._gradient_checkpointing_func = lambda run, *args: run(*args)
    return calls


def _fit_host_kept(model, budget_gb, every_block_may_fit=True):
    ids = torch.ones(3)
    return memory_plan.fit_host_kept_layers(model, {"input_ids": ids}, ids, budget_gb, torch.device("cuda", 0),
                                            every_block_may_fit=every_block_may_fit)


def test_auto_host_kept_layers_times_sparsest_first_and_keeps_the_fastest_within_the_budget(monkeypatch):
    # The 70B shape within 48 GB as on an H100: every block kept runs out of memory; one block in two paid most.
    model = _BlocksModel(80)
    calls = _timed_gpu(monkeypatch, model, {0: 1.40, 20: 1.30, 26: 1.27, 40: 1.22},
                       peak=lambda on_gpu, in_host: math.inf if on_gpu else 42.0 + 0.01 * in_host)
    grad = model.weight.grad = torch.full((3,), 7.0)
    model.eval()
    kept, measured = _fit_host_kept(model, 48.0)
    assert calls == [(80, 0, 0), (0, 0, 3), (0, 20, 3), (0, 26, 3), (0, 40, 3)]
    assert kept == 40 and offload.host_kept(model) == 40 and measured["kept"] == 40
    assert [i for i, block in enumerate(model.blocks) if "_qlorapipe_host_kept" in vars(block)] == list(range(0, 80, 2))
    assert measured["seconds"] == {0: 1.4, 20: 1.3, 26: 1.27, 40: 1.22} and measured["peak_gb"][40] == 42.4
    assert measured["host_gb"] == {20: 18.0, 26: 23.4, 40: 36.0} and measured["candidates"] == 80
    assert all(block.gradient_checkpointing for block in model.blocks)  # the other planner fills the budget next
    assert model.weight.grad is grad and not model.training  # put back
    fast.remove(model)
    assert offload.host_kept(model) == 0

    # The 7B shape: one in four paid 4 %, one in three did not: nothing denser is tried.
    model = _BlocksModel(32)
    calls = _timed_gpu(monkeypatch, model, {0: 0.352, 8: 0.338, 10: 0.360, 16: 0.2},
                       peak=lambda on_gpu, in_host: math.inf if on_gpu else 6.06)
    assert _fit_host_kept(model, None)[0] == 8 and [c[1] for c in calls] == [0, 0, 8, 10]


def test_auto_host_kept_layers_keeps_none_without_a_gain_room_or_anything_recomputed(monkeypatch):
    slow = {0: 0.352, 8: 0.349, 10: 0.348, 16: 0.347}  # 1.4 % at best: timing noise
    model = _BlocksModel(32)
    calls = _timed_gpu(monkeypatch, model, slow, peak=lambda on_gpu, in_host: math.inf if on_gpu else 6.0)
    kept, measured = _fit_host_kept(model, 10.0)
    assert kept == 0 and offload.host_kept(model) == 0 and [c[1] for c in calls] == [0, 0, 8, 10, 16]
    assert measured["why_none"] == "no count within the budget was 2% faster than recomputing every block"
    # Within unsloth's peak at the 7B shape: a block's copies in flight do not fit (5.60 GB against 5.52).
    calls = _timed_gpu(monkeypatch, model, {0: 0.352, 8: 0.338}, peak=lambda on_gpu, in_host: (
        math.inf if on_gpu else 5.09 + (0.51 if in_host else 0)))
    assert _fit_host_kept(model, 5.52)[0] == 0 and [c[1] for c in calls] == [0, 0, 8]
    # Recomputing every block is above the budget even with their inputs offloaded: nothing more timed, and the
    # offloading undone (the other planner offloads by its own measurements).
    calls = _timed_gpu(monkeypatch, model, slow, peak=lambda on_gpu, in_host: math.inf if on_gpu else 6.06)
    kept, measured = _fit_host_kept(model, 5.52)
    assert kept == 0 and calls == [(32, 0, 0), (0, 0, 3), (0, 0, 3)] and not offload.offloaded(model)
    assert measured["why_none"] == ("the step recomputing every checkpointed block is above the budget, with their "
                                    "inputs offloaded too")
    assert measured["offloaded"] is False and measured["peak_not_offloaded_gb"] == 6.06
    # Every block fits on the GPU: one step, nothing timed.
    calls = _timed_gpu(monkeypatch, model, slow, peak=lambda on_gpu, in_host: 19.1)
    kept, measured = _fit_host_kept(model, 20.0)
    assert kept == 0 and calls == [(32, 0, 0)]
    assert measured["why_none"] == "every block fits on the GPU, so none is recomputed"
    # ... unless the user's count of blocks kept on the GPU stands (then that step is not measured).
    calls = _timed_gpu(monkeypatch, model, {0: 0.352, 8: 0.338, 10: 0.36}, peak=lambda on_gpu, in_host: 19.1)
    assert _fit_host_kept(model, 20.0, every_block_may_fit=False)[0] == 8 and calls[0] == (0, 0, 3)
    fast.remove(model)


def test_auto_host_kept_blocks_are_left_alone_by_the_gpu_planner_after_it(monkeypatch):
    # The 70B shape within 48 GB: 40 blocks in host memory, then the GPU planner keeps others on the GPU.
    model = _BlocksModel(80)
    _timed_gpu(monkeypatch, model, {0: 1.40, 20: 1.30, 26: 1.27, 40: 1.22},
               peak=lambda on_gpu, in_host: math.inf if on_gpu >= 40 else 41.4 + 0.42 * max(on_gpu - 1, 0))
    assert _fit_host_kept(model, 48.0)[0] == 40
    ids = torch.ones(3)
    kept, measured = memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids}, ids, 48.0,
                                                           torch.device("cuda", 0))
    assert kept == 16 and measured["n_blocks"] == 40  # 41.4 + 15 x 0.42 = 47.7 GB
    on_gpu = [i for i, block in enumerate(model.blocks) if not block.gradient_checkpointing]
    assert on_gpu == list(range(49, 80, 2))  # the last 16 of the blocks still recomputed, none of those sent away
    assert offload.host_kept(model) == 40 and checkpointing.uncheckpointed_count(model) == 16
    fast.remove(model)


class _LabelsOnAnyDevice:
    """A micro-batch's labels that stay where they are when moved (the planners' CUDA path on a CPU machine)."""

    def to(self, device):
        return self

    def long(self):
        return torch.ones(3)


@pytest.mark.parametrize("peak_on_gpu,kept_on_gpu,steps", [
    (19.1, 32, [(32, 0)]),
    # every block kept; none and 8, 10, 16 of 32 in host memory timed; none, the last 1, 2 and 28 kept on the GPU
    (math.inf, 28, [(32, 0), (0, 0), (0, 8), (0, 10), (0, 16), (0, 0), (1, 0), (2, 0), (28, 0)])])
def test_the_two_planners_measure_the_step_with_every_block_on_the_gpu_once(monkeypatch, peak_on_gpu, kept_on_gpu,
                                                                              steps):
    # Every block fits (the defaults on a GPU): the host-kept planner's step serves the GPU planner too. Or
    # none fits and no host-kept count pays: the GPU planner goes on from that step's out of memory.
    model = _BlocksModel(32)
    calls = _timed_gpu(monkeypatch, model, {0: 0.352, 8: 0.349, 10: 0.348, 16: 0.347},
                       peak=lambda on_gpu, in_host: peak_on_gpu if on_gpu == 32 else 6.0 + 0.5 * on_gpu)
    monkeypatch.setattr(memory_plan, "model_inputs", lambda batch, device: {"input_ids": torch.ones(3)})
    kept = memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(memory_budget_gb=20.0),
                                                  {"labels": _LabelsOnAnyDevice()}, torch.device("cuda", 0))
    assert kept == checkpointing.uncheckpointed_count(model) == kept_on_gpu and offload.host_kept(model) == 0
    assert [(on_gpu, in_host) for on_gpu, in_host, _ in calls] == steps
    fast.remove(model)


def _plan_beside_optimizer_state(monkeypatch, caplog, params: AccelerationParams, optimizer_state_gb: float,
                                 steps: list | None = None):
    """The two planners on 32 simulated blocks (every block kept runs out of memory, 6.0 + 0.5 GB a block kept
    otherwise; 100 GB free): (blocks kept, the planner's log); ``steps`` gets the steps measured."""
    model = _BlocksModel(32)
    calls = _timed_gpu(monkeypatch, model, {0: 0.352, 8: 0.349, 10: 0.348, 16: 0.347},
                       peak=lambda on_gpu, in_host: math.inf if on_gpu == 32 else 6.0 + 0.5 * on_gpu)
    monkeypatch.setattr(memory_plan, "model_inputs", lambda batch, device: {"input_ids": torch.ones(3)})
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger=memory_plan.logger.name):
            kept = memory_plan.plan_uncheckpointed_layers(model, params, {"labels": _LabelsOnAnyDevice()},
                                                          torch.device("cuda", 0),
                                                          optimizer_state_gb=optimizer_state_gb)
        assert kept == checkpointing.uncheckpointed_count(model)
        return kept, caplog.messages
    finally:
        if steps is not None:
            steps.extend(calls)
        fast.remove(model)


def test_the_optimizer_state_no_measured_step_holds_yet_is_left_out_of_the_budget(monkeypatch, caplog):
    # The planners' steps run before the optimizer's first step creates its state: 1 GB of it leaves the steps
    # 19 GB of 20, so the line 6.0 + 0.5 GB a block keeps 26 blocks instead of 28.
    kept, messages = _plan_beside_optimizer_state(monkeypatch, caplog, AccelerationParams(memory_budget_gb=20.0), 1.0)
    assert kept == 26
    assert "memory budget: 19.00 GB of 20.00 GB for the training step; the optimizer's state takes 1.00 GB" in messages
    assert any(message.endswith("budget 19.00 GB left to the steps of 20.00 GB)") for message in messages)
    assert _plan_beside_optimizer_state(monkeypatch, caplog, AccelerationParams(memory_budget_gb=20.0), 0.0)[0] == 28
    # More optimizer state than budget: one line naming the budget and what took it, before any step runs.
    steps = []
    with pytest.raises(UserError, match=r"acceleration.memory_budget_gb: 1.00 GB leaves nothing to the training step "
                                        r"\(the optimizer's state takes 1.50 GB\)"):
        _plan_beside_optimizer_state(monkeypatch, caplog, AccelerationParams(memory_budget_gb=1.0), 1.5, steps)
    assert not steps


def test_with_the_default_budget_the_planners_say_so_after_the_optimizer_state_is_taken(monkeypatch, caplog):
    _, messages = _plan_beside_optimizer_state(monkeypatch, caplog, AccelerationParams(), 0.5)
    assert any("of 90.00 GB (90% of the GPU's memory) for the training step" in message for message in messages)
    assert any("left to the steps of 90.00 GB (90% of the GPU's memory)" in message for message in messages)


def test_auto_host_kept_layers_times_its_counts_beside_offloaded_inputs_when_recomputing_is_above_the_budget(
        monkeypatch):
    # The 70B shape on an H100: recomputing every block 41.99 GB, with their inputs offloaded 39.41 GB, with
    # host-kept blocks beside that about 0.6 GB more (their copies in flight); 20 of 80 ran 1.06x the budget row.
    model = _BlocksModel(80)

    def peak(on_gpu, in_host):
        if not offload.offloaded(model):
            return math.inf if on_gpu else 41.99
        return 39.41 + (0.6 if in_host else 0.0) + 0.42 * on_gpu

    seconds = {0: 1.416, 20: 1.337, 26: 1.31, 40: 1.28}
    calls = _timed_gpu(monkeypatch, model, seconds, peak=peak)
    kept, measured = _fit_host_kept(model, 41.0)
    assert kept == 40 and offload.host_kept(model) == 40 and offload.offloaded(model)
    assert calls == [(80, 0, 0), (0, 0, 3), (0, 0, 3), (0, 20, 3), (0, 26, 3), (0, 40, 3)]
    assert measured["offloaded"] is True and measured["peak_not_offloaded_gb"] == 41.99
    assert measured["seconds"] == seconds and measured["peak_gb"] == {0: 39.41, 20: 40.01, 26: 40.01, 40: 40.01}
    # The GPU planner goes on from there: the inputs stay offloaded, and two blocks fit beside the copies.
    ids = torch.ones(3)
    on_gpu, fitted = memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids}, ids, 41.0,
                                                           torch.device("cuda", 0))
    assert on_gpu == 2 and fitted["peak_gb"] == 40.85 and "offloaded" not in fitted and offload.offloaded(model)
    fast.remove(model)
    assert not offload.offloaded(model) and offload.host_kept(model) == 0

    # Within unsloth's 39.84 GB no count fits beside the offloaded inputs: none kept, the offloading undone.
    model = _BlocksModel(80)
    calls = _timed_gpu(monkeypatch, model, seconds, peak=peak)
    kept, measured = _fit_host_kept(model, 39.84)
    assert kept == 0 and not offload.offloaded(model) and offload.host_kept(model) == 0
    assert calls == [(80, 0, 0), (0, 0, 3), (0, 0, 3), (0, 20, 3)] and measured["offloaded"] is False
    assert measured["why_none"] == ("no count within the budget was 2% faster than recomputing every block (their "
                                    "inputs offloaded)")
    # Offloaded by the user (offload_checkpoints): timed as it is, and left so.
    model = _BlocksModel(80)
    calls = _timed_gpu(monkeypatch, model, seconds, peak=peak)
    assert offload.offload_checkpoints(model, torch.device("cuda", 0))
    kept, measured = _fit_host_kept(model, 41.0)
    assert kept == 40 and calls[1] == (0, 0, 3) and calls[2] == (0, 20, 3) and "offloaded" not in measured
    fast.remove(model)
    assert not offload.offloaded(model)


def test_auto_host_kept_layers_tries_one_block_of_three_and_tells_errors_from_running_out(monkeypatch):
    model = _BlocksModel(3)
    calls = _timed_gpu(monkeypatch, model, {0: 1.0, 1: 0.9}, peak=lambda on_gpu, in_host: math.inf if on_gpu else 4.0)
    assert _fit_host_kept(model, 8.0)[0] == 1 and [c[1] for c in calls] == [0, 0, 1]  # 3 // 4 is no count
    fast.remove(model)

    def failing(error):
        def measure_step(model_, inputs, labels, device, cuda_graphs=False, timed=0,
                         eager_when_out_of_memory=False):
            if offload.host_kept(model):
                raise error
            return 4.0, (1.0 if timed else None)
        return measure_step

    monkeypatch.setattr(memory_plan, "measure_step", failing(RuntimeError("CUDA error: out of memory")))
    assert _fit_host_kept(model, 8.0, every_block_may_fit=False)[0] == 0  # pinned memory ran out: none kept
    monkeypatch.setattr(memory_plan, "measure_step", failing(RuntimeError("a hook went wrong")))
    with pytest.raises(RuntimeError, match="a hook went wrong"):  # not taken for a count that did not fit
        _fit_host_kept(model, 8.0, every_block_may_fit=False)
    assert offload.host_kept(model) == 0  # the count tried was taken back


def test_auto_host_kept_layers_fits_the_pinned_copies_in_host_memory(monkeypatch, caplog):
    model = _BlocksModel(80)
    calls = _timed_gpu(monkeypatch, model, {0: 1.40, 20: 1.30, 26: 1.27, 40: 1.22},
                       peak=lambda on_gpu, in_host: math.inf if on_gpu else 42.0)
    monkeypatch.setattr(memory_plan, "host_available", lambda: 50e9)  # half of it: 25 GB for 0.9 GB a block
    ids = torch.ones(3)
    with caplog.at_level("INFO", logger="qlorapipe.train.fast"):
        kept, _ = memory_plan.plan_host_kept_layers(model, {"input_ids": ids}, ids, AccelerationParams(
            host_kept_layers="auto", memory_budget_gb=48.0), torch.device("cuda", 0))
    assert kept == 26 and [c[1] for c in calls] == [0, 0, 20, 26]  # 40 would pin 36 GB, over the 25: not run
    assert ("host_kept_layers: auto keeps 26 of 80 checkpointed blocks' activations in host memory (23.40 GB "
            "pinned) instead of recomputing them; a step with N of them: 0: 1.400 s at 42.00 GB, 20: 1.300 s at "
            "42.00 GB, 26: 1.270 s at 42.00 GB; budget 48.00 GB") in caplog.text
    fast.remove(model)
    assert offload.host_kept(model) == 0
    # The first count tried is not predicted: it runs, and its measured copies (30 GB) rule it and the rest out.
    calls = _timed_gpu(monkeypatch, model, {0: 1.40, 20: 1.30, 26: 1.27, 40: 1.22},
                       peak=lambda on_gpu, in_host: math.inf if on_gpu else 42.0, host_gb_per_block=1.5)
    monkeypatch.setattr(memory_plan, "host_available", lambda: 50e9)
    assert _fit_host_kept(model, 48.0)[0] == 0 and [c[1] for c in calls] == [0, 0, 20]


@pytest.mark.parametrize("mlp", ["lora_linear", "swiglu_lora_linear"])
@pytest.mark.parametrize("dropout,mode", [(0.0, "non-reentrant"), (0.1, "non-reentrant"), (0.1, "no early stop"),
                                          (0.1, "reentrant")])
def test_lean_recompute_skips_one_base_matmul_per_recomputed_block_and_keeps_the_gradients(
        tiny_llama_dir, monkeypatch, mlp, dropout, mode):
    import torch.utils.checkpoint as torch_checkpoint

    model, _ = tiny_lora_model(tiny_llama_dir, dropout=dropout)
    if mode == "reentrant":
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    cpu = torch.device("cpu")
    fast.apply(model, AccelerationParams(lean_recompute=False), cpu, torch.float32)
    if mlp == "swiglu_lora_linear":  # fused_kernels' MLP (a CUDA lever) on its plain-PyTorch path
        for module in model.modules():
            if type(module).__name__ == "LlamaMLP":
                module.forward = types.MethodType(fused_kernels._fused_swiglu_forward, module)
                module._qlorapipe_patched = True
    blocks = checkpointing.decoder_layers(model)
    assert all(block.gradient_checkpointing for block in blocks)
    matmuls = []
    real_weight, real_forward = fused_lora.frozen_weight, fused_lora._forward
    monkeypatch.setattr(fused_lora, "frozen_weight",
                        lambda base, dtype: matmuls.append(base) or real_weight(base, dtype))

    def poisoned_forward(*args):  # an output left unwritten is NaN here: any read of it would show
        out, saved, fused = real_forward(*args)
        return (out.fill_(math.nan) if args[6] else out), saved, fused

    monkeypatch.setattr(fused_lora, "_forward", poisoned_forward)
    input_ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(1))

    def step():
        matmuls.clear()
        torch.manual_seed(5)  # the dropout seeds
        with torch_checkpoint.set_checkpoint_early_stop(mode != "no early stop"):
            return (*_loss_and_grads(model, input_ids), len(matmuls))

    ref_loss, ref_grads, ref_matmuls = step()
    assert lean_recompute.lean_recompute(model)
    downs = [block.mlp.down_proj.base_layer for block in blocks]
    loss, grads, lean_matmuls = step()
    assert ref_matmuls - lean_matmuls == len(blocks)  # one down projection per recomputed block
    assert all(matmuls.count(down) == 2 for down in downs)  # its forward pass and its backward pass only
    assert torch.isfinite(loss) and torch.isfinite(grads).all()
    assert torch.equal(loss, ref_loss) and torch.equal(grads, ref_grads)  # the same saved tensors: the same bits
    assert not lean_recompute.recomputing()
    checkpointing.skip_checkpointing(model, 1)  # a kept block is not recomputed: nothing to skip there
    assert step()[2] - ref_matmuls == -(len(blocks) - 1) - 7  # and its seven projections' recomputation
    checkpointing.checkpoint_again(blocks)
    originals = [block._qlorapipe_lean for block in blocks]
    assert offload.wrap_checkpoints(model, _RecordingOffload())  # offloading wraps the lean function
    loss, grads, offloaded_matmuls = step()
    assert offloaded_matmuls == lean_matmuls and torch.equal(grads, ref_grads)
    lean_recompute.remove(blocks[0])  # wrapped again on top: left for after the offload's removal
    assert "_qlorapipe_lean" in vars(blocks[0])
    fast.remove(model)
    assert [block._gradient_checkpointing_func for block in blocks] == originals  # both undone, in order
    assert not any("_qlorapipe_lean" in vars(m) or lean_recompute.UNREAD in vars(m) for m in model.modules())


def test_lean_recompute_leaves_unfused_unknown_and_uncheckpointed_blocks_alone(tiny_llama_dir):
    cpu = torch.device("cpu")
    fast_forward_only = AccelerationParams(lean_recompute=False)
    model, _ = tiny_lora_model(tiny_llama_dir, gradient_checkpointing=False)
    fast.apply(model, fast_forward_only, cpu, torch.float32)
    assert not lean_recompute.lean_recompute(model)  # nothing is recomputed
    model, _ = tiny_lora_model(tiny_llama_dir)
    assert not lean_recompute.lean_recompute(model)  # peft's own forward: nothing it could skip
    assert "lean_recompute" not in fast.apply(model, AccelerationParams(lora_fast_forward=False), cpu, torch.float32)
    fast.remove(model)
    fast.apply(model, fast_forward_only, cpu, torch.float32)
    blocks = checkpointing.decoder_layers(model)
    llama = type(blocks[0])
    # a block class not known to end with the MLP's residual add (Gemma's have a norm after it), and
    # remote code that reuses a known name
    for cls in (type("GemmaLikeDecoderLayer", (llama,), {}),
                type(llama.__name__, (llama,), {"__module__": "transformers_modules.repo.modeling"})):
        for block in blocks:
            block.__class__ = cls
        assert not lean_recompute.lean_recompute(model)
    for block in blocks:
        block.__class__ = llama
    assert lean_recompute.lean_recompute(model)

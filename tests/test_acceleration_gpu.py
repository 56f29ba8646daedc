"""The fast paths on a real GPU: same loss and LoRA gradients as the plain bf16-autocast recipe."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
from conftest import tiny_lora_model

from qlorapipe.params import AccelerationParams
from qlorapipe.train import fast
from qlorapipe.train.fast import checkpointing, cuda_graphs, memory_plan, offload

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic kernels, for comparing two eager steps bit for bit: sdpa's backward pass
    is not (measured on an H100: two identical steps of the six-block model, 2 of 49,152 gradient
    entries 1.5e-8 apart, now and then; none with these)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what torch asks of cuBLAS in that mode
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if config is None:
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = config


def _loss_and_grads(model, input_ids, autocast, deterministic: bool = False):
    model.zero_grad(set_to_none=True)
    with _deterministic() if deterministic else contextlib.nullcontext():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    return float(loss), grads


def _tiny_lora(tiny_qwen2_dir, params: AccelerationParams | None, dropout: float = 0.0):
    """The tiny Qwen2 in 4-bit with LoRA (B non-zero), training mode; ``params``' levers applied unless None."""
    device = torch.device("cuda")
    model, dtype = tiny_lora_model(tiny_qwen2_dir, device, dropout=dropout)
    assert dtype in (torch.bfloat16, torch.float16)
    if params is not None:
        fast.apply(model, params, device, dtype)
    return model, dtype


@pytest.mark.parametrize("params", [AccelerationParams(), AccelerationParams(uncheckpointed_layers=1)])
def test_fast_paths_match_the_plain_recipe_on_cuda(tiny_qwen2_dir, params):
    device = torch.device("cuda")
    model, dtype = _tiny_lora(tiny_qwen2_dir, None)
    input_ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, input_ids, autocast=True)
    applied = fast.apply(model, params, device, dtype)
    assert {"keep_frozen_dtype", "lora_fast_forward", "chunked_cross_entropy", "fused_kernels"} <= set(applied)
    assert sum(type(m).__name__.endswith("RMSNorm") and "forward" in vars(m) for m in model.modules()) > 2
    loss, grads = _loss_and_grads(model, input_ids, autocast=False)
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)  # bfloat16 rounding
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99
    assert abs(grads.norm() / ref_grads.norm() - 1) < 0.05  # the direction and the size (a scale lost or doubled)
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

    graphed = cuda_graphs.GraphedStep(model)
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


@pytest.mark.parametrize("packed", [False, True])
def test_a_captured_step_runs_causal_attention_without_a_mask_unless_rows_are_packed(tiny_qwen2_dir, packed,
                                                                                      monkeypatch):
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    captured = []

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            captured.append((attn_mask is None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    positions = torch.cat([torch.arange(40), torch.arange(24)]).repeat(2, 1).to(device)
    graphed = cuda_graphs.GraphedStep(model)
    assert graphed({"input_ids": ids, **({"position_ids": positions} if packed else {})}, ids, 1.0) is not None
    assert graphed.failed is None and captured
    assert set(captured) == ({(False, False)} if packed else {(True, True)})


def test_a_capture_draws_no_dropout_mask_of_its_own(tiny_qwen2_dir):
    """A run resumed from a checkpoint captures its graph at another micro-batch than the uninterrupted run:
    the replay after a capture must draw the dropout masks the generator holds, not those after the warm-up."""
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams(), dropout=0.1)
    model.train()
    trainable = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    generator = torch.Generator(device).manual_seed(0)
    first, second = (torch.randint(4, 300, (2, 64), device=device, generator=generator) for _ in range(2))

    def replay_second(graphed):
        for p in trainable:
            p.grad = None if graphed.graph is None else p.grad.zero_()
        loss = float(graphed(second_inputs, second, 1.0))
        return loss, torch.cat([p.grad.flatten() for p in trainable]).clone()

    second_inputs = {"input_ids": second}
    torch.manual_seed(3)
    uninterrupted = cuda_graphs.GraphedStep(model)
    assert uninterrupted({"input_ids": first}, first, 1.0) is not None  # captured at the first micro-batch
    before_second = torch.cuda.get_rng_state(device)
    loss, grads = replay_second(uninterrupted)
    after_second = torch.cuda.get_rng_state(device)

    torch.cuda.set_rng_state(before_second, device)  # what a resume restores from the checkpoint
    resumed = cuda_graphs.GraphedStep(model)
    resumed_loss, resumed_grads = replay_second(resumed)  # captured here, at the second micro-batch
    assert resumed.failed is None and resumed.replays == 1
    assert resumed_loss == loss and torch.equal(resumed_grads, grads)
    assert torch.equal(torch.cuda.get_rng_state(device), after_second)
    replay_second(resumed)
    assert not torch.equal(torch.cuda.get_rng_state(device), after_second)  # dropout does draw from it


def _download_and_prepare(params, tmp_path) -> None:
    """The download and prepare stages for ``params``, into ``tmp_path`` / base and / data."""
    from conftest import load_stage

    load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "base")])
    load_stage("prepare").main(["--params", str(params), "--base", str(tmp_path / "base"), "--out",
                                str(tmp_path / "data"), "--report", str(tmp_path / "data.json"),
                                "--lengths", str(tmp_path / "l.csv"), "--lengths-plot", str(tmp_path / "l.png")])


def test_the_train_stage_replays_cuda_graphs_and_reports_it(tmp_path, tiny_qwen2_dir, corpus_file, caplog):
    import json

    from conftest import load_stage, tiny_params, train_args, write_params

    caplog.set_level("INFO", logger="qlorapipe.train.fast")

    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_qwen2_dir, corpus_file, **{
        "training.max_steps": 4, "training.gradient_accumulation_steps": 2, "model.dtype": "bfloat16"}))
    _download_and_prepare(params, tmp_path)
    load_stage("train").main(train_args(params, tmp_path / "base", tmp_path / "data", tmp_path))
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["cuda_graph_replays"] >= 6  # 8 micro-batches; a short last one may run eagerly
    assert abs(metrics["eval_loss"] - _eager_eval_loss(params, tmp_path)) < 2e-3  # the eager run's training
    # uncheckpointed_layers: auto (the default) measured the first micro-batch: both tiny blocks fit.
    assert metrics["uncheckpointed_layers"] == 2
    assert "uncheckpointed_layers: auto keeps 2 of 2 blocks (" in caplog.text
    assert "90% of the GPU's memory)" in caplog.text


def test_a_training_set_smaller_than_the_batch_is_still_graphed(tmp_path, tiny_qwen2_dir, corpus_file):
    import json

    from conftest import load_stage, tiny_params, train_args, write_params

    from qlorapipe import data

    overrides = {"training.max_steps": 3, "training.gradient_accumulation_steps": 1, "model.dtype": "bfloat16"}
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_qwen2_dir, corpus_file, **overrides))
    _download_and_prepare(params, tmp_path)
    rows = len(data.load_split(tmp_path / "data", data.TRAIN_SPLIT))
    write_params(params, tiny_params(tiny_qwen2_dir, corpus_file, **overrides,
                                     **{"training.per_device_batch_size": rows + 3}))
    load_stage("train").main(train_args(params, tmp_path / "base", tmp_path / "data", tmp_path))
    # Every micro-batch holds all the rows: the first is captured, the next two replay it.
    assert json.loads((tmp_path / "train.json").read_text())["cuda_graph_replays"] == 3


@pytest.fixture(scope="module")
def six_block_qwen2_dir(tmp_path_factory):
    from conftest import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-qwen2-6") / "model", "qwen2", num_hidden_layers=6)


def _step_peak_gb(model, inputs: dict, labels, graphed: bool = False) -> float:
    """The peak allocated memory of one forward and backward, from a clean start (GB): eager, or
    captured and replayed as a GraphedStep, as the train stage's first micro-batch is; captured, at least
    what is allocated outside the graph's memory pool plus the pool's reserved segments, read here from
    the allocator's snapshot."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if graphed:
        step = cuda_graphs.GraphedStep(model)
        assert step(inputs, labels, 1.0) is not None, step.failed
        torch.cuda.synchronize()
        pool = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == tuple(step.graph.pool())]
        assert pool
        held = torch.cuda.memory_allocated() + sum(s["total_size"] - s["allocated_size"] for s in pool)
        del step
    else:
        model(**inputs, labels=labels).loss.backward()
        held = 0
    torch.cuda.synchronize()
    peak = max(torch.cuda.max_memory_allocated(), held) / 1e9
    model.zero_grad(set_to_none=True)
    return peak


@pytest.mark.parametrize("packed,graphed", [(False, False), (True, False), (False, True), (True, True)])
def test_auto_keeps_the_blocks_that_fit_in_the_budget_and_leaves_no_trace(six_block_qwen2_dir, packed, graphed):
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(), dropout=0.1)  # auto: nothing yet
    layers = checkpointing.decoder_layers(model)
    assert len(layers) == 6 and all(layer.gradient_checkpointing for layer in layers)
    ids = torch.randint(4, 300, (4, 256), device=device, generator=torch.Generator(device).manual_seed(5))
    inputs = {"input_ids": ids, "use_cache": False}
    if packed:
        inputs["position_ids"] = torch.cat([torch.arange(100), torch.arange(156)]).repeat(4, 1).to(device)
    # The peaks with no block kept and with every block kept, measured here the plain way,
    # after a first step that compiles the kernels.
    _step_peak_gb(model, inputs, ids, graphed)
    none_kept = _step_peak_gb(model, inputs, ids, graphed)
    checkpointing.skip_checkpointing(model, 6)
    all_kept = _step_peak_gb(model, inputs, ids, graphed)
    checkpointing.checkpoint_again(layers)
    assert all_kept > none_kept
    budget = (none_kept + all_kept) / 2

    model.eval()  # put back afterwards, as the gradients and random states are
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    kept, measured = memory_plan.fit_uncheckpointed_layers(model, inputs, ids, budget, device, cuda_graphs=graphed)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state) and torch.equal(torch.get_rng_state(), cpu_state)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not any(layer.training for layer in layers)
    assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()  # the peak statistics were reset
    assert 0 < kept < 6, measured
    assert measured["kept"] == kept and measured["n_blocks"] == 6 and measured["budget_gb"] == round(budget, 3)
    assert measured["peak_all_checkpointed_gb"] == pytest.approx(none_kept, abs=2e-3)
    assert measured["peak_gb"] <= measured["budget_gb"] and measured["per_block_gb"] > 0  # both rounded alike
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (6 - kept) + [False] * kept
    model.train()
    assert _step_peak_gb(model, inputs, ids, graphed) <= budget  # a real step with the blocks it kept


def test_auto_offloads_below_the_all_checkpointed_peak_and_keeps_what_fits_beside(six_block_qwen2_dir, monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's block inputs are small
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams())  # auto: nothing yet
    layers = checkpointing.decoder_layers(model)
    ids = torch.randint(4, 300, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(5))
    inputs = {"input_ids": ids, "use_cache": False}
    _step_peak_gb(model, inputs, ids)
    none_kept = _step_peak_gb(model, inputs, ids)
    checkpointing.skip_checkpointing(model, 1)
    one_kept = _step_peak_gb(model, inputs, ids)
    checkpointing.checkpoint_again(layers)
    assert offload.offload_checkpoints(model, device)
    offloaded = _step_peak_gb(model, inputs, ids)
    for layer in layers:
        offload.remove(layer)
    lowest = min(none_kept, one_kept)  # no count of kept blocks fits without offloading
    assert offloaded < lowest and not offload.offloaded(model)
    budget = lowest - (lowest - offloaded) / 4  # above every block checkpointed and offloaded

    kept, measured = memory_plan.fit_uncheckpointed_layers(model, inputs, ids, budget, device)
    assert measured["offloaded"] and offload.offloaded(model), measured
    assert measured["peak_offloaded_all_checkpointed_gb"] == pytest.approx(offloaded, abs=2e-3)
    assert measured["kept"] == kept == checkpointing.uncheckpointed_count(model) and kept < 6
    assert measured["peak_gb"] <= budget
    model.train()
    assert _step_peak_gb(model, inputs, ids) <= budget  # a real step, offloaded, with the blocks it kept


def test_with_cuda_graphs_the_steps_leave_room_for_an_evaluation_between_them(six_block_qwen2_dir, monkeypatch):
    """The graphs' memory pool keeps a step's peak to itself, so an evaluation between steps allocates beside it:
    the steps are fitted to the budget less what one evaluation allocates (measured on the eval rows). Without
    graphs an evaluation reuses what the step freed, and the steps get the whole budget, less the optimizer's
    state in both cases."""
    from qlorapipe.perplexity import mean_token_loss

    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams())
    ids = torch.randint(4, 300, (4, 256), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "labels": ids}
    mean_token_loss(model, memory_plan._OneBatch(batch), 4, device)  # a first forward creates cuBLAS's workspace
    room = memory_plan.evaluation_room_gb(model, batch, device)
    assert model.training and torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mean_token_loss(model, memory_plan._OneBatch(batch), 4, device)
    assert room > 0 and room == pytest.approx((torch.cuda.max_memory_allocated() - before) / 1e9, abs=1e-3)

    budgets = []

    def fit_on_gpu(model, inputs, labels, params, device, cuda_graphs=False, note=""):
        budgets.append(params.memory_budget_gb)
        return {}

    monkeypatch.setattr(memory_plan, "fit_on_gpu", fit_on_gpu)
    for graphed, optimizer_state in ((True, 0.0), (False, 0.0), (True, 0.125), (False, 0.125)):
        memory_plan.plan_uncheckpointed_layers(model, AccelerationParams(memory_budget_gb=5.0), batch, device,
                                               cuda_graphs=graphed, eval_batch=batch,
                                               optimizer_state_gb=optimizer_state)
    assert budgets[0] == pytest.approx(5.0 - room, abs=2e-3) and budgets[1] == 5.0
    # the optimizer's state, which no measured step holds yet, is left out of the budget with or without graphs
    assert budgets[2] == pytest.approx(5.0 - room - 0.125, abs=2e-3) and budgets[3] == 4.875


def test_auto_with_the_default_budget_keeps_every_tiny_block(six_block_qwen2_dir):
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams())
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(6))
    gc.collect()
    torch.cuda.empty_cache()  # as the probe does before it reads the free memory
    free, _ = torch.cuda.mem_get_info()
    kept, measured = memory_plan.fit_uncheckpointed_layers(model, {"input_ids": ids, "use_cache": False}, ids,
                                                            None, device)
    assert kept == 6 and checkpointing.uncheckpointed_count(model) == 6
    expected = 0.9 * (free + torch.cuda.memory_allocated()) / 1e9
    assert measured["budget_gb"] == pytest.approx(expected, rel=0.01)


def test_a_planned_step_whose_capture_runs_out_of_memory_does_not_fit_and_turns_no_graphs_off(tiny_qwen2_dir, caplog,
                                                                                             monkeypatch):
    """The planner measures counts that may not fit: a capture that ran out of memory is that count not fitting
    (the planner's inf), not a step to run eagerly, and no warning says training goes without graphs; only the
    step with every block recomputed, the least a run needs, is then measured eagerly."""
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams())
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(1))

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(cuda_graphs.GraphedStep, "_run", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        memory_plan.measure_step(model, {"input_ids": ids}, ids, device, cuda_graphs=True)
    # the step recomputing every block: measured eagerly instead, as training runs when its capture fails
    peak, _ = memory_plan.measure_step(model, {"input_ids": ids}, ids, device, cuda_graphs=True,
                                       eager_when_out_of_memory=True)
    assert peak > 0
    assert "CUDA graphs off" not in caplog.text
    torch.rand(8, device=device)  # the generator left capture mode
    training = cuda_graphs.GraphedStep(model)  # the train stage's own step: eager from then on, and says so
    assert training({"input_ids": ids}, ids, 1.0) is None and "CUDA graphs off" in caplog.text


def test_a_step_that_cannot_be_captured_runs_eagerly_and_training_goes_on(tiny_qwen2_dir, caplog):
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams(), dropout=0.1)
    def read_on_host(module, inputs, output):  # a host read of a GPU value, as some layers do: not capturable
        float(output.sum())

    hook = model.get_base_model().model.norm.register_forward_hook(read_on_host)
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(1))
    graphed = cuda_graphs.GraphedStep(model)
    model.zero_grad(set_to_none=True)
    assert graphed({"input_ids": ids}, ids, 1.0) is None
    assert graphed.failed and "CUDA graphs off" in caplog.text
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)
    torch.rand(8, device=device)  # the generator left capture mode (dropout draws from it)
    loss = model(input_ids=ids, labels=ids).loss  # the eager step after the failed capture
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert graphed({"input_ids": ids}, ids, 1.0) is None  # it does not try again
    hook.remove()


def test_the_dropout_kernel_redraws_the_same_mask_from_a_seed_at_the_rate_asked():
    from qlorapipe.train.fast import fused_lora

    x = torch.randn(1000, 999, device="cuda", dtype=torch.bfloat16)
    seed = fused_lora.new_seed("cuda")
    first, second = fused_lora.dropout(x, 0.1, seed), fused_lora.dropout(x, 0.1, seed)
    assert torch.equal(first, second)
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(first[kept].float(), x[kept].float() / 0.9, rtol=1e-2)
    assert not torch.equal(first, fused_lora.dropout(x, 0.1, fused_lora.new_seed("cuda")))
    grad, into = torch.randn_like(x), torch.zeros_like(x)
    assert torch.equal(fused_lora.dropout(x, 0.1, seed, grad, into), first)
    assert torch.equal(into != 0, kept & (grad != 0))  # the same mask on the gradient
    assert torch.allclose(into.float(), torch.where(kept, grad.float() / 0.9, 0.0), rtol=1e-2, atol=1e-2)


def test_the_fused_lora_dropout_kernels_on_cuda():
    from test_fused_lora import check_fused_dropout_kernels

    check_fused_dropout_kernels("cuda", torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_the_chunked_loss_kernel_on_cuda_is_the_plain_loss(chunk_rows):
    from qlorapipe.train.fast import chunked_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1000, 64, device="cuda") * 0.2).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (2, 50), device="cuda")
    labels[0, :5] = -100
    loss = chunked_loss.linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    loss.backward()
    got = hidden.grad.float()
    hidden.grad = None
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).float().reshape(-1, 1000), targets)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-3
    assert torch.nn.functional.cosine_similarity(got.flatten(), hidden.grad.float().flatten(), dim=0) > 0.999
    assert abs(got.norm() / hidden.grad.float().norm() - 1) < 1e-2  # the mean over the labelled tokens, not a sum


@pytest.mark.parametrize("swiglu", [False, True])
def test_the_fused_lora_functions_compute_the_unfused_function_on_cuda(swiglu):
    import bitsandbytes as bnb

    from qlorapipe.train.fast import fused_lora

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    base = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    base = base.cuda()
    lora_a = (torch.randn(16, 256, device="cuda") * 0.1).requires_grad_()
    lora_b = (torch.randn(128, 16, device="cuda") * 0.1).requires_grad_()
    inputs = [torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(2 if swiglu else 1)]
    grad_out = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(5)
    fn = fused_lora.SwigluLoraLinear if swiglu else fused_lora.LoraLinear
    out = fn.apply(*[t * 1 for t in inputs], lora_a, lora_b, base, 2.0, 0.1)
    out.backward(grad_out)
    got = [out.detach().float()] + [t.grad.float() for t in (*inputs, lora_a, lora_b)]
    for t in (*inputs, lora_a, lora_b):
        t.grad = None
    torch.manual_seed(5)
    from test_fused_lora import fused_mask

    mask = fused_mask(128, 256, 16, 0.1, fused_lora.new_seed("cuda"), "cuda", torch.bfloat16).view(4, 32, 256)
    mask = mask.to(torch.bfloat16)  # 0 or 1 / 0.9 (rounded as the kernels round the dropped input)
    x = torch.nn.functional.silu(inputs[0]) * inputs[1] if swiglu else inputs[0]
    ref = base(x) + ((x * mask) @ lora_a.t().bfloat16() @ (lora_b * 2.0).t().bfloat16())
    ref.backward(grad_out)
    expected = [ref.detach().float()] + [t.grad.float() for t in (*inputs, lora_a, lora_b)]
    for value, want in zip(got, expected, strict=True):
        cosine = torch.nn.functional.cosine_similarity(value.flatten(), want.flatten(), dim=0)
        assert cosine > 0.999, cosine
        assert abs(value.norm() / want.norm() - 1) < 1e-2, (value.norm(), want.norm())  # LoRA's scaling once


def test_a_wide_projection_folds_its_adapter_into_the_base_matmul_on_cuda(monkeypatch):
    """The NF4 weight dequantized into a wider buffer is bitsandbytes' to the bit, and the joined matmul
    computes what the two matmuls it replaces compute (bf16 rounding apart), gradients included."""
    import bitsandbytes as bnb

    from qlorapipe.train.fast import fused_lora

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(256, 768, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(768, 256) * 0.05, requires_grad=False, quant_type="nf4")
    base = base.cuda()
    wide = torch.full((768, 272), float("nan"), device="cuda", dtype=torch.bfloat16)
    fused_lora.dequantize_into(base, wide[:, :256])
    assert torch.equal(wide[:, :256], fused_lora.frozen_weight(base, torch.bfloat16))
    assert wide[:, 256:].isnan().all()
    lora_a = (torch.randn(16, 256, device="cuda") * 0.1).requires_grad_()
    lora_b = (torch.randn(768, 16, device="cuda") * 0.1).requires_grad_()
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(4, 32, 768, device="cuda", dtype=torch.bfloat16)
    assert fused_lora.joins(x.detach().reshape(128, 256), base, lora_b)
    runs = []
    for joined in (True, False):
        monkeypatch.setattr(fused_lora, "JOIN_WIDE", joined)
        torch.manual_seed(5)
        out = fused_lora.LoraLinear.apply(x, lora_a, lora_b, base, 2.0, 0.1)
        out.backward(grad_out)
        runs.append([out.detach().float()] + [t.grad.float() for t in (x, lora_a, lora_b)])
        x.grad = lora_a.grad = lora_b.grad = None
    for got, want in zip(*runs, strict=True):
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999


def test_dropout_masks_are_redrawn_by_recomputation_and_fresh_at_every_replay(tiny_qwen2_dir):
    device = torch.device("cuda")
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(2))
    grads = []
    for uncheckpointed in (0, 8):
        model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams(uncheckpointed_layers=uncheckpointed),
                              dropout=0.2)
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad]))
        del loss
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)  # recomputation used the same masks
    graphed = cuda_graphs.GraphedStep(model)
    model.zero_grad(set_to_none=True)
    losses = [float(graphed({"input_ids": ids}, ids, 1.0)) for _ in range(3)]
    assert graphed.failed is None and graphed.replays == 3
    assert len(set(losses)) == 3  # the same batch, different masks at each replay


def test_capturing_again_leaves_no_memory_behind(tiny_qwen2_dir):
    device = torch.device("cuda")
    model, _ = _tiny_lora(tiny_qwen2_dir, AccelerationParams())
    ids = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(4))
    allocated = []
    for _ in range(3):
        graphed = cuda_graphs.GraphedStep(model)
        model.zero_grad(set_to_none=True)
        assert graphed({"input_ids": ids}, ids, 1.0) is not None
        del graphed
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[2] == allocated[1], allocated


def test_a_captured_step_holds_its_pool_and_the_planner_counts_all_of_it(six_block_qwen2_dir):
    """The graph's pool keeps every segment it reserved, unused ends included, until the graph goes: emptying the
    cache gives none of it back. The planner's measure of a captured step counts the pool whole."""
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(uncheckpointed_layers=0))
    ids = torch.randint(4, 300, (4, 256), device=device, generator=torch.Generator(device).manual_seed(6))
    inputs = {"input_ids": ids, "use_cache": False}
    step = cuda_graphs.GraphedStep(model)
    assert step.pool_bytes() == (0, 0)
    assert step(inputs, ids, 1.0) is not None, step.failed
    torch.cuda.synchronize()
    reserved, allocated = step.pool_bytes()
    assert reserved > 0 and allocated <= reserved
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    del step
    gc.collect()
    torch.cuda.empty_cache()
    assert held - torch.cuda.memory_reserved() >= reserved  # the pool went with the graph, not before
    model.zero_grad(set_to_none=True)
    eager, _ = memory_plan.measure_step(model, inputs, ids, device)
    captured, _ = memory_plan.measure_step(model, inputs, ids, device, cuda_graphs=True)
    assert captured >= eager, (captured, eager)
    model.zero_grad(set_to_none=True)


def test_a_captured_steps_pool_is_about_what_the_step_holds_at_once(six_block_qwen2_dir):
    """Captured into an ``arena`` of what its last warm-up held at once, the graph's pool reserves about that and
    no more; the arena goes with the step, and a peak the stage reached before the capture is still the stage's
    peak, though the capture restarted torch's counters. A step that holds less than ``ARENA_MIN_BYTES`` is
    captured into a fresh pool, as before."""
    from qlorapipe import memory

    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(uncheckpointed_layers=0), dropout=0.1)
    small = torch.randint(4, 300, (2, 64), device=device, generator=torch.Generator(device).manual_seed(8))
    step = cuda_graphs.GraphedStep(model)
    assert step({"input_ids": small}, small, 1.0) is not None and step.arena is None
    del step
    ids = torch.randint(4, 300, (256, 256), device=device, generator=torch.Generator(device).manual_seed(8))
    inputs = {"input_ids": ids, "use_cache": False}
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(**inputs, labels=ids).loss.backward()
    held = torch.cuda.max_memory_allocated() - before
    assert held > cuda_graphs.ARENA_MIN_BYTES
    memory.reset_peak(device)
    earlier = torch.empty(held + 2**28, dtype=torch.uint8, device=device)  # a peak above the step's, then freed
    del earlier
    step = cuda_graphs.GraphedStep(model)
    assert step(inputs, ids, 1.0) is not None, step.failed
    torch.cuda.synchronize()
    reserved, _ = step.pool_bytes()
    assert step.arena is not None and tuple(step.arena.pool()) == tuple(step.graph.pool())
    assert abs(reserved - held) <= 0.1 * held + 2**24, (reserved, held)
    assert memory.stage_peaks(device)["peak_gpu_allocated_gb"] >= round((before + held + 2**28) / 1e9, 3) - 0.001
    pool = tuple(step.graph.pool())
    del step
    gc.collect()
    torch.cuda.empty_cache()
    assert not [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == pool]
    model.zero_grad(set_to_none=True)


def _offloads(model) -> offload.CheckpointOffload:
    return checkpointing.decoder_layers(model)[0]._gradient_checkpointing_func.args[1]


def test_offloaded_checkpoints_compute_the_same_step_eagerly_and_graphed_with_less_memory(six_block_qwen2_dir,
                                                                                           monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's block inputs are small
    device = torch.device("cuda")
    ids = torch.randint(4, 300, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(5))
    results = {}
    for offloaded in (False, True):
        model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(uncheckpointed_layers=0,
                                                                       offload_checkpoints=offloaded))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, grads = _loss_and_grads(model, ids, autocast=False, deterministic=True)
        peak = torch.cuda.max_memory_allocated() - before
        graphed = cuda_graphs.GraphedStep(model)
        model.zero_grad(set_to_none=True)
        graphed_loss = float(graphed({"input_ids": ids}, ids, 1.0))
        graphed_grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                                   if p.requires_grad])
        assert graphed.failed is None
        results[offloaded] = (loss, grads, peak, graphed_loss, graphed_grads)
        if offloaded:
            saved = _offloads(model)
            assert len(saved.buffers) == 6 and all(b.is_pinned() for b in saved.buffers.values())
        del model, graphed
        gc.collect()
        torch.cuda.empty_cache()
    (loss, grads, peak, graphed_loss, graphed_grads), offloaded = results[False], results[True]
    assert offloaded[0] == loss and torch.equal(offloaded[1], grads)  # the copies are exact
    assert offloaded[3] == pytest.approx(graphed_loss, rel=1e-6)
    # Replayed graphs may round differently (measured on an H200: 617 of 49,152 entries one bf16 step apart,
    # 1.5e-5 against a largest gradient of 6.1e-3); a wrong or stale copy would be off by the gradient itself.
    difference = (offloaded[4] - graphed_grads).abs()
    largest = float(graphed_grads.abs().max())
    assert float(difference.max()) <= largest * 2**-7, (float(difference.max()), largest)
    assert int((difference > 1e-6).sum()) <= difference.numel() // 20
    # Six blocks' inputs, of which the GPU holds one or two at a time and one more while its copy is in
    # flight: at least two fewer at the peak (measured on an H200: 2.87 fewer, 20.36 MB against 23.38 MB).
    block_input = 8 * 1024 * _hidden_size(six_block_qwen2_dir) * 2
    assert offloaded[2] <= peak - 2 * block_input, (offloaded[2], peak, block_input)


def test_host_kept_blocks_compute_the_same_step_without_recomputing_and_with_less_memory(six_block_qwen2_dir,
                                                                                          monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are small
    device = torch.device("cuda")
    ids = torch.randint(4, 300, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(5))
    results = {}
    for name, params in {"checkpointed": AccelerationParams(uncheckpointed_layers=0),
                         "kept on the GPU": AccelerationParams(uncheckpointed_layers=6),
                         "host-kept": AccelerationParams(uncheckpointed_layers=0, host_kept_layers=3)}.items():
        model, _ = _tiny_lora(six_block_qwen2_dir, params, dropout=0.1)
        layers = checkpointing.decoder_layers(model)
        calls = [0] * 6
        for i, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, grads = _loss_and_grads(model, ids, autocast=False, deterministic=True)
        peak = torch.cuda.max_memory_allocated() - before
        torch.manual_seed(0)
        graphed = cuda_graphs.GraphedStep(model)
        model.zero_grad(set_to_none=True)
        graphed_loss = float(graphed({"input_ids": ids}, ids, 1.0))
        assert graphed.failed is None
        results[name] = (loss, grads, peak, graphed_loss, calls[:])
        if name == "host-kept":
            assert offload.host_kept(model) == 3
            kept = layers[0]._gradient_checkpointing_func.args[0]
            assert kept.blocks == [0, 2, 4] and all(b.is_pinned() for b in kept.buffers.values())
            assert {key[0] for key in kept.buffers} == {0, 2, 4}
            fast.remove(model)
            assert offload.host_kept(model) == 0
            assert not any(getattr(getattr(hook, "func", None), "__self__", None) is kept for layer in layers
                           for hook in (*layer._forward_hooks.values(), *layer._forward_pre_hooks.values()))
        del model, graphed
        gc.collect()
        torch.cuda.empty_cache()
    loss, grads, peak, graphed_loss, calls = results["host-kept"]
    reference = results["checkpointed"]
    assert loss == reference[0] and torch.equal(grads, reference[1])  # the copies are exact
    assert graphed_loss == pytest.approx(reference[3], rel=1e-6)
    # Eagerly, then the graph's warm-up runs and its capture: blocks 0, 2 and 4 run their attention once a
    # step, the others again in the backward pass.
    steps = 2 + cuda_graphs.GraphedStep.WARMUP_RUNS
    assert calls == [steps, 2 * steps] * 3 and results["checkpointed"][4] == [2 * steps] * 6, calls
    assert results["kept on the GPU"][4] == [steps] * 6
    assert peak < results["kept on the GPU"][2], (peak, results["kept on the GPU"][2])


@pytest.mark.parametrize("graphed", [False, True])
def test_auto_host_kept_layers_times_real_steps_and_leaves_no_trace(six_block_qwen2_dir, monkeypatch, graphed):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are small
    monkeypatch.setattr(memory_plan, "HOST_KEPT_MIN_GAIN", -1.0)  # keep the fastest count tried, whatever it gained
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(uncheckpointed_layers=0), dropout=0.1)
    ids = torch.randint(4, 300, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(5))
    inputs = {"input_ids": ids, "use_cache": False}
    model.eval()
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    kept, measured = memory_plan.fit_host_kept_layers(model, inputs, ids, 70.0, device, cuda_graphs=graphed,
                                                      every_block_may_fit=False)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state) and torch.equal(torch.get_rng_state(), cpu_state)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()  # the peak statistics were reset
    # Six checkpointed blocks: none, then one in four and one in three (1 and 2), then one in two (3), sparsest
    # first, until a count is slower than the one before.
    tried = list(measured["seconds"])
    assert tried[0] == 0 and tried[1:] == [1, 2, 3][: len(tried) - 1] and len(tried) >= 2, measured
    assert all(seconds > 0 for seconds in measured["seconds"].values())
    assert all(measured["host_gb"][count] > 0 for count in tried[1:])  # each ran, its copies in pinned memory
    fastest = min(measured["seconds"], key=measured["seconds"].get)
    assert kept == fastest == measured["kept"] == offload.host_kept(model)
    model.train()
    torch.manual_seed(0)
    # A step as planned: the recomputed one's numbers.
    loss, grads = _loss_and_grads(model, ids, autocast=False, deterministic=True)
    offload.bring_back(model)
    assert offload.host_kept(model) == 0
    torch.manual_seed(0)
    recomputed_loss, recomputed_grads = _loss_and_grads(model, ids, autocast=False, deterministic=True)
    assert recomputed_loss == loss and torch.equal(recomputed_grads, grads)


def test_auto_host_kept_layers_times_beside_offloaded_inputs_when_recomputing_is_over_the_budget(six_block_qwen2_dir,
                                                                                             monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are small
    monkeypatch.setattr(memory_plan, "HOST_KEPT_MIN_GAIN", -1.0)  # keep the fastest count tried, whatever it gained
    device = torch.device("cuda")
    model, _ = _tiny_lora(six_block_qwen2_dir, AccelerationParams(uncheckpointed_layers=0), dropout=0.1)
    layers = checkpointing.decoder_layers(model)
    ids = torch.randint(4, 300, (8, 1024), device=device, generator=torch.Generator(device).manual_seed(5))
    inputs = {"input_ids": ids, "use_cache": False}
    _step_peak_gb(model, inputs, ids)
    recomputing = _step_peak_gb(model, inputs, ids)
    assert offload.offload_checkpoints(model, device)
    offloaded = _step_peak_gb(model, inputs, ids)
    for layer in layers:
        offload.remove(layer)
    assert offloaded < recomputing
    budget = offloaded + (recomputing - offloaded) / 2  # the step recomputing every block does not fit
    model.eval()
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    kept, measured = memory_plan.fit_host_kept_layers(model, inputs, ids, budget, device, every_block_may_fit=False)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state) and torch.equal(torch.get_rng_state(), cpu_state)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert measured["peak_not_offloaded_gb"] == pytest.approx(recomputing, abs=2e-3), measured
    assert measured["peak_gb"][0] == pytest.approx(offloaded, abs=2e-3)  # timed again, offloaded
    assert kept == measured["kept"] == offload.host_kept(model)
    # The offloading stays with a count kept (whose peak fitted), and is undone without one.
    assert measured["offloaded"] is bool(kept) and offload.offloaded(model) is bool(kept)
    if kept:
        assert measured["peak_gb"][kept] <= budget
        model.train()
        assert _step_peak_gb(model, inputs, ids) <= budget + 2e-3  # a real step as planned
    fast.remove(model)
    assert not offload.offloaded(model) and offload.host_kept(model) == 0


def test_the_train_stage_plans_host_kept_blocks_by_timing_and_reports_them(tmp_path, six_block_qwen2_dir, corpus_file,
                                                                         monkeypatch, caplog):
    import json
    import re

    from conftest import load_stage, tiny_params, train_args, write_params

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are small
    monkeypatch.setattr(memory_plan, "HOST_KEPT_MIN_GAIN", -1.0)  # keep the fastest count tried, whatever it gained
    caplog.set_level("INFO", logger="qlorapipe.train.fast")
    params = write_params(tmp_path / "params.yaml", tiny_params(six_block_qwen2_dir, corpus_file, **{
        "training.max_steps": 4, "training.gradient_accumulation_steps": 2, "model.dtype": "bfloat16",
        "acceleration.uncheckpointed_layers": 0, "acceleration.host_kept_layers": "auto"}))
    _download_and_prepare(params, tmp_path)
    load_stage("train").main(train_args(params, tmp_path / "base", tmp_path / "data", tmp_path))
    metrics = json.loads((tmp_path / "train.json").read_text())
    # Six blocks, all checkpointed: steps timed with none, then one in four, one in three, one in two kept.
    plan = re.search(r"host_kept_layers: auto keeps (\d+|none)\b.*?a step with N of them: ([^;)]*)", caplog.text)
    assert plan, caplog.text
    tried = [int(entry.split(":")[0]) for entry in plan.group(2).split(", ")]
    assert tried[0] == 0 and tried[1:] == [1, 2, 3][: len(tried) - 1] and len(tried) >= 2, plan.group(0)
    assert metrics["host_kept_layers"] == (0 if plan.group(1) == "none" else int(plan.group(1)))
    assert metrics["host_kept_layers"] in tried and metrics["uncheckpointed_layers"] == 0
    assert metrics["offload_checkpoints"] is False  # no budget: recomputing every block fits
    assert metrics["cuda_graph_replays"] >= 6
    # Host-kept blocks give the gradients recomputation gives: the same training as a run that keeps none.
    assert abs(metrics["eval_loss"] - _eager_eval_loss(params, tmp_path, host_kept_layers=0)) < 2e-3


def _eager_eval_loss(params, tmp_path, **acceleration) -> float:
    """The eval loss of the same training run again without CUDA graphs (and with ``acceleration`` overrides),
    on the data the first run prepared."""
    import json

    import yaml
    from conftest import load_stage, train_args, write_params

    settings = yaml.safe_load(params.read_text())
    settings["acceleration"].update({"cuda_graphs": False, **acceleration})
    (tmp_path / "eager").mkdir()
    again = write_params(tmp_path / "eager" / "params.yaml", settings)
    load_stage("train").main(train_args(again, tmp_path / "base", tmp_path / "data", tmp_path / "eager"))
    return json.loads((tmp_path / "eager" / "train.json").read_text())["eval_loss"]


def _hidden_size(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


@pytest.mark.parametrize("offloaded", [False, True])
def test_lean_recompute_computes_the_same_step_eagerly_and_graphed_on_cuda(six_block_qwen2_dir, monkeypatch,
                                                                           offloaded):
    from qlorapipe.train.fast import fused_lora

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's block inputs are small
    device = torch.device("cuda")
    ids = torch.randint(4, 300, (4, 512), device=device, generator=torch.Generator(device).manual_seed(5))
    calls = []
    real = fused_lora.frozen_weight
    monkeypatch.setattr(fused_lora, "frozen_weight", lambda base, dtype: calls.append(base) or real(base, dtype))
    results = {}
    for lean in (False, True):
        params = AccelerationParams(uncheckpointed_layers=0, offload_checkpoints=offloaded, lean_recompute=lean)
        model, dtype = _tiny_lora(six_block_qwen2_dir, None, dropout=0.1)
        assert ("lean_recompute" in fast.apply(model, params, device, dtype)) == lean
        calls.clear()
        torch.manual_seed(3)  # the dropout seeds
        loss, grads = _loss_and_grads(model, ids, autocast=False, deterministic=True)
        matmuls = len(calls)
        graphed = cuda_graphs.GraphedStep(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        graphed_loss = float(graphed({"input_ids": ids}, ids, 1.0))
        assert graphed.failed is None
        graphed_grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                                   if p.requires_grad])
        results[lean] = (loss, grads, matmuls, graphed_loss, graphed_grads)
        del model, graphed
        gc.collect()
        torch.cuda.empty_cache()
    (loss, grads, matmuls, graphed_loss, graphed_grads), lean = results[False], results[True]
    assert matmuls - lean[2] == 6  # the six blocks' down projections (SwigluLoraLinear) left out of the recomputation
    assert lean[0] == loss and torch.equal(lean[1], grads)  # eagerly: the same bits
    assert lean[3] == pytest.approx(graphed_loss, rel=1e-6)
    difference = (lean[4] - graphed_grads).abs()  # replayed graphs: as in the offload test above
    assert float(difference.max()) <= float(graphed_grads.abs().max()) * 2**-7
    assert int((difference > 1e-6).sum()) <= difference.numel() // 20

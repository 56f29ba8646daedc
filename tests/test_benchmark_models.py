"""The benchmarks' model builders: a sparse checkpoint loads like any other and takes little disk."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT
from transformers.modeling_layers import GradientCheckpointingLayer

sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline_gpu  # noqa: E402
import train_speed  # noqa: E402
import unsloth_peer  # noqa: E402


def test_a_sparse_checkpoint_loads_with_zero_mlp_matrices_and_trains_its_attention_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    path, n_params = train_speed.save_sparse_model("tiny", tmp_path, min_elements=4096)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert n_params == sum(p.numel() for p in model.parameters())  # tied head: counted once
    assert not params["model.layers.0.mlp.gate_proj.weight"].any()  # 64 x 128 >= 4,096: a hole
    assert params["model.embed_tokens.weight"].std() > 0.01
    assert torch.equal(params["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert params["model.layers.0.self_attn.q_proj.weight"].std() > 0.01  # attention: random
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    (shard,) = path.glob("*.safetensors")  # with its index: how large checkpoints are laid out
    assert (path / "model.safetensors.index.json").is_file()
    stat = shard.stat()
    assert stat.st_blocks * 512 < stat.st_size  # the zero matrices take no disk
    # Written once: a second call finds it and computes the same count without writing.
    assert train_speed.save_sparse_model("tiny", tmp_path, min_elements=4096) == (path, n_params)
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns
    # Loaded in 4-bit with LoRA, as the train stage loads it: finite loss, and the attention
    # adapters get gradients (the zero MLP gives its own adapters none).
    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    quantized, _ = modeling.load_base_model(path, QuantizationParams(), torch.device("cpu"))
    quantized = modeling.add_lora(quantized, LoraParams(rank=4, alpha=8), True, True)
    quantized.train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = quantized(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad.abs().sum().item() for n, p in quantized.named_parameters() if "lora_B" in n}
    attention = [g for n, g in grads.items() if "self_attn" in n]
    assert attention and all(g > 0 for g in attention)


def test_the_memory_breakdown_counts_every_storage_of_a_4bit_lora_model_once(tmp_path):
    """benchmarks/memory_breakdown.py: 4-bit weights at half a byte per element, their statistics,
    LoRA in float32, the embeddings; a storage shared by two tensors (the tied head) counted once."""
    import memory_breakdown

    from qlorapipe import modeling
    from qlorapipe.params import QuantizationParams

    path, _ = train_speed.save_random_model("tiny", tmp_path)
    model, _ = modeling.load_base_model(path, QuantizationParams(), torch.device("cpu"))
    model = modeling.add_lora(model, train_speed.lora_params(), quantized=True, gradient_checkpointing=True)
    found = memory_breakdown.breakdown(model)
    config = model.config
    per_block = [(config.hidden_size, config.hidden_size), (config.hidden_size, 32), (config.hidden_size, 32),
                 (config.hidden_size, config.hidden_size)] + [(config.hidden_size, config.intermediate_size)] * 3
    quantized = config.num_hidden_layers * sum(a * b for a, b in per_block)
    assert found["4-bit weights"] == quantized // 2
    assert 0 < found["4-bit absmax"] <= quantized // 64  # one byte per block of 64, double quantized
    lora = config.num_hidden_layers * sum(16 * (a + b) for a, b in per_block)
    assert found["trainable float32"] == 4 * lora
    embedding = config.vocab_size * config.hidden_size
    assert found["frozen embedding/head float32"] == 4 * embedding  # tied: once; float32 from kbit preparation


def test_the_pool_growth_finds_the_requests_that_reserved_segments_and_the_gaps_they_left():
    """benchmarks/memory_breakdown.py's reading of a graph pool from the allocator's recorded events: the
    warm-up's events at the pool's later addresses are not the pool's; a request the pool had the bytes for,
    but not in one piece, is counted as such; the most allocated at once is below what was reserved."""
    import memory_breakdown

    mb = 1 << 20
    frames = [{"filename": "/site/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
              {"filename": "/src/qlorapipe/train/fast/blocks.py", "line": 42, "name": "forward"}]
    events = [  # the warm-up, in memory that empty_cache gave back and the pool got again
        {"action": "segment_alloc", "addr": 0, "size": 20 * mb},
        {"action": "alloc", "addr": 0, "size": 8 * mb},
        {"action": "free_completed", "addr": 0, "size": 8 * mb},
        {"action": "segment_free", "addr": 0, "size": 20 * mb},
        # the capture
        {"action": "segment_alloc", "addr": 0, "size": 20 * mb},
        {"action": "alloc", "addr": 0, "size": 8 * mb, "frames": frames},
        {"action": "alloc", "addr": 8 * mb, "size": 8 * mb},
        {"action": "alloc", "addr": 16 * mb, "size": 4 * mb},
        {"action": "free_completed", "addr": 0, "size": 8 * mb},  # 8 MB free at 0, none after 16 MB
        {"action": "alloc", "addr": 100 * mb, "size": 100},  # elsewhere: not the pool's
        {"action": "segment_alloc", "addr": 20 * mb, "size": 12 * mb},
        {"action": "alloc", "addr": 20 * mb, "size": 12 * mb, "frames": frames},
        {"action": "free_completed", "addr": 8 * mb, "size": 8 * mb},
    ]
    segments = [{"address": 0, "total_size": 20 * mb}, {"address": 20 * mb, "total_size": 12 * mb}]
    grown = memory_breakdown.pool_growth(events, segments)
    assert grown["reserved_bytes"] == 32 * mb and grown["peak_live_bytes"] == 24 * mb
    assert grown["new_segments"] == 2 and grown["new_segments_with_enough_free_bytes"] == 0
    first, second = grown["largest_new_segments"]  # the 20 MB segment, then the 12 MB one
    assert first == {"segment_bytes": 20 * mb, "reserved_before": 0, "free_before": 0, "request_bytes": 8 * mb,
                     "live_before": 0, "where": "fast/blocks.py:42 forward"}
    assert second == {"segment_bytes": 12 * mb, "reserved_before": 20 * mb, "free_before": 8 * mb,
                      "request_bytes": 12 * mb, "live_before": 12 * mb, "where": "fast/blocks.py:42 forward"}
    assert grown["segments"] == {"20 MB": {"count": 1, "bytes": 20 * mb}, "other": {"count": 1, "bytes": 12 * mb}}


def test_the_pipeline_benchmark_sets_parameters_as_dvc_exp_run_does(tmp_path):
    import pytest
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    applied = pipeline_gpu.set_params(params, ["merge.dtype=bfloat16", "acceleration.memory_budget_gb=7.5"])
    assert applied == {"merge.dtype": "bfloat16", "acceleration.memory_budget_gb": 7.5}
    written = yaml.safe_load(params.read_text())
    assert written["merge"]["dtype"] == "bfloat16" and written["acceleration"]["memory_budget_gb"] == 7.5
    assert written["lora"] == yaml.safe_load((ROOT / "params.yaml").read_text())["lora"]
    for bad in ("merge.dtyp=float32", "merge=float32", "nosuch.key=1", "merge.dtype"):
        with pytest.raises(SystemExit, match="--set"):
            pipeline_gpu.set_params(params, [bad])
    assert yaml.safe_load(params.read_text()) == written  # a refused assignment changes nothing
    record = {"shape": "s", "stages": {}, "set": applied}
    assert "set merge.dtype=bfloat16, acceleration.memory_budget_gb=7.5)" in pipeline_gpu.table(record, 7.5)


def test_the_pipeline_benchmark_runs_each_stage_capped_at_the_budget_with_gpu_cap(tmp_path):
    """--gpu-cap puts capped_stage.py before every stage script, with the budget; the wrapper runs the script as
    its own __main__ with the stage's arguments (on the CPU there is no GPU memory to cap)."""
    import argparse
    import os
    import subprocess

    capped = pipeline_gpu.stage_python("train", argparse.Namespace(profile=False, gpu_cap=True, budget=7.5))
    wrapper = ROOT / "benchmarks" / "capped_stage.py"
    assert capped.split() == [sys.executable, str(wrapper), "7.5"]
    assert pipeline_gpu.stage_python("train", argparse.Namespace(profile=False, gpu_cap=False, budget=7.5)) \
        == sys.executable
    stage = tmp_path / "stage.py"
    stage.write_text("import sys\nprint(__name__, sys.argv)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([*capped.split(), str(stage), "--metrics", "m.json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"__main__ {[str(stage), '--metrics', 'm.json']}"


def test_a_stage_run_again_that_failed_keeps_no_figures_of_the_run_before(tmp_path):
    import json

    (tmp_path / "train.json").write_text(json.dumps({"steps": 15}))
    record = {"stages": {}, "train": {"steps": 10}, "merge": {"dtype": "float16"}}  # the earlier run's
    pipeline_gpu.gather_metrics(record, tmp_path)
    assert record == {"stages": {}, "train": {"steps": 15}}


def test_the_peer_counts_the_blocks_a_checkpoint_really_ran_for(tiny_llama_dir):
    """A block flagged for checkpointing whose class forward a wrapper replaced (as unsloth's per-block
    compilation does) is not checkpointed by transformers 5.23: the count says so, the flags do not."""
    import functools

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    ids = torch.arange(4, 20)[None]

    def forward_backward():
        model(input_ids=ids, labels=ids).loss.backward()

    with unsloth_peer.checkpoint_calls(blocks) as called:
        forward_backward()
    assert called == set(range(len(blocks))) and len(blocks) > 1
    assert all("counting" not in getattr(b._gradient_checkpointing_func, "__name__", "") for b in blocks)

    block_class = type(blocks[0])
    wrapped = type("WrappedBlock", (block_class,), {})
    inner = wrapped.forward
    wrapped.forward = functools.wraps(inner)(lambda self, *a, **k: inner(self, *a, **k))  # after the class exists
    for block in blocks:
        block.__class__ = wrapped
    assert all(b.gradient_checkpointing for b in blocks)
    with unsloth_peer.checkpoint_calls(blocks) as called:
        forward_backward()
    assert called == set()


def test_block_costs_times_each_part_and_recomputes_the_mlp_without_the_down_projections_matmul(tmp_path,
                                                                                               monkeypatch):
    """benchmarks/block_costs.py on the CPU (tiny shape): every part timed, and the MLP as ``lean_recompute``
    recomputes it dequantizes one 4-bit weight fewer (gate and up, not down) than the MLP's forward."""
    import block_costs

    from qlorapipe.train.fast import fused_lora

    monkeypatch.setitem(block_costs.CASES, "tiny", ("tiny", 16, 2))
    dequantized = []
    frozen_weight = fused_lora.frozen_weight
    monkeypatch.setattr(fused_lora, "frozen_weight", lambda base, dtype: dequantized.append(1) or frozen_weight(base, dtype))
    per_part = []

    def once(fn, reps, warmup=3):  # one call per part, counting the 4-bit weights it dequantized
        before = len(dequantized)
        fn()
        per_part.append(len(dequantized) - before)
        return 1.0

    monkeypatch.setattr(block_costs, "gpu_ms", once)
    row = block_costs.measure("tiny", tmp_path, reps=1, device=torch.device("cpu"))
    assert row["blocks"] == 2 and "lean_recompute" in row["applied"]
    assert per_part[:3] == [4, 3, 2]  # attention: q, k, v, o; the MLP: gate, up, down; recomputed: no down
    ms, derived = row["ms_per_block"], row["derived_ms_per_block"]
    assert set(ms) == {"attention_forward", "mlp_forward", "mlp_forward_lean_recompute", "input_norm", "q_proj",
                       "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "q_proj_base_only", "gate_proj_base_only",
                       "down_proj_base_only", "q_proj_matmul_only", "down_proj_matmul_only",
                       "gate_proj_adapter_down", "gate_proj_adapter_up", "gate_proj_matmul_accumulating",
                       "gate_proj_matmul_joined", "gate_proj_join_input",
                       "gate_proj_unjoined", "mlp_forward_unjoined", "mlp_backward_unjoined",
                       "attention_backward", "mlp_backward"}
    assert derived["recompute_lean"] == ms["attention_forward"] + ms["mlp_forward_lean_recompute"]
    assert row["derived_ms_per_step_all_blocks"] == {"kept": 2 * (derived["forward"] + derived["backward"]),
                                                     "all_recomputed_lean": 2 * (derived["forward"] + derived["backward"]
                                                                                 + derived["recompute_lean"])}


def test_the_peer_row_records_the_versions_of_what_it_ran_with():
    import torch

    found = unsloth_peer._versions(("torch", "pyyaml", "no-such-package-here"))
    assert found == {"torch": torch.__version__, "pyyaml": __import__("importlib.metadata").metadata.version("PyYAML"),
                     "no-such-package-here": None}
    assert "torchao" in unsloth_peer.PEER_PACKAGES and "triton" in unsloth_peer.PEER_PACKAGES

"""Every quantization mode and LoRA switch of params.yaml, each loaded and trained on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from qlorapipe import modeling
from qlorapipe.errors import UserError
from qlorapipe.params import LoraParams, QuantizationParams
from qlorapipe.train import loop as training

CPU = torch.device("cpu")
LORA = LoraParams(rank=8, alpha=16, dropout=0.0)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _losses_on_one_batch(model, steps: int = 3, learning_rate: float = 0.01) -> list[float]:
    """Train on one fixed batch: the loss must fall if gradients reach the adapter."""
    ids = _ids(model.config.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.make_optimizer("adamw_torch", trainable, learning_rate, 0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("quant", "layer_class", "dtype"), [
    (QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=True, compute_dtype="float32"),
     "Linear4bit", torch.float32),
    (QuantizationParams(load_in="4bit", quant_type="fp4", use_double_quant=True, compute_dtype="float32"),
     "Linear4bit", torch.float32),
    (QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=False, compute_dtype="bfloat16"),
     "Linear4bit", torch.bfloat16),
    (QuantizationParams(load_in="4bit", quant_type="fp4", use_double_quant=False, compute_dtype="auto"),
     "Linear4bit", None),  # None: auto's choice for this CPU (test_auto_computes_in_bfloat16_where_the_cpu_does)
    (QuantizationParams(load_in="8bit", compute_dtype="float32"), "Linear8bitLt", torch.float32),
    (QuantizationParams(load_in="none", compute_dtype="float32"), "Linear", torch.float32),
    (QuantizationParams(load_in="none", compute_dtype="bfloat16"), "Linear", torch.bfloat16),
], ids=["nf4-dq-fp32", "fp4-dq-fp32", "nf4-bf16", "fp4-auto", "8bit", "16bit-lora-fp32", "16bit-lora-bf16"])
def test_each_quantization_mode_loads_as_asked_and_trains(tiny_llama_dir, quant, layer_class, dtype):
    model, compute_dtype = modeling.load_base_model(tiny_llama_dir, quant, CPU)
    dtype = dtype or (torch.bfloat16 if modeling.cpu_computes_bfloat16() else torch.float32)
    assert compute_dtype == dtype
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_class
    if layer_class == "Linear4bit":
        assert q_proj.weight.quant_type == quant.quant_type
        assert (q_proj.weight.quant_state.nested is True) == quant.use_double_quant
        assert q_proj.compute_dtype == dtype
    if layer_class == "Linear8bitLt":
        assert q_proj.weight.dtype == torch.int8
    model = modeling.add_lora(model, LORA, quant.load_in != "none", gradient_checkpointing=True)
    losses = _losses_on_one_batch(model)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_auto_computes_in_bfloat16_where_the_cpu_does(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert modeling.resolve_compute_dtype("auto", CPU) == expected
    assert modeling.resolve_compute_dtype("float32", CPU) == torch.float32  # named dtypes are kept


def test_float16_compute_is_refused_on_the_cpu(tiny_llama_dir):
    with pytest.raises(UserError, match="compute_dtype float16 is not supported on the CPU; use auto or float32"):
        modeling.load_base_model(tiny_llama_dir, QuantizationParams(compute_dtype="float16"), CPU)


def _lora_model(model_dir, lora: LoraParams):
    torch.manual_seed(0)
    quant = QuantizationParams(load_in="4bit", compute_dtype="float32")
    model, _ = modeling.load_base_model(model_dir, quant, CPU)
    return modeling.add_lora(model, lora, quantized=True, gradient_checkpointing=False)


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(tiny_llama_dir):
    plain = _lora_model(tiny_llama_dir, LORA)
    rs = _lora_model(tiny_llama_dir, LoraParams(rank=8, alpha=16, dropout=0.0, use_rslora=True))
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16 / 8
    assert rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(16 / math.sqrt(8))


def test_dora_trains_a_magnitude_per_output_and_saves_it(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    model = _lora_model(tiny_llama_dir, LoraParams(rank=8, alpha=16, dropout=0.0, use_dora=True))
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 * 7 and all(p.requires_grad for p in magnitudes.values())
    q_magnitude = next(p for n, p in magnitudes.items() if "layers.0.self_attn.q_proj" in n)
    assert q_magnitude.shape == (64,)
    before = q_magnitude.detach().clone()
    losses = _losses_on_one_batch(model)
    assert losses[-1] < losses[0] and not torch.equal(q_magnitude.detach(), before)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in key for key in saved) == 14


def test_modules_to_save_trains_and_saves_the_whole_module(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    model = _lora_model(tiny_llama_dir, LoraParams(rank=8, alpha=16, dropout=0.0, modules_to_save=["lm_head"]))
    full = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert full == ["base_model.model.lm_head.modules_to_save.default.weight"]
    trainable, _ = modeling.parameter_counts(model)
    assert trainable == modeling.parameter_counts(_lora_model(tiny_llama_dir, LORA))[0] + 320 * 64
    model.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")


def test_modules_to_save_naming_nothing_lists_the_models_modules(tiny_llama_dir):
    with pytest.raises(UserError, match=r"modules_to_save \['output_layer'\] match no module.*embed_tokens.*lm_head"):
        _lora_model(tiny_llama_dir, LoraParams(modules_to_save=["output_layer"]))


@pytest.mark.parametrize(("bias", "extra"), [("none", 0), ("lora_only", 2 * 64), ("all", 2 * (64 + 32 + 32))])
def test_bias_trains_no_biases_the_adapted_layers_biases_or_all(tiny_qwen2_dir, bias, extra):
    # Qwen2 has biases on q, k and v only; the adapter targets q_proj alone.
    lora = LoraParams(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj"], bias=bias)
    model = _lora_model(tiny_qwen2_dir, lora)
    lora_only = 2 * 8 * (64 + 64)
    assert modeling.parameter_counts(model)[0] == lora_only + extra
    biases = sorted(next(part for part in n.split(".") if part.endswith("_proj"))
                    for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    expected = {"none": [], "lora_only": ["q_proj"] * 2, "all": ["k_proj"] * 2 + ["q_proj"] * 2 + ["v_proj"] * 2}
    assert biases == expected[bias]


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_the_optimizer_state_the_memory_plan_counts_is_what_the_optimizer_holds_after_a_step(name):
    """LoRA-like shapes (8-bit states with their absmax blocks), a small one (32-bit states below 4,096 elements),
    a bfloat16 one and one of 102,400 elements, whose state buffers a paged optimizer pages (on a GPU; on the CPU
    they are plain tensors, so they are taken out of what is held here): the bytes ``optimizer_state_bytes``
    counts are the state tensors' after the first step (the shared quantization maps and torch's step counters
    on the host aside)."""
    params = [torch.nn.Parameter(torch.randn(16, 2048)), torch.nn.Parameter(torch.randn(2048, 16)),
              torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16)),
              torch.nn.Parameter(torch.randn(400, 256))]
    optimizer = training.make_optimizer(name, params, 1e-3, 0.0)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    paged = {"state1", "state2"} if name.startswith("paged_") else set()
    held = sum(value.nbytes for param, state in optimizer.state.items() for key, value in state.items()
               if torch.is_tensor(value) and key not in ("qmap1", "qmap2", "step", "unorm_vec")
               and not (key in paged and param.numel() >= 100_000))
    assert held > 0 and training.optimizer_state_bytes(name, params) == held
    big = 2 * 4 * 400  # the big parameter's absmax blocks, on the GPU paged or not
    if name == "adamw_8bit":  # a byte an element twice, plus the absmax blocks; 32-bit states below 4,096 elements
        assert held == 2 * (2 * 32768 + 2 * 4 * 128) + 8 * 100 + 2 * (5000 + 4 * 20) + 2 * 102400 + big
    if name == "paged_adamw_8bit":  # the same, less the big parameter's paged state buffers
        assert held == 2 * (2 * 32768 + 2 * 4 * 128) + 8 * 100 + 2 * (5000 + 4 * 20) + big

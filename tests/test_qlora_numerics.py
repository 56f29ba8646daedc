"""QLoRA mechanics on tiny Llama and Qwen2 models: real bitsandbytes 4-bit layers, real peft adapters."""

from __future__ import annotations

import pytest
import torch

from qlorapipe import fidelity, modeling
from qlorapipe.merge import merging
from qlorapipe.params import LoraParams, QuantizationParams

CPU = torch.device("cpu")
QUANT = QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=True, compute_dtype="float32")
LORA = LoraParams(rank=8, alpha=16, dropout=0.0, target_modules="all-linear")


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _randomize_lora_b(model, scale: float = 0.05) -> None:
    """peft initialises B to zero (the adapter starts as a no-op); give it values to test merging."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * scale


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


def test_linear_layers_are_bitsandbytes_4bit(model_dir):
    import bitsandbytes as bnb

    model, dtype = modeling.load_base_model(model_dir, QUANT, CPU)
    layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"))]
    assert len(layers) == 2 * 7
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in layers)
    assert all(layer.weight.quant_type == "nf4" for layer in layers)
    assert dtype == torch.float32
    assert modeling.linear_module_names(model) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_adapter_starts_as_identity_and_changes_the_output_once_trained(model_dir):
    model, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    ids = _input_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model = modeling.add_lora(model, LORA, quantized=True, gradient_checkpointing=False)
    trainable, total = modeling.parameter_counts(model)
    # rank 8 on 7 projections of 2 layers: (in + out) * r per projection
    expected = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
        _randomize_lora_b(model)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2


def test_saved_adapter_reloads_to_identical_logits(model_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    model = modeling.add_lora(model, LORA, quantized=True, gradient_checkpointing=False)
    _randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    ids = _input_ids(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_dequantize_then_merge_matches_what_was_trained_and_naive_merge_does_not(model_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    model = modeling.add_lora(model, LORA, quantized=True, gradient_checkpointing=False)
    _randomize_lora_b(model, scale=0.2)
    model.save_pretrained(tmp_path / "adapter")
    ids = [_input_ids(model.config.vocab_size)]

    base, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    reference = fidelity.logits_on(PeftModel.from_pretrained(base, tmp_path / "adapter"), ids, CPU)
    good = merging.merge_adapter(model_dir, tmp_path / "adapter", QUANT, torch.float32, CPU)
    naive = merging.merge_adapter(model_dir, tmp_path / "adapter", QUANT, torch.float32, CPU, from_quantized=False)
    assert not any("Linear4bit" in type(m).__name__ for m in good.modules())
    good_fidelity = fidelity.compare(reference, fidelity.logits_on(good, ids, CPU), ids)
    naive_fidelity = fidelity.compare(reference, fidelity.logits_on(naive, ids, CPU), ids)
    # bitsandbytes' CPU 4-bit matmul rounds like bfloat16, so "the same" is 1e-2 here, not 1e-6.
    assert good_fidelity.max_logit_diff < 1e-2
    assert naive_fidelity.max_logit_diff > 10 * good_fidelity.max_logit_diff
    assert abs(good_fidelity.perplexity_change) < 1e-3


def test_unknown_target_module_lists_the_models_linear_layers(tiny_llama_dir):
    from qlorapipe.errors import UserError

    model, _ = modeling.load_base_model(tiny_llama_dir, QUANT, CPU)
    bad = LoraParams(target_modules=["q_proj", "query_key_value"])
    with pytest.raises(UserError, match=r"\['query_key_value'\] match no linear layer.*down_proj, gate_proj, k_proj"):
        modeling.add_lora(model, bad, quantized=True, gradient_checkpointing=False)


def test_sixteen_bit_lora_needs_no_bitsandbytes_layers(tiny_llama_dir):
    model, _ = modeling.load_base_model(tiny_llama_dir, QuantizationParams(load_in="none"), CPU)
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())
    model = modeling.add_lora(model, LORA, quantized=False, gradient_checkpointing=True)
    ids = _input_ids(model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    # B starts at zero, so the first gradient reaches B only (A's gradient is B^T times something).
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_gradients_through_4bit_layers_match_the_dequantized_model(tiny_llama_dir):
    """Backward through bitsandbytes' 4-bit matmul gives the gradients of the function it computes."""
    torch.manual_seed(0)
    quantized, _ = modeling.load_base_model(tiny_llama_dir, QUANT, CPU)
    quantized = modeling.add_lora(quantized, LORA, quantized=True, gradient_checkpointing=True)
    _randomize_lora_b(quantized, scale=0.1)
    adapter = {n: p.detach().clone() for n, p in quantized.named_parameters() if "lora_" in n}
    reference, _ = modeling.load_base_model(tiny_llama_dir, QUANT, CPU)
    reference = modeling.add_lora(reference.dequantize(dtype=torch.float32), LORA, quantized=False,
                                  gradient_checkpointing=False)
    for name, param in reference.named_parameters():
        if name in adapter:
            param.data = adapter[name].clone()
    ids = _input_ids(quantized.config.vocab_size)
    quantized(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in quantized.named_parameters():
        if "lora_" in name:
            cosine = torch.nn.functional.cosine_similarity(param.grad.flatten(), expected[name].grad.flatten(), dim=0)
            assert cosine > 0.9999, name

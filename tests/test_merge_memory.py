"""The merge within a memory budget: layer-by-layer merging, chunked comparison, budget checks (CPU, tiny models)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_model_dir

from qlorapipe import data, fidelity, memory, modeling
from qlorapipe.errors import UserError
from qlorapipe.merge import merging
from qlorapipe.params import LoraParams, QuantizationParams

CPU = torch.device("cpu")
QUANT = QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=True, compute_dtype="float32")


def _adapter(model_dir, path, **lora):
    """A saved adapter with random B (peft starts B at zero) and, with bias=all, changed biases."""
    torch.manual_seed(0)
    model, _ = modeling.load_base_model(model_dir, QUANT, CPU)
    params = LoraParams(rank=4, alpha=8, dropout=0.0, **lora)
    model = modeling.add_lora(model, params, quantized=True, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_A" not in name:
            param.data = param.data + torch.randn(param.shape, generator=generator) * 0.1
    model.save_pretrained(path)
    return path


def _whole_model_merge(model_dir, adapter, dtype, from_quantized=True):
    """The merge as it was before it went layer by layer: the whole model in float32, peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if from_quantized:
        model, _ = modeling.load_base_model(model_dir, QUANT, CPU)
        model = model.dequantize(dtype=torch.float32).to(torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().to(dtype)


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"bias": "all", "target_modules": ["q_proj", "v_proj"]}],
                         ids=["lora", "dora", "bias-all-some-targets"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_by_layer_merge_writes_the_whole_model_merges_tensors_bit_for_bit(tiny_qwen2_dir, tmp_path, lora,
                                                                                  dtype):
    adapter = _adapter(tiny_qwen2_dir, tmp_path / "adapter", **lora)
    for from_quantized in (True, False):
        expected = _whole_model_merge(tiny_qwen2_dir, adapter, dtype, from_quantized).state_dict()
        found = merging.merge_adapter(tiny_qwen2_dir, adapter, QUANT, dtype, CPU, from_quantized).state_dict()
        assert sorted(found) == sorted(expected)
        different = [key for key in expected if found[key].dtype != dtype or not torch.equal(found[key], expected[key])]
        assert different == []
    # The two merges really differ (the quantization error), and the adapter really changed something.
    merged = merging.merge_adapter(tiny_qwen2_dir, adapter, QUANT, dtype, CPU).state_dict()
    naive = merging.merge_adapter(tiny_qwen2_dir, adapter, QUANT, dtype, CPU, from_quantized=False).state_dict()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           naive["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"bias": "all", "target_modules": ["q_proj", "v_proj"]}],
                         ids=["lora", "dora", "bias-all-some-targets"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", [CPU] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else []), ids=str)
def test_the_merged_model_turned_naive_in_place_is_the_naive_merge_bit_for_bit(tiny_qwen2_dir, tmp_path, lora, dtype,
                                                                                 device):
    from peft import PeftModel

    adapter = _adapter(tiny_qwen2_dir, tmp_path / "adapter", **lora)
    budget = 1e12  # the whole model on the device, as in the stage when it fits
    naive = merging.merge_adapter(tiny_qwen2_dir, adapter, QUANT, dtype, device, from_quantized=False)
    expected = memory.place(naive, device, budget, 0)[0].state_dict()  # as the stage compares it (float32 on a CPU)
    with_adapter = PeftModel.from_pretrained(modeling.load_base_model(tiny_qwen2_dir, QUANT, device)[0], adapter)
    merged = merging.merged_model(with_adapter, tiny_qwen2_dir, dtype)
    adapters = merging.adapters_only(with_adapter)
    # The quantized weights are gone from every adapted layer; the adapters stay.
    assert adapters[0] and not any(hasattr(layer.get_base_layer(), "weight") for layer in adapters[0].values())
    assert adapters[1] == ([] if "target_modules" not in lora else
                           [n for n, m in merged.named_modules() if n.endswith(("k_proj", "o_proj", "up_proj",
                                                                                  "down_proj", "gate_proj"))])
    # As the stage does: the adapters wait on the CPU while the merged model is placed, then come back.
    assert not any(getattr(layer.get_base_layer(), "quant_state", None) is not None for layer in adapters[0].values())
    merging.move_adapters(adapters, "cpu")
    assert {p.device.type for layer in adapters[0].values() for p in layer.parameters()} == {"cpu"}
    placed = memory.place(merged, device, budget, 0)[0]
    merging.move_adapters(adapters, device)
    before = {key: value.clone() for key, value in placed.state_dict().items()}
    found = merging.naive_in_place(placed, adapters, memory.load_on_cpu(tiny_qwen2_dir, "auto"), dtype).state_dict()
    assert sorted(found) == sorted(expected)
    assert [key for key in expected if not torch.equal(found[key], expected[key])] == []
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], found["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_a_tied_embedding_trained_alone_is_merged_untied_and_computes_what_was_trained(tiny_llama_dir, tmp_path,
                                                                                       saved):
    """The tiny models tie input and output embeddings (as Qwen2.5 up to 3B and SmolLM2 do); training one of them
    in full (lora.modules_to_save) unties them in the trained model, and the merge must keep both."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter", modules_to_save=[saved])
    merged = merging.merge_adapter(tiny_llama_dir, adapter, QUANT, torch.float32, CPU)
    assert merged.config.tie_word_embeddings is False
    assert merged.get_input_embeddings().weight is not merged.get_output_embeddings().weight
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    trained = PeftModel.from_pretrained(modeling.load_base_model(tiny_llama_dir, QUANT, CPU)[0], adapter).eval()
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(input_ids=ids).logits
    assert (want - base).abs().max() > 0.05  # the trained embedding changed what the model computes
    assert (got - want).abs().max() < 2e-3, (got - want).abs().max()


def test_adapters_only_drops_the_int8_copy_an_8bit_layer_keeps_once_it_has_run(tiny_qwen2_dir, tmp_path):
    from peft import PeftModel

    adapter = _adapter(tiny_qwen2_dir, tmp_path / "adapter")
    base, _ = modeling.load_base_model(tiny_qwen2_dir, QuantizationParams(load_in="8bit"), CPU)
    with_adapter = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        with_adapter(input_ids=torch.tensor([[5, 6, 7]]))  # as the stage's reference logits
    states = [layer.get_base_layer().state for layer in merging.adapters_only(with_adapter)[0].values()]
    assert states and all(state.CB is None and state.SCB is None for state in states)


@pytest.mark.parametrize("device", [CPU] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else []), ids=str)
def test_an_8bit_merge_computes_base_plus_adapter_with_the_int8_rounding_of_inputs_off(tiny_qwen2_dir, tmp_path,
                                                                                        device):
    """LLM.int8() rounds each matmul's input to int8; the merged model cannot, and is measured without it."""
    import bitsandbytes as bnb
    from peft import PeftModel

    adapter = _adapter(tiny_qwen2_dir, tmp_path / "adapter")
    eight_bit = QuantizationParams(load_in="8bit", compute_dtype="float32")
    with_adapter = PeftModel.from_pretrained(modeling.load_base_model(tiny_qwen2_dir, eight_bit, device)[0], adapter)
    merged = merging.merged_model(with_adapter, tiny_qwen2_dir, torch.float32).to(device)
    ids = [torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))]
    rounded = bnb.nn.Linear8bitLt.forward
    as_trained = fidelity.logits_on(with_adapter, ids, device)
    with merging.int8_inputs_unrounded():
        unrounded = fidelity.logits_on(with_adapter, ids, device)
    assert bnb.nn.Linear8bitLt.forward is rounded
    merged_logits = fidelity.logits_on(merged, ids, device)
    exact = fidelity.compare(unrounded, merged_logits, ids)
    apart = fidelity.compare(as_trained, merged_logits, ids)
    assert exact.max_logit_diff < 1e-4, exact
    assert apart.max_logit_diff > 100 * max(exact.max_logit_diff, 1e-6), apart


def test_chunked_comparison_gives_the_whole_batch_figures():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 17), generator=generator)
    reference = [torch.randn(3, 17, 50, generator=generator) * 4]
    candidate = [reference[0] + torch.randn(3, 17, 50, generator=generator) * 0.1]
    whole = fidelity.Comparison(chunk_elements=10**9)
    whole.add(reference[0], candidate[0], ids)
    for chunk in (1, 50, 120, 333):
        chunked = fidelity.Comparison(chunk_elements=chunk)
        chunked.add(reference[0], candidate[0], ids)
        assert chunked.result().as_metrics() == whole.result().as_metrics()
        assert chunked.tokens == 3 * 16
    # Against a plain computation of the same figures.
    diff = (reference[0] - candidate[0]).abs()
    figures = whole.result()
    assert figures.max_logit_diff == float(diff.max())
    assert figures.mean_logit_diff == pytest.approx(float(diff.double().mean()), rel=1e-12)
    nll = torch.nn.functional.cross_entropy(candidate[0][:, :-1].reshape(-1, 50).double(), ids[:, 1:].reshape(-1))
    assert figures.perplexity == pytest.approx(float(nll.exp()), rel=1e-6)


def test_comparisons_score_only_the_positions_whose_next_token_is_a_training_target():
    """A packed chat row's padding and prompts are not compared: only where training took a loss."""
    import datasets

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 9), generator=generator)
    labels = ids.clone()
    labels[0, :3] = data.IGNORE_INDEX  # a prompt
    labels[0, 6:] = data.IGNORE_INDEX  # padding
    labels[1, 0] = data.IGNORE_INDEX
    split = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")
    scored = fidelity.scored_positions(split, batch_size=2, n_batches=1)
    assert scored[0].tolist() == [[False, False, True, True, True, False, False, False, False], [True] * 8 + [False]]
    reference = torch.randn(2, 9, 50, generator=generator)
    candidate = reference.clone()
    candidate[0, 6:] += 100.0  # what the model predicts after its padding: not compared
    candidate[0, 0] -= 100.0  # nor inside the prompt
    candidate[1, 4] += torch.randn(50, generator=generator)  # compared
    found = fidelity.compare([reference], [candidate], [ids], scored)
    kept = scored[0]
    diff = (reference - candidate).abs()[kept]
    assert found.max_logit_diff == float(diff.max()) < 100.0
    assert found.mean_logit_diff == pytest.approx(float(diff.double().mean()), rel=1e-12)
    targets = ids[:, 1:][kept[:, :-1]]
    nll = torch.nn.functional.cross_entropy(candidate[kept].double(), targets)
    assert found.perplexity == pytest.approx(float(nll.exp()), rel=1e-6)
    chunked = fidelity.Comparison(chunk_elements=120)  # two positions a chunk
    chunked.add(reference, candidate, ids, kept)
    assert chunked.result().as_metrics() == found.as_metrics() and chunked.tokens == 11
    assert math.isnan(fidelity.compare([reference], [candidate], [ids], [kept & False]).max_logit_diff)


def test_rows_at_a_time_compare_like_whole_batches(tiny_llama_dir):
    model = memory.load_on_cpu(tiny_llama_dir, torch.float32)
    batches = [torch.randint(4, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    reference = fidelity.logits_on(model, batches, CPU)
    by_rows = fidelity.logits_on(model, batches, CPU, rows_at_once=1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(reference, by_rows))
    whole = fidelity.compare(reference, fidelity.logits_on(model, batches, CPU), batches)
    rows = fidelity.compare_model(reference, model, batches, CPU, rows_at_once=1)
    assert rows.max_logit_diff < 1e-4 and whole.max_logit_diff == 0.0
    assert rows.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


def test_quantized_weight_estimate_matches_the_loaded_4bit_model(tiny_llama_dir):
    loaded, _ = modeling.load_base_model(tiny_llama_dir, QuantizationParams(compute_dtype="bfloat16"), CPU)
    estimate = memory.weight_bytes(memory.meta_model(tiny_llama_dir), "4bit", use_double_quant=True)
    assert estimate == pytest.approx(loaded.get_memory_footprint(return_buffers=False), rel=0.1)
    # 16 bits for everything is the ceiling; 4 bits for the linear layers must be well below it.
    assert estimate < 0.6 * memory.weight_bytes(memory.meta_model(tiny_llama_dir), "none")


def test_a_budget_below_what_merge_needs_stops_before_loading_weights(prepared, monkeypatch):
    from qlorapipe import merge
    from qlorapipe.data import EVAL_SPLIT, load_split

    batches = fidelity.eval_batches(load_split(prepared / "data/prepared", EVAL_SPLIT), batch_size=4, n_batches=2)
    monkeypatch.setattr(modeling, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    rows, reserve = merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, 8e9, 8.0, False,
                                        False)
    assert rows == 4 and reserve > memory.SLACK_BYTES
    with pytest.raises(UserError) as error:
        merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, 1e8, 0.1, False, False)
    message = str(error.value)
    assert message.startswith("acceleration.memory_budget_gb: the merge stage needs at least ")
    need = float(message.split("at least ")[1].split(" GB")[0])
    assert 0.1 < need < 8 and "raise acceleration.memory_budget_gb to" in message and "\n" not in message


def test_the_merge_reserves_room_for_the_naive_merge_of_its_largest_layer(prepared, monkeypatch):
    from qlorapipe import merge
    from qlorapipe.data import EVAL_SPLIT, load_split

    batches = fidelity.eval_batches(load_split(prepared / "data/prepared", EVAL_SPLIT), batch_size=4, n_batches=2)
    _, reserve = merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, None, None, False, False)
    largest = 10**9  # elements: a weight whose naive merge outgrows the comparison's working memory
    monkeypatch.setattr(memory, "largest_weight", lambda model: largest)
    assert merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, None, None, False,
                               False)[1] == reserve
    assert merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, None, None, False,
                               True)[1] == 16 * largest
    # The adapters come back to the device for the naive step.
    assert merge._check_budget(prepared / "models/base", QUANT, torch.float16, batches, None, None, False,
                               True, 12345)[1] == 16 * largest + 12345


def test_the_adapter_is_counted_in_float32_as_peft_loads_it(tmp_path):
    from safetensors.torch import save_file

    from qlorapipe import merge

    save_file({"a.lora_A.weight": torch.zeros(8, 64, dtype=torch.bfloat16),
               "a.lora_B.weight": torch.zeros(32, 8, dtype=torch.float32),
               "a.base_layer.bias": torch.zeros(32, dtype=torch.bfloat16),  # bias: all
               "lm_head.weight": torch.zeros(100, 64)},  # modules_to_save: not kept for the naive step
              str(tmp_path / "adapter_model.safetensors"))
    assert merge._adapter_bytes(tmp_path) == 4 * (8 * 64 + 32 * 8 + 32)
    assert merge._adapter_bytes(tmp_path / "missing") == 0


def test_on_the_cpu_a_float16_model_computes_in_float32_with_the_same_weights(tiny_llama_dir):
    model = memory.load_on_cpu(tiny_llama_dir, torch.float16)
    weights = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    placed, offloaded = memory.place(model, CPU, budget=None, reserve=0)
    assert offloaded == 0 and placed.dtype == torch.float32
    assert torch.equal(placed.model.layers[0].mlp.up_proj.weight.half(), weights)


def test_train_evaluate_and_export_check_the_budget_before_loading(tiny_llama_dir):
    memory.check_quantized_fits("evaluate", tiny_llama_dir, QUANT, 4, 256, 1e9, 1.0)  # fits
    memory.check_quantized_fits("evaluate", tiny_llama_dir, QUANT, 4, 256, None, None)  # CPU: no budget
    with pytest.raises(UserError, match=r"^acceleration\.memory_budget_gb: the evaluate stage needs at least "
                                        r"0\.\d\d GB of GPU memory for this model \(the quantized base \+ adapter "
                                        r"and 4 x 256 tokens of logits\), above the budget of 0\.01 GB"):
        memory.check_quantized_fits("evaluate", tiny_llama_dir, QUANT, 4, 256, 1e7, 0.01)
    # train: its loss never holds every logit, so the weights are what it cannot do without.
    with pytest.raises(UserError, match=r"^acceleration\.memory_budget_gb: the train stage needs at least "
                                        r"0\.\d\d GB of GPU memory for this model \(the quantized base \+ adapter\), "
                                        r"above the budget of 0\.01 GB"):
        memory.check_quantized_fits("train", tiny_llama_dir, QUANT, 0, 0, 1e7, 0.01)


def test_evaluate_counts_a_batch_of_logits_only_where_it_holds_them_whole(tiny_llama_dir, tmp_path):
    """The evaluation loss runs a plain head a chunk at a time (perplexity.mean_token_loss): its budget check
    counts a batch's logits only for a trained head, a family whose forward computes its logits itself, or
    lm-eval's tasks (which take a batch's logits whole)."""
    import json

    from transformers import GPT2Config

    from qlorapipe.evaluate import _holds_whole_logits
    from qlorapipe.params import EvaluateParams

    adapter, plain, harness = tmp_path / "adapter", EvaluateParams(), EvaluateParams(lm_eval_tasks=["arc_easy"])
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"modules_to_save": None}))
    assert not _holds_whole_logits(plain, tiny_llama_dir, adapter, False)
    assert _holds_whole_logits(harness, tiny_llama_dir, adapter, False)
    (adapter / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["embed_tokens"]}))
    assert not _holds_whole_logits(plain, tiny_llama_dir, adapter, False)
    (adapter / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["lm_head"]}))
    assert _holds_whole_logits(plain, tiny_llama_dir, adapter, False)
    GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")
    (adapter / "adapter_config.json").write_text(json.dumps({"modules_to_save": None}))
    assert _holds_whole_logits(plain, tmp_path / "gpt2", adapter, False)


def test_the_evaluate_check_counts_a_forward_pass_and_the_logits_only_when_held_whole(tmp_path):
    """Qwen2.5-3B's shape needs 0.67 GB for a forward pass of 4 x 2,048 tokens through a block, and 2.49 GB more
    for their logits whole: a budget between the two passes the check only with the head run by chunks."""
    from transformers import Qwen2Config

    skeleton = tmp_path / "qwen-shape"
    Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(skeleton)
    # 2.05 GB of 4-bit weights, 0.68 of forward pass, 0.80 of loss chunks and slack: 3.53 GB; 6.02 with the logits
    with pytest.raises(UserError, match=r"needs at least 3\.53 GB .*the quantized base \+ adapter and 4 x 2048 "
                                        r"tokens through a block\)"):
        memory.check_quantized_fits("evaluate", skeleton, QUANT, 4, 2048, 3.4e9, 3.4, logits=False)
    memory.check_quantized_fits("evaluate", skeleton, QUANT, 4, 2048, 3.6e9, 3.6, logits=False)
    with pytest.raises(UserError, match=r"needs at least 6\.02 GB .*the quantized base \+ adapter and 4 x 2048 "
                                        r"tokens of logits\)"):
        memory.check_quantized_fits("evaluate", skeleton, QUANT, 4, 2048, 3.6e9, 3.6)
    memory.check_quantized_fits("evaluate", skeleton, QUANT, 4, 2048, 6.1e9, 6.1)


def test_a_streamed_model_runs_as_many_rows_at_once_as_move_the_fewest_bytes():
    gb = 1e9
    # Qwen2.5-3B in float32 within 7.5 GB, rows of 512 tokens x 151,936 logits (0.62 GB each): one row at a
    # time streams 7.2 GB four times per batch, four rows 9.0 GB once.
    assert memory.rows_at_once(12.4 * gb, 1.24 * gb, 7.1 * gb, 0.622 * gb, rows=4) == 4
    # Everything fits whatever the rows: the fewest forwards.
    assert memory.rows_at_once(1 * gb, 0.1 * gb, 7.1 * gb, 0.6 * gb, rows=4) == 4
    # Three rows' logits would leave less than the largest module, which has to come to the GPU.
    assert memory.rows_at_once(12.4 * gb, 1.24 * gb, 2.5 * gb, 0.622 * gb, rows=4) == 2
    # One row always runs, even where its logits leave too little (place then streams everything).
    assert memory.rows_at_once(12.4 * gb, 1.24 * gb, 1.0 * gb, 0.622 * gb, rows=4) == 1
    # One row at a time keeps the whole model on the GPU, two would stream part of it: one.
    assert memory.rows_at_once(4.0 * gb, 0.5 * gb, 5.5 * gb, 1.0 * gb, rows=2) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_rounded_on_the_gpu_are_those_rounded_on_the_cpu(dtype):
    """``to_host`` rounds on the GPU before the copy (into memory touched first); torch's blocking copy rounds on
    the CPU after it. The copy is the host's own: changing it leaves the GPU tensor as it was."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    # Every exponent a weight may have, from the subnormals to past float16's largest value, and exact ties.
    scales = torch.logspace(-30, 6, 4096, base=2.0, device="cuda")
    values = torch.randn(64, 4096, generator=generator, device="cuda") * scales
    ties = (torch.arange(4096, device="cuda", dtype=torch.float32) + 0.5) * 2.0**-10 + 1.0
    for tensor in (values, ties.unsqueeze(0)):
        host = memory.to_host(tensor, dtype)
        assert host.device.type == "cpu" and host.dtype == dtype and host.shape == tensor.shape
        assert torch.equal(host, tensor.to("cpu", dtype))
        host.zero_()
        assert torch.equal(memory.to_host(tensor, dtype), tensor.to("cpu", dtype))


DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_a_16bit_model_upcast_block_by_block_computes_the_float32_copys_logits(family, dtype, device, request):
    """Export's float32 reference from the 16-bit model on the device: the logits of a float32 copy, with the
    16-bit weights left as they were, in any chunking of rows and of the output head."""
    model_dir = request.getfixturevalue(family)
    model = memory.load_on_cpu(model_dir, dtype).to(device)
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    batches = [torch.randint(4, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    expected = fidelity.logits_on(memory.load_on_cpu(model_dir, dtype).float().to(device), batches, device)
    assert fidelity.computes_plain_logits(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for rows, head_rows in ((None, fidelity.HEAD_ROWS), (1, 7), (2, 64)):
        found = fidelity.float32_logits(model, batches, device, rows_at_once=rows, head_rows=head_rows)
        for got, want in zip(found, expected):
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(param.dtype == dtype and torch.equal(param, weights[name]) for name, param in model.named_parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    if device.type == "cuda":  # what the export stage reserves beside the weights is enough
        fixed, per_row = fidelity.float32_working_bytes(model, 12)
        assert torch.cuda.max_memory_allocated() - before <= fixed + 3 * per_row


@pytest.fixture(scope="module")
def eight_block_llama_dir(tmp_path_factory) -> Path:
    """A tiny model with enough blocks that a room can hold its embeddings and some blocks but not all."""
    return make_model_dir(tmp_path_factory.mktemp("eight-blocks") / "model", "llama", num_hidden_layers=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Room, in 16-bit copies of the model, for: none of the float32 copy's modules (every one streams), or its (tied)
# embeddings and output head (its blocks stream). Both below one 16-bit copy, which would compute the reference
# itself, block by block in float32. (With two blocks, no room streams some modules and keeps others.)
@pytest.mark.parametrize(("room", "keeps_some"), [(0.6, False), (0.85, True)],
                         ids=["every-module-streamed", "blocks-streamed"])
def test_the_streamed_float32_reference_gives_the_gpu_back_before_it_returns(eight_block_llama_dir, monkeypatch,
                                                                            room, keeps_some):
    """Export's float32 reference from a copy with modules streamed from the CPU: the logits of a float32
    copy, and every byte it put on the GPU free again when it returns (accelerate's hooks refer back to
    their modules, a cycle only a collection frees), before base + adapter load for the continuations."""
    import gc

    from qlorapipe import export

    cuda = torch.device("cuda")
    model_dir = eight_block_llama_dir
    model = memory.load_on_cpu(model_dir, torch.float16)
    batches = [torch.randint(4, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    expected = fidelity.logits_on(memory.load_on_cpu(model_dir, torch.float32).to(cuda), batches, cuda)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(cuda)
    placed = []  # (modules left on the CPU, any weight on the GPU): a reference to the copy would keep it alive
    place = memory.place

    def spy(*args, **kwargs):
        copy, offloaded = place(*args, **kwargs)
        placed.append((offloaded, any(p.device.type == "cuda" for p in copy.parameters())))
        return copy, offloaded

    monkeypatch.setattr(memory, "place", spy)
    budget = before + memory.SLACK_BYTES + memory.weight_bytes(model, bytes_16bit=2) * room
    found = export._reference_logits(model, model_dir, batches, cuda, budget, trust=False)
    ((offloaded, some_on_gpu),) = placed
    assert offloaded > 0, "the float32 copy was to stream some of its modules"
    assert some_on_gpu == keeps_some, "every module streams only when the room holds none of them"
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(cuda) == before


def test_a_room_that_holds_no_module_streams_every_one_and_a_larger_one_keeps_some(tiny_llama_dir, monkeypatch):
    """``memory.place``'s choice on a GPU, seen from the CPU: accelerate's two entry points stand in, recording.
    A model mapped whole to the CPU must go through cpu_offload (dispatch_model would leave it without hooks)."""
    import accelerate

    calls = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(accelerate, "cpu_offload",
                        lambda model, execution_device: calls.append(("cpu_offload", execution_device)) or model)
    monkeypatch.setattr(accelerate, "dispatch_model",
                        lambda model, device_map, main_device: calls.append(("dispatch", dict(device_map))) or model)
    model = memory.load_on_cpu(tiny_llama_dir, torch.float32)
    cuda = torch.device("cuda", 0)
    assert memory.place(model, cuda, budget=1000, reserve=0)[1] == 1
    assert calls == [("cpu_offload", cuda)]
    calls.clear()
    head = model.get_output_embeddings().weight
    # The (tied) embeddings and the room accelerate keeps for the largest streamed block: less than the model.
    room_beside_head = head.numel() * head.element_size() + memory.largest_block_bytes(model, 4) * 1.2
    _, offloaded = memory.place(model, cuda, budget=head.numel() * head.element_size() + room_beside_head, reserve=0)
    ((entry, placement),) = calls
    assert entry == "dispatch" and placement["model.embed_tokens"] == 0 and placement["model.layers"] == "cpu"
    assert offloaded == sum(1 for where in placement.values() if where == "cpu") > 0


def test_a_block_that_fails_midway_leaves_the_16bit_weights_as_they_were(tiny_qwen2_dir):
    model = memory.load_on_cpu(tiny_qwen2_dir, torch.bfloat16)
    weights = {name: param.detach().clone() for name, param in model.named_parameters()}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    model.model.layers[1].mlp.forward = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        fidelity.float32_logits(model, [torch.tensor([[5, 6, 7]])], CPU)
    assert all(param.dtype == torch.bfloat16 and torch.equal(param, weights[name])
               for name, param in model.named_parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.fixture
def fake_peaks(monkeypatch):
    """torch's CUDA peak counters faked: (the readings, changed by a test; a CUDA device) after the stage's
    ``memory.reset_peak``, which leaves them at 1 and 2 GB."""
    peaks = {"allocated": 5e9, "reserved": 6e9}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peaks.update(allocated=1e9,
                                                                                                 reserved=2e9))
    cuda = torch.device("cuda", 0)
    memory.reset_peak(cuda)
    return peaks, cuda


def test_a_measurement_that_restarts_the_peak_counters_keeps_the_stage_peak(fake_peaks):
    """merge's speed measurement restarts torch's peak counters for the decoder's own peak; the stage's peak
    written to its metrics still counts what came before it."""
    peaks, cuda = fake_peaks
    peaks.update(allocated=5e9, reserved=6e9)
    memory.restart_peak(cuda)
    assert memory.peak_metrics(cuda, None) == {"peak_gpu_allocated_gb": 5.0, "peak_gpu_reserved_gb": 6.0}
    peaks.update(allocated=7e9)  # a later phase above the earlier peak
    assert memory.peak_metrics(cuda, None) == {"peak_gpu_allocated_gb": 7.0, "peak_gpu_reserved_gb": 6.0}
    memory.reset_peak(cuda)  # the next stage starts afresh
    assert memory.peak_metrics(cuda, None) == {"peak_gpu_allocated_gb": 1.0, "peak_gpu_reserved_gb": 2.0}


def test_timing_generation_on_a_gpu_keeps_the_stage_peak(fake_peaks, monkeypatch):
    """The timed runs restart the peak counters through ``memory.restart_peak``, never torch's own reset."""
    from qlorapipe.merge import speed

    peaks, cuda = fake_peaks
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    peaks.update(allocated=5e9, reserved=6e9)  # the stage's phases before the timing

    def generate(count, first_token):
        if first_token is not None:
            first_token()

    total, first = speed._timed_runs(generate, new_tokens=4, warm_up=2, repeats=2, device=cuda)
    assert 0 <= first <= total
    assert memory.peak_metrics(cuda, None) == {"peak_gpu_allocated_gb": 5.0, "peak_gpu_reserved_gb": 6.0}

"""The static-cache decoder (CUDA graphs on a GPU) chooses the tokens transformers' generate chooses."""

import pytest
import torch

from qlorapipe import greedy

PROMPTS = [[1, 5, 9, 12, 40], [1, 7], [1, 30, 31, 32, 33, 34, 35, 36], [1, 99, 98]]  # left padding exercised
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stop_sets(model, device) -> list[set[int]]:
    """No stops; a stop one row meets early; a stop for each row at a different step (all stop)."""
    free = greedy.generate(model, PROMPTS, 12, 4, device, set(), 3, static=False)
    return [set(), {free[0][2]}, {row[k] for row, k in zip(free, (2, 4, 6, 3))}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_decoder_chooses_generates_tokens(arch, device, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    assert greedy.uses_static_decoder(model, device) == (device == "cuda")
    lengths = set()
    for stops in _stop_sets(model, device):
        expected = greedy.generate(model, PROMPTS, 12, 4, device, stops, 3, static=False)
        assert greedy.generate(model, PROMPTS, 12, 4, device, stops, 3, static=True) == expected
        lengths.add(tuple(len(row) for row in expected))
        ids, attention = greedy.left_padded(PROMPTS, 3)
        with torch.no_grad():
            decoder = greedy.Decoder(model, 4, ids.shape[1], 12, stops, 3, torch.device(device))
            first = decoder.run(ids, attention).tolist()
            assert decoder.run(ids, attention).tolist() == first == expected  # a second run (a replay on a GPU)
            assert (decoder.graph is not None) == (device == "cuda")
    assert {(12,) * 4} < lengths and len(lengths) > 1  # some runs ended early: every row stopped
    for count in (1, 2):  # no step recorded as a graph, one step
        assert greedy.generate(model, PROMPTS, count, 4, device, set(), 3, static=True) == \
            greedy.generate(model, PROMPTS, count, 4, device, set(), 3, static=False)
    others = [[1] + [(token * 7) % 90 + 5 for token in prompt[1:]] for prompt in PROMPTS]  # same shape
    ids, attention = greedy.left_padded(PROMPTS, 3)
    decoder = greedy.Decoder(model, 4, ids.shape[1], 12, set(), 3, torch.device(device))
    with torch.no_grad():
        decoder.run(ids, attention)
        again = decoder.run(*greedy.left_padded(others, 3)).tolist()
    assert again == greedy.generate(model, others, 12, 4, device, set(), 3, static=False) != \
        greedy.generate(model, PROMPTS, 12, 4, device, set(), 3, static=False)


@pytest.mark.parametrize("device", DEVICES)
def test_static_decoder_applies_the_generation_configs_repetition_penalty(device, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(device)
    plain = greedy.generate(model, PROMPTS, 12, 4, device, set(), 3, static=False)
    model.generation_config.repetition_penalty = 1.8
    expected = greedy.generate(model, PROMPTS, 12, 4, device, set(), 3, static=False)
    assert expected != plain  # the penalty changes the tokens (the tiny model repeats itself)
    assert greedy.generate(model, PROMPTS, 12, 4, device, set(), 3, static=True) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_static_decoder_runs_each_adapter_as_peft_mixed_batches_do(device, tiny_qwen2_dir):
    """A 4-bit base with an adapter: the base rows (adapter off) and the adapter's rows, decoded in one
    batch per adapter, are the tokens of peft's mixed-adapter batch through generate."""
    from conftest import tiny_lora_model

    model, _ = tiny_lora_model(tiny_qwen2_dir, device=device, gradient_checkpointing=False)
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)  # a delta the greedy tokens of a tiny random model notice
    names = ["__base__", model.active_adapter] * 2
    rows = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]]
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    expected = greedy.generate(model, rows, 10, 4, device, set(), 3, adapter_names=names, static=False)
    assert expected[0] != expected[1]  # the adapter changes the tokens
    assert greedy.generate(model, rows, 10, 4, device, set(), 3, adapter_names=names, static=True) == expected
    # afterwards the adapter is on again: plain decoding is the fine-tuned rows'
    assert greedy.generate(model, rows[1:2], 10, 1, device, set(), 3, static=True) == expected[1:2]
    assert [name for name, param in model.named_parameters() if param.requires_grad] == trainable


def test_the_static_decoder_is_refused_where_its_tokens_could_differ(tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert greedy.static_refusal(model, cpu) is None
    assert not greedy.uses_static_decoder(model, "cpu")  # generate on the CPU
    model.generation_config.no_repeat_ngram_size = 3
    assert greedy.static_refusal(model, cpu) == "generation config no_repeat_ngram_size"
    model.generation_config.no_repeat_ngram_size = 0
    model.generation_config.repetition_penalty = 1.3  # applied by the decoder itself
    assert greedy.static_refusal(model, cpu) is None
    model.config.model_type = "mistral"
    assert greedy.static_refusal(model, cpu) == "model type mistral"
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    assert greedy.static_refusal(eager, cpu) == "attention eager"  # it adds the mask: a boolean one is no mask
    sliding = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    sliding.config.use_sliding_window = True
    assert greedy.static_refusal(sliding, cpu) == "sliding-window attention"
    sliding.config.use_sliding_window = False
    assert greedy.static_refusal(sliding, torch.device("cuda")) == "weights off the device"
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy.Decoder(model, 1, 4, 0, set(), 0, cpu)

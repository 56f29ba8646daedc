"""The evaluation loss: chunked over tokens, the same number as the whole-batch cross-entropy (CPU)."""

from __future__ import annotations

import pytest
import torch

from qlorapipe.perplexity import mean_token_loss


class _Rows:
    """A dataset of prepared rows as ``datasets`` returns them with torch formatting: a slice is a dict of tensors."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: slice) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _gpt2(vocab_size: int):
    """A tiny GPT-2: its logits come from its own forward only (not a family ``plain_head_causal_lm`` takes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64))


def _whole_batch_loss(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, None])  # None: the default chunk, whole rows here
def test_the_chunked_loss_is_the_whole_batch_cross_entropy(tiny_llama_dir, family, chunk_tokens):
    from transformers import AutoModelForCausalLM

    from qlorapipe import modeling

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    if family == "gpt2":
        model = _gpt2(model.config.vocab_size)
    assert (modeling.plain_head_causal_lm(model) is model) == (family == "llama")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (5, 24), generator=generator)
    labels = ids.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[3, 20:] = -100  # padding
    model.train()
    chunk = {} if chunk_tokens is None else {"chunk_elements": chunk_tokens * model.config.vocab_size}
    loss, tokens = mean_token_loss(model, _Rows(ids, labels), batch_size=2, device="cpu", **chunk)
    assert model.training  # put back as it was
    assert tokens == int((labels[:, 1:] != -100).sum()) == 5 * 23 - 9 - 4
    assert loss == pytest.approx(_whole_batch_loss(model, ids, labels), rel=1e-6)


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_the_head_of_an_adapter_model_computes_only_the_predicted_positions_a_chunk_at_a_time(
        tiny_llama_dir, modules_to_save):
    """With a plain head, no batch's logits exist whole (the head sees the predicted positions, 7 at a time);
    a trained head (``lora.modules_to_save``) is computed by the model's own forward. The loss is the same."""
    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    model, _ = modeling.load_base_model(tiny_llama_dir, QuantizationParams(load_in="4bit", compute_dtype="float32"),
                                        torch.device("cpu"))
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, modules_to_save=modules_to_save), quantized=True,
                              gradient_checkpointing=True)
    ids = torch.randint(4, 300, (4, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :8] = -100
    seen = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    loss, tokens = mean_token_loss(model, _Rows(ids, labels), batch_size=2, device="cpu",
                                   chunk_elements=7 * head.weight.shape[0])
    hook.remove()
    assert tokens == 4 * 12  # positions 8..19 of each row
    if modules_to_save is None:
        assert modeling.plain_head_causal_lm(model) is model.get_base_model()
        assert sorted(seen) == sorted([(7, 64), (7, 64), (7, 64), (3, 64)] * 2)  # 24 predicted positions a batch
    else:
        assert modeling.plain_head_causal_lm(model) is None
        assert seen == [(2, 20, 64)] * 2
    assert loss == pytest.approx(_whole_batch_loss(model, ids, labels), rel=1e-6)


def test_an_evaluation_during_training_leaves_the_next_training_step_bit_for_bit_the_same(tiny_llama_dir):
    from conftest import tiny_lora_model

    model, _ = tiny_lora_model(tiny_llama_dir)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = _Rows(ids, ids.clone())

    def training_step() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    before = training_step()
    mean_token_loss(model, rows, 2, torch.device("cpu"))
    assert model.training
    after = training_step()
    assert after[0] == before[0] and all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    # Nothing was repacked: the base is loaded with the training numerics at inference (bitsandbytes would
    # repack the 4-bit weights for its CPU kernel on CPUs with AVX512-BF16, re-rounding their scales for
    # every later step).
    mean_token_loss(model, rows, 2, torch.device("cpu"))
    assert not _repacked(model)
    again = training_step()
    assert again[0] == before[0] and all(torch.equal(a, b) for a, b in zip(again[1], before[1]))


def _repacked(model) -> list:
    """The 4-bit layers bitsandbytes repacked for its CPU inference kernel."""
    return [m for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                  "packing_format_for_cpu", False)]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_inference_computes_what_training_computes(tiny_llama_dir, compute_dtype):
    """The 4-bit base as every stage and chat load it gives at inference (eval mode, no grad) the logits of a
    training-mode forward, bit for bit: bitsandbytes' CPU inference kernel (AVX512-BF16 CPUs) is kept out."""
    from qlorapipe import modeling
    from qlorapipe.params import QuantizationParams

    params = QuantizationParams(load_in="4bit", compute_dtype=compute_dtype)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    model, _ = modeling.load_base_model(tiny_llama_dir, params, torch.device("cpu"))
    with torch.no_grad():
        trained = model.train()(input_ids=ids).logits
        evaluated = model.eval()(input_ids=ids).logits
    assert torch.equal(evaluated, trained) and not _repacked(model)

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


@pytest.mark.parametrize("chunk_tokens", [1, 7, None])  # None: the default chunk, whole rows here
def test_the_chunked_loss_is_the_whole_batch_cross_entropy(tiny_llama_dir, chunk_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (5, 24), generator=generator)
    labels = ids.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[3, 20:] = -100  # padding
    model.train()
    chunk = {} if chunk_tokens is None else {"chunk_elements": chunk_tokens * model.config.vocab_size}
    loss, tokens = mean_token_loss(model, _Rows(ids, labels), batch_size=2, device="cpu", **chunk)
    assert model.training  # put back as it was

    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits.float()
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                                 ignore_index=-100)
    assert tokens == int((targets != -100).sum()) == 5 * 23 - 9 - 4
    assert loss == pytest.approx(expected.item(), rel=1e-6)


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

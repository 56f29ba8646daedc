"""lora.init: LoftQ on a 4-bit base, PiSSA on a 16-bit base saved as a plain LoRA, and the combinations refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_stage, tiny_params, train_args, write_params

from qlorapipe import modeling
from qlorapipe.errors import UserError
from qlorapipe.params import LoraParams, QuantizationParams, load_sections, pissa_dropout_problem
from qlorapipe.train import adapter_init, checkpoints

CPU = torch.device("cpu")
FOUR_BIT = QuantizationParams(load_in="4bit", compute_dtype="float32")
SIXTEEN_BIT = QuantizationParams(load_in="none", compute_dtype="float32")


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _adapted(model_dir: Path, quant: QuantizationParams, lora: LoraParams, seed: int = 0, device=CPU):
    torch.manual_seed(seed)
    model, _ = modeling.load_base_model(model_dir, quant, device)
    model = modeling.add_lora(model, lora, quant.load_in != "none", gradient_checkpointing=False)
    model.train()  # as in training: bitsandbytes keeps the plain 4-bit layout (docs/training.md)
    return model


def _full_precision(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---- LoftQ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [16, 8])  # scaling 2 and 1: peft's unscaled LoftQ would help only at 1
def test_loftq_starts_the_4bit_model_closer_to_the_16bit_one(tiny_llama_dir, alpha):
    ids = _ids(320)
    reference = _logits(_full_precision(tiny_llama_dir), ids)
    model = _adapted(tiny_llama_dir, FOUR_BIT, LoraParams(rank=8, alpha=alpha, dropout=0.0, init="loftq"))
    four_bit = _logits(model, ids)  # B is zero: the 4-bit model alone
    result = adapter_init.replace_with_loftq(model, tiny_llama_dir)
    with_adapter = _logits(model, ids)
    assert result.layers == 14
    # Weights: ||W - W_hat|| / ||W|| over the 14 adapted layers, 0.0919 -> 0.0746 at rank 8 of 64.
    assert result.error_without_adapter == pytest.approx(0.0919, abs=0.002)
    assert result.error_with_adapter < 0.85 * result.error_without_adapter
    # Logits: mean absolute difference from the 16-bit model, 0.0115 -> 0.0083.
    without, with_ = (four_bit - reference).abs().mean(), (with_adapter - reference).abs().mean()
    assert with_ < 0.8 * without, (float(without), float(with_))


def test_loftq_fits_the_error_a_layer_sees(tiny_llama_dir):
    import bitsandbytes as bnb

    model = _adapted(tiny_llama_dir, FOUR_BIT, LoraParams(rank=8, alpha=16, dropout=0.0, init="loftq"))
    adapter_init.replace_with_loftq(model, tiny_llama_dir)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    original = _full_precision(tiny_llama_dir).model.layers[1].mlp.down_proj.weight
    weight = layer.base_layer.weight
    with torch.no_grad():
        error = original - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        fitted = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        # The best rank-8 approximation (Eckart-Young): what is left is the error's other singular values.
        left, best = torch.linalg.matrix_norm(error - fitted), torch.linalg.svdvals(error)[8:].norm()
    assert float(left) == pytest.approx(float(best), rel=1e-4)


def test_loftq_reads_a_base_stored_in_shards(tiny_llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    _full_precision(tiny_llama_dir).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    lora = LoraParams(rank=8, alpha=16, dropout=0.0, init="loftq")
    whole, parts = _adapted(tiny_llama_dir, FOUR_BIT, lora), _adapted(sharded, FOUR_BIT, lora)
    adapter_init.replace_with_loftq(whole, tiny_llama_dir)
    adapter_init.replace_with_loftq(parts, sharded)
    one, other = _lora_weights(whole), _lora_weights(parts)
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_loftq_without_safetensors_says_what_it_needs(tiny_llama_dir, tmp_path):
    model = _adapted(tiny_llama_dir, FOUR_BIT, LoraParams(rank=8, alpha=16, dropout=0.0, init="loftq"))
    with pytest.raises(UserError, match=r"lora.init loftq reads the full-precision weights from model.safetensors"):
        adapter_init.replace_with_loftq(model, tmp_path)


# ---- PiSSA -------------------------------------------------------------------------------------


def _train_a_little(model, ids, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # lm_head is tied
def test_pissa_starts_as_the_base_and_is_saved_as_a_plain_lora_that_computes_the_trained_model(
        tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    ids = _ids(320)
    base = _full_precision(tiny_llama_dir)
    reference = _logits(base, ids)
    lora = LoraParams(rank=8, alpha=16, dropout=0.0, init="pissa", modules_to_save=["lm_head"])
    model = _adapted(tiny_llama_dir, SIXTEEN_BIT, lora)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    original_q = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_proj.base_layer.weight, original_q, atol=1e-3)  # the base is now a residual
    assert (_logits(model, ids) - reference).abs().max() < 1e-5  # ... and residual + adapter is the base
    initial = adapter_init.initial_adapter(model)
    _train_a_little(model, ids)
    trained = _logits(model, ids)
    assert (trained - reference).abs().max() > 0.1

    adapter_init.save_pissa_as_lora(model, tmp_path / "adapter", initial)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 32, True)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 64)
    assert "base_model.model.lm_head.weight" in saved  # peft's conversion drops it; it is put back
    loaded = PeftModel.from_pretrained(_full_precision(tiny_llama_dir), tmp_path / "adapter")
    # Loading ran no PiSSA: the base layer is the original weight, not a residual.
    assert torch.equal(loaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, original_q)
    assert (_logits(loaded, ids) - trained).abs().max() < 1e-4


def test_pissa_digest_is_the_same_when_recomputed_and_changes_with_the_residual(tiny_llama_dir):
    lora = LoraParams(rank=8, alpha=16, dropout=0.0, init="pissa")
    first = adapter_init.pissa_digest(_adapted(tiny_llama_dir, SIXTEEN_BIT, lora))
    again = _adapted(tiny_llama_dir, SIXTEEN_BIT, lora)
    assert adapter_init.pissa_digest(again) == first
    with torch.no_grad():
        again.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-6
    assert adapter_init.pissa_digest(again) != first


def test_a_checkpoint_from_another_pissa_residual_is_refused_not_resumed(tmp_path):
    made = checkpoints.CheckpointStore(tmp_path, every_steps=1, run_fingerprint="abc", init_digest="1" * 64)
    model = torch.nn.Linear(2, 2)
    made.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"result": {}}, None)
    made.wait()
    assert checkpoints.CheckpointStore(tmp_path, 1, "abc", init_digest="1" * 64).latest().step == 1
    with pytest.raises(UserError, match=r"step-000001 was trained from a PiSSA residual base \(sha256 111111111111\) "
                                        r"that this run did not recompute \(sha256 222222222222.*delete"):
        checkpoints.CheckpointStore(tmp_path, 1, "abc", init_digest="2" * 64).latest()
    assert (tmp_path / "step-000001").is_dir()  # kept


# ---- params ------------------------------------------------------------------------------------


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_dropout_on_pissa_is_warned_of_when_params_are_checked(tiny_llama_dir, tmp_path, caplog):
    warning = ("lora.dropout 0.05 acts on PiSSA's principal components: the training loss starts above the base's "
               "and is noisier (evaluation has no dropout); the PiSSA paper trains with lora.dropout: 0")
    assert pissa_dropout_problem(LoraParams(init="pissa", dropout=0.05)) == warning
    assert pissa_dropout_problem(LoraParams(init="pissa", dropout=0.0)) is None
    assert pissa_dropout_problem(LoraParams(init="default", dropout=0.05)) is None
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, tmp_path / "corpus.txt", **{
        "lora.init": "pissa", "lora.dropout": 0.05, "quantization.load_in": "none"}))
    (tmp_path / "corpus.txt").write_text("text\n" * 50)
    with caplog.at_level("WARNING", logger="qlorapipe.check"):
        load_stage("check").main(["--params", str(params), "--out", str(tmp_path / "passed.txt"),
                                  "--pipeline", str(Path(__file__).parents[1] / "dvc.yaml")])
    assert warning in [r.getMessage() for r in caplog.records if r.name == "qlorapipe.check"]


@pytest.mark.parametrize(("text", "message"), [
    ("lora:\n  init: pissa\nquantization:\n  load_in: 4bit\n",
     ("lora.init pissa needs a 16-bit base but quantization.load_in is 4bit: set quantization.load_in: none, "
      "or use lora.init: loftq with quantization.load_in: 4bit")),
    ("lora:\n  init: pissa\nquantization:\n  load_in: 8bit\n",
     ("lora.init pissa needs a 16-bit base but quantization.load_in is 8bit: set quantization.load_in: none, "
      "or use lora.init: loftq with quantization.load_in: 4bit")),
    ("lora:\n  init: loftq\nquantization:\n  load_in: none\n",
     ("lora.init loftq fits the adapter to a 4-bit base's quantization error but quantization.load_in is none: "
      "set quantization.load_in: 4bit, or lora.init: default (pissa for load_in: none)")),
    ("lora:\n  init: pissa\nquantization:\n  load_in: none\ndistributed:\n  num_processes: 2\n  strategy: fsdp\n",
     ("lora.init pissa is not supported with distributed.strategy fsdp (the adapter is converted to a plain LoRA "
      "from the whole model when saved): set distributed.strategy: ddp, or distributed.num_processes: 1")),
    ("lora:\n  init: loftq\n  use_dora: true\n",
     "lora.init loftq does not combine with lora.use_dora: set lora.use_dora to false, or lora.init to default"),
    ("lora:\n  init: pissa\n  bias: all\nquantization:\n  load_in: none\n",
     "lora.init pissa does not combine with lora.bias all: set lora.bias to none, or lora.init to default"),
    ("lora:\n  init: pisa\n", "lora.init: must be one of 'default', 'loftq', 'pissa', got 'pisa'"),
], ids=["pissa-4bit", "pissa-8bit", "loftq-16bit", "pissa-fsdp", "loftq-dora", "pissa-bias", "unknown"])
def test_combinations_lora_init_cannot_train_are_refused_naming_what_to_change(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        load_sections(_params(tmp_path, text), "quantization", "lora", "distributed")
    assert str(info.value) == "invalid params: " + message


@pytest.mark.parametrize("text", ["lora:\n  init: loftq\n",  # the default load_in is 4bit
                                  ("lora:\n  init: pissa\nquantization:\n  load_in: none\ndistributed:\n"
                                   "  num_processes: 2\n  strategy: ddp\n")])
def test_the_supported_combinations_load(tmp_path, text):
    loaded = load_sections(_params(tmp_path, text), "quantization", "lora", "distributed")
    quantization, lora, distributed = loaded["quantization"], loaded["lora"], loaded["distributed"]
    pissa = lora.init == "pissa"
    assert lora.init == ("pissa" if "pissa" in text else "loftq")
    assert quantization.load_in == ("none" if pissa else "4bit")
    assert (distributed.num_processes, distributed.strategy) == ((2, "ddp") if pissa else (1, "ddp"))


# ---- the train step ----------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "load_in"), [("loftq", "4bit"), ("pissa", "none")])
def test_the_train_step_saves_an_adapter_that_reproduces_the_trained_model_on_the_original_base(
        prepared, tmp_path, tiny_llama_dir, corpus_file, caplog, init, load_in):
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlorapipe import data

    # float32: the rebuilt model's norms are upcast by peft's preparation, the reloaded one's are not
    overrides = {"lora.init": init, "quantization.load_in": load_in, "quantization.compute_dtype": "float32",
                 "training.max_steps": 6,
                 "training.eval_every_steps": 2, "training.checkpoint_every_steps": 3,
                 "training.keep_best_adapter": True}
    write_params(tmp_path / "params.yaml", tiny_params(tiny_llama_dir, corpus_file, **overrides))
    argv = train_args(tmp_path / "params.yaml", prepared / "models/base", prepared / "data/prepared", tmp_path)
    with caplog.at_level(logging.INFO, logger="qlorapipe"):
        load_stage("train").main(argv)
    adapter, base_dir = tmp_path / "adapter", prepared / "models/base"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "training_params.json"]
    assert json.loads((adapter / "training_params.json").read_text())["lora"]["init"] == init
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PeftModel.from_pretrained re-runs no init
    assert (config["r"], config["lora_alpha"]) == ((16, 32) if init == "pissa" else (8, 16))
    state = json.loads(next((tmp_path / "checkpoints").glob("step-*/state.json")).read_text())

    # The trained model, rebuilt as the step built it: the same init, then the kept (best) adapter. On the stage's
    # device: PiSSA's SVD there and on the CPU agree only to rounding, and its principal directions (which the
    # adapter was trained in) can differ as much (seen on an H100).
    device = modeling.pick_device()
    quant = QuantizationParams(load_in=load_in, compute_dtype="float32")
    lora = LoraParams(rank=8, alpha=16, dropout=0.0, init=init)
    trained = _adapted(base_dir, quant, lora, seed=42, device=device)
    if init == "pissa":
        assert adapter_init.pissa_digest(trained) == state["init_sha256"]
        assert "PiSSA adapter saved as a plain LoRA of rank 16 (lora_alpha 32)" in caplog.text
    else:
        assert state["init_sha256"] is None
        assert "LoftQ: 14 4-bit layers start from their quantization error" in caplog.text
    batch = data.load_split(prepared / "data/prepared", data.EVAL_SPLIT)[:4]["input_ids"]
    initial = _logits(trained, batch.to(device)).cpu()  # the adapter as its init left it
    kept = load_file(next((tmp_path / "checkpoints").glob("step-*/best_adapter.safetensors")))
    checkpoints.load_trainable_state(trained, kept)
    loaded = PeftModel.from_pretrained(modeling.load_base_model(base_dir, quant, device)[0], adapter).train()
    expected, got = _logits(trained, batch.to(device)).cpu(), _logits(loaded, batch.to(device)).cpu()
    assert (got - expected).abs().max() < 1e-4
    assert (expected - initial).abs().max() > 1e-3  # it did train: the kept adapter is not the init

    if init == "pissa":  # a run that resumes from the last checkpoint recomputes the residual and rewrites the same
        first = (adapter / "adapter_model.safetensors").read_bytes()
        shutil.rmtree(adapter)
        load_stage("train").main(argv)
        assert json.loads((tmp_path / "train.json").read_text())["resumed_from_step"] == 6
        assert (adapter / "adapter_model.safetensors").read_bytes() == first

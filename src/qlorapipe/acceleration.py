"""GPU fast paths for QLoRA training that compute the same function as the plain recipe.

The plain recipe (transformers + peft + bitsandbytes with ``prepare_model_for_kbit_training``)
is launch- and copy-bound on a GPU, not FLOP-bound: it upcasts the frozen norms and embeddings
to float32, so activations flip between float32 and bfloat16 around every layer; peft casts
each LoRA input to the adapter's float32 and clones every base output; and the loss
materialises full-vocabulary float32 logits (the largest activation with a 152k vocabulary).
Each lever here removes one of those costs and has a switch in the ``acceleration`` params
section. None changes what is computed beyond bfloat16 rounding (benchmarks/train_speed.py
checks loss and LoRA gradients against the plain recipe). They are applied on CUDA only: the
CPU path stays exactly the plain one.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import types

from qlorapipe.data import model_inputs
from qlorapipe.params import AccelerationParams, TrainingParams

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Largest float32 logits block the chunked loss materialises at once (elements): 256 MiB.
LOGITS_CHUNK_ELEMENTS = 2**26
# How many more steps fit_uncheckpointed_layers may measure when the count it predicts peaks above the budget.
MAX_FIT_CHECKS = 3
# Causal LMs whose forward is exactly decoder -> lm_head -> shifted cross-entropy, with no
# logit scaling or soft-capping, so the chunked loss is the same function.
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def apply(model, params: AccelerationParams, device, compute_dtype) -> list[str]:
    """Switch on the levers ``params`` enables, on CUDA only.

    Args:
        model: the PEFT model ``modeling.add_lora`` returned.
        params: the acceleration section.
        device: where the model lives; on the CPU nothing is changed.
        compute_dtype: the dtype the base was loaded in (``modeling.load_base_model``).

    Returns:
        The names of the levers applied.
    """
    if device.type != "cuda":
        return []
    applied = []
    if params.keep_frozen_dtype and keep_frozen_dtype(model, compute_dtype):
        applied.append("keep_frozen_dtype")
    if params.lora_fast_forward and use_fast_lora_forward(model):
        applied.append("lora_fast_forward")
    if params.chunked_cross_entropy and use_chunked_loss(model):
        applied.append("chunked_cross_entropy")
    if params.fused_kernels and use_fused_kernels(model, compute_dtype):
        applied.append("fused_kernels")
    # auto needs a batch to measure: plan_uncheckpointed_layers takes it after apply.
    layers = params.uncheckpointed_layers
    if layers != "auto" and layers and skip_checkpointing(model, layers):
        applied.append(f"uncheckpointed_layers={layers}")
    if params.compile_layers and compile_layers(model):
        applied.append("compile_layers")
    logger.info("Acceleration: %s", ", ".join(applied) or "none")
    return applied


def training_params(params: TrainingParams, fast_paths: AccelerationParams, device) -> TrainingParams:
    """The training section to run with: on CUDA, paged 8-bit AdamW becomes its unpaged twin.

    Paging keeps optimizer states in unified memory so they can spill to the host under
    memory pressure (bitsandbytes paged optimizers). LoRA's states are tens of MB, so paging
    buys nothing here; AdamW8bit and PagedAdamW8bit run the same update, only where the
    states live differs. A paged optimizer also synchronises with the GPU once per step,
    which stalls the host while a CUDA graph replays: on an H100, unpaged was 6% (3B, seq
    1024 x 4) to 38% (seq 512 x 1) faster (docs/benchmarks.md).

    Returns:
        ``params``, or a copy with the unpaged optimizer.
    """
    import dataclasses

    if device.type == "cuda" and fast_paths.unpaged_optimizer and params.optimizer == "paged_adamw_8bit":
        return dataclasses.replace(params, optimizer="adamw_8bit")
    return params


def remove(model, upcast_dtype=None) -> None:
    """Undo every lever (benchmarks and tests compare each against the plain path on one model).

    Args:
        model: a model ``apply`` changed.
        upcast_dtype: cast frozen non-quantized float params back to this dtype (float32 is
            what ``prepare_model_for_kbit_training`` leaves); None leaves dtypes alone.
    """
    import torch

    checkpoint_again(model.modules())
    for module in model.modules():
        # vars(), not getattr(): peft's wrappers forward unknown attributes to the model inside.
        flags = vars(module)
        if flags.pop("_qlorapipe_patched", False):
            del module.forward  # the instance attribute; the class's forward shows again
        if flags.pop("_qlorapipe_compiled", False):
            module._compiled_call_impl = None
        for hook in flags.pop("_qlorapipe_rope_hooks", ()):
            hook.remove()
    if upcast_dtype is not None:
        for param in _frozen_float_params(model):
            if param.dtype != upcast_dtype:
                param.data = param.data.to(upcast_dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _frozen_float_params(model):
    for param in model.parameters():
        if param.requires_grad or type(param).__name__ in ("Params4bit", "Int8Params"):
            continue
        if param.is_floating_point():
            yield param


def keep_frozen_dtype(model, compute_dtype) -> bool:
    """Cast the frozen, non-quantized params (norms, embeddings) back to the compute dtype.

    ``prepare_model_for_kbit_training`` upcasts them to float32 for numerical stability
    (peft/utils/other.py). The RMSNorm variance is computed in float32 anyway
    (LlamaRMSNorm.forward), so the upcast only turns every norm's output, and with it the
    residual stream and every LoRA input, into float32: twice the activation memory and a
    dtype conversion around every bitsandbytes matmul. Trainable (LoRA) params stay float32.

    Returns:
        True when any param was cast.
    """
    import torch

    changed = False
    for param in _frozen_float_params(model):
        if param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
            changed = True
    if changed and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return changed


def _fast_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA forward for one plain adapter as one autograd function (fused_lora.LoraLinear).

    Same function as peft's ``Linear4bit.forward`` / ``Linear.forward``: base(x) + B(A(drop(x)))
    * scaling. Differences, all exact up to bfloat16 rounding: the small adapter weights are
    cast to the activations' dtype instead of the activations to the weights' float32 (the
    float32 master weights stay the ones the optimizer updates); the scaling is folded into
    B; the LoRA product is added in place into the base output (no clone); and the backward
    pass keeps only the input, drawing the dropout mask again from a seed instead of keeping
    the dropped-out copy and the mask. Layers it cannot compute exactly run peft's forward.
    """
    from qlorapipe import fused_lora

    name = None if (args or kwargs) else fused_lora.plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    parts = fused_lora.lora_parts(self) if x.numel() < fused_lora.MAX_ELEMENTS else None
    if parts is not None:
        return fused_lora.LoraLinear.apply(x, *parts)
    return _unfused_fast_lora_forward(self, x, name)


def _unfused_fast_lora_forward(self, x, name: str):
    """The same function for layers the fused one does not take (8-bit bases, other dropouts):
    adapter weights cast to the activations' dtype, the scaling folded into B, the add fused
    into the second matmul (addmm) and no clone of the base output."""
    import torch

    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    result = self.base_layer(x)
    dtype = result.dtype
    hidden = torch.nn.functional.linear(self.lora_dropout[name](x).to(dtype), lora_a.weight.to(dtype))
    scaled_b = (lora_b.weight * self.scaling[name]).to(dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), scaled_b.t())
    return out.view(result.shape)


def use_fast_lora_forward(model) -> bool:
    """Give every peft LoRA linear layer ``_fast_lora_forward``.

    Returns:
        True when any layer was patched.
    """
    from peft.tuners.lora import LoraLayer

    patched = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
                continue
            module.forward = types.MethodType(_fast_lora_forward, module)
            module._qlorapipe_patched = True
            patched = True
    return patched


@functools.cache
def _linear_cross_entropy_function():
    """Build the autograd Function once, lazily, so importing this module needs no torch."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """mean CE(hidden @ weight.T, targets) over non-ignored targets, chunk by chunk.

        The gradient with respect to ``hidden`` (and ``weight`` if it is trained) is
        computed in the forward pass, chunk by chunk, as Liger Kernel's fused linear
        cross-entropy does: the full float32 logits never exist, and no logits are kept
        for the backward pass.
        """

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk_rows):
            n_rows = hidden.shape[0]
            valid_all = targets != IGNORE_INDEX
            n_valid = valid_all.sum().clamp(min=1).to(torch.float32)
            need_hidden = ctx.needs_input_grad[0]
            need_weight = ctx.needs_input_grad[1]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            weight_c = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            from qlorapipe import fused_lora

            fused = fused_lora.on_triton(hidden)
            for start in range(0, n_rows, chunk_rows):
                rows = hidden[start : start + chunk_rows]
                target = targets[start : start + chunk_rows]
                valid = valid_all[start : start + chunk_rows]
                if fused:
                    # liger-kernel's cross-entropy kernel: loss per row and, in place of the
                    # logits, softmax - onehot (zero on ignored rows), in two passes over the
                    # compute-dtype logits instead of a float32 copy and five more passes.
                    logits = rows @ weight_c.t()
                    row_loss = torch.zeros(len(rows), dtype=torch.float32, device=rows.device)  # ignored rows stay 0
                    _liger_cross_entropy_rows(logits, target, row_loss, need_hidden or need_weight)
                    total += row_loss.sum()
                    if need_hidden:
                        torch.mm(logits, weight_c, out=grad_hidden[start : start + chunk_rows])
                    if need_weight:
                        grad_weight += logits.t().float() @ rows.float()
                    del logits
                    continue
                safe_target = target.clamp(min=0)
                # Same rounding as the plain path: logits in the compute dtype, loss in float32.
                logits = (rows @ weight_c.t()).float()
                logsumexp = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe_target[:, None])[:, 0]
                total += ((logsumexp - target_logit) * valid).sum()
                if need_hidden or need_weight:
                    # d(mean CE)/d(logits) = (softmax - onehot) / n_valid, zero on ignored rows.
                    probs = logits.sub_(logsumexp[:, None]).exp_()
                    probs[torch.arange(len(target), device=probs.device), safe_target] -= 1.0
                    probs.mul_((valid.to(torch.float32) / n_valid)[:, None])
                    grad_logits = probs.to(hidden.dtype)
                    if need_hidden:
                        grad_hidden[start : start + chunk_rows] = grad_logits @ weight_c
                    if need_weight:
                        grad_weight += grad_logits.t().float() @ rows.float()
                del logits
            if fused:  # the kernel's gradients are per row, not yet divided by the number of valid rows
                for grad in (grad_hidden, grad_weight):
                    if grad is not None:
                        grad.div_(n_valid)
            ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
            ctx.has = (need_hidden, need_weight)
            ctx.hidden_dtype = hidden.dtype
            return total / n_valid

        @staticmethod
        def backward(ctx, grad_output):
            saved = list(ctx.saved_tensors)
            need_hidden, need_weight = ctx.has
            grad_hidden = (saved.pop(0) * grad_output).to(ctx.hidden_dtype) if need_hidden else None
            grad_weight = saved.pop(0) * grad_output if need_weight else None
            return grad_hidden, grad_weight, None, None

    return LinearCrossEntropy


def _liger_cross_entropy_rows(logits, targets, row_loss, gradients: bool) -> None:
    """Cross-entropy of each row of ``logits`` (sum reduction) into ``row_loss``; with
    ``gradients``, ``logits`` is overwritten with d(loss)/d(logits): softmax - onehot, and
    zero on rows whose target is IGNORE_INDEX."""
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    n_rows, n_cols = logits.shape
    liger_cross_entropy_kernel[(n_rows,)](
        X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=targets, Y_stride=targets.stride(-1), weight_ptr=None,
        loss_ptr=row_loss, z_loss_ptr=None, loss_stride=row_loss.stride(-1), token_accuracy_ptr=None,
        token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=n_cols,
        n_non_ignore=1.0, sum_non_ignore_weight=1.0, weight_sum=0.0, ignore_index=IGNORE_INDEX,
        lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
        RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
        HAS_GRADIENTS=gradients, BLOCK_SIZE=min(32768, triton.next_power_of_2(n_cols)), num_warps=32)


def linear_cross_entropy(hidden, weight, labels, chunk_rows: int | None = None):
    """Causal-LM loss from the last hidden states without materialising all logits.

    The same function as transformers' ``ForCausalLMLoss`` on ``hidden @ weight.T``: labels
    are shifted left by one, ``-100`` is ignored, and the loss is the mean over the rest.

    Args:
        hidden: (batch, seq, hidden) final hidden states (after the last norm).
        weight: (vocab, hidden) output projection.
        labels: (batch, seq) token ids, -100 where no loss is wanted.
        chunk_rows: tokens per chunk; default keeps each float32 logits block at or under
            LOGITS_CHUNK_ELEMENTS.

    Returns:
        A scalar float32 loss.
    """
    import torch

    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if chunk_rows is None:
        chunk_rows = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    return _linear_cross_entropy_function().apply(flat, weight, targets.to(flat.device), chunk_rows)


def _chunked_loss_forward(self, input_ids=None, labels=None, **kwargs):
    """The causal LM's forward, taking the chunked loss when training with labels."""
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = type(self).forward
    if labels is None or not torch.is_grad_enabled() or kwargs.get("inputs_embeds") is not None:
        return original(self, input_ids=input_ids, labels=labels, **kwargs)
    kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(input_ids=input_ids, **kwargs)
    loss = linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, labels)
    return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values)


def use_chunked_loss(model) -> bool:
    """Route the training loss through ``linear_cross_entropy`` where it is the same function.

    Returns:
        True when the model's forward was patched; False for architectures whose head is not
        a plain bias-free linear layer (their forward is left alone).
    """
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal_lm, "config", None)
    head = getattr(causal_lm, "lm_head", None)
    if (getattr(config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES or type(head) is not torch.nn.Linear
            or head.bias is not None or not hasattr(causal_lm, "model")):
        return False
    causal_lm.forward = types.MethodType(_chunked_loss_forward, causal_lm)
    causal_lm._qlorapipe_patched = True
    return True


def _fused_rms_norm_forward(self, hidden_states):
    """Llama-style RMSNorm (float32 statistics, weight applied in the input dtype) in one Triton kernel."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, "llama" casting: the function of LlamaRMSNorm / Qwen2RMSNorm; the gradient
    # buffer is reused in place, as liger-kernel's own patch for these models does.
    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", True, None)


def _fused_swiglu_forward(self, x):
    """down(silu(gate(x)) * up(x)) with the activation and product in one Triton kernel.

    With ``lora_fast_forward`` on the LoRA ``down_proj``, the product and the down projection
    are one autograd function (fused_lora.SwigluLoraLinear) that recomputes the product in
    the backward pass instead of keeping it.
    """
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from qlorapipe import fused_lora

    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if vars(down).get("_qlorapipe_patched") and gate.numel() < fused_lora.MAX_ELEMENTS:
        parts = fused_lora.lora_parts(down)
        if parts is not None:
            return fused_lora.SwigluLoraLinear.apply(gate, up, *parts)
    return down(LigerSiLUMulFunction.apply(gate, up))


def use_fused_kernels(model, compute_dtype) -> bool:
    """Give the RMSNorm, SwiGLU MLP and RoPE of Llama-family models liger-kernel's fused kernels.

    Only where the function is exactly the same: Llama-style norms whose weight is already in
    the compute dtype (``keep_frozen_dtype``; an upcast float32 weight would change the output
    dtype), MLPs whose activation is SiLU, and the rotary embedding of their attention
    modules (``use_fused_rope``: a module global becomes a dispatcher that changes nothing
    outside the marked instances). The module instances are patched.

    Returns:
        True when any module was patched.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal_lm, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES:
        return False
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
        import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError as error:
        logger.info("acceleration.fused_kernels needs liger-kernel (%s): skipped", error)
        return False
    patched = use_fused_rope(model)
    for module in model.modules():
        name = type(module).__name__
        if (name.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and getattr(module, "weight", None) is not None and module.weight.dtype == compute_dtype):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
        elif (name.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
              and getattr(getattr(module, "config", config), "hidden_act", None) in ("silu", "swish")):
            module.forward = types.MethodType(_fused_swiglu_forward, module)
        else:
            continue
        module._qlorapipe_patched = True
        patched = True
    return patched


# Set while a module with the fused RoPE runs its forward (per thread: checkpointed blocks are
# recomputed in autograd's thread, where the module's hooks set it again).
_FUSED_ROPE = threading.local()


def _rope_dispatcher(original):
    """``apply_rotary_pos_emb`` of a transformers modeling module, taking liger-kernel's RoPE
    kernel inside attention modules ``_use_fused_rope`` marked, and ``original`` elsewhere."""

    from qlorapipe import fused_lora

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (getattr(_FUSED_ROPE, "depth", 0) and fused_lora.on_triton(q) and not args and not kwargs
                and cos.shape[-1] == q.shape[-1] and q.dim() == 4):
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction.apply(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._qlorapipe_original = original
    return apply_rotary_pos_emb


def use_fused_rope(model) -> bool:
    """Run the rotary embedding of each attention module as one Triton kernel (liger-kernel's).

    Returns:
        True when any attention module was marked.
    """
    return any([_use_fused_rope(m) for m in model.modules() if type(m).__name__.endswith("Attention")])


def _use_fused_rope(attention) -> bool:
    """Run ``attention``'s rotary embedding as one Triton kernel (liger-kernel's) for q and k.

    transformers' attention calls its module's global ``apply_rotary_pos_emb`` (q * cos +
    rotate_half(q) * sin: six kernels and two copies, and the same again backward). That global
    becomes a dispatcher (once per modeling module) which takes the fused kernel only while a
    marked attention module runs: forward hooks on this instance mark it, so other models in
    the process keep transformers' function.
    """
    import sys

    module = sys.modules.get(type(attention).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or not hasattr(module, "rotate_half"):
        return False
    try:
        import liger_kernel.ops.rope  # noqa: F401
    except ImportError:
        return False
    if not hasattr(original, "_qlorapipe_original"):
        module.apply_rotary_pos_emb = _rope_dispatcher(original)

    def enter(*_):
        _FUSED_ROPE.depth = getattr(_FUSED_ROPE, "depth", 0) + 1

    def leave(*_):
        _FUSED_ROPE.depth -= 1

    attention._qlorapipe_rope_hooks = (attention.register_forward_pre_hook(enter),
                                       attention.register_forward_hook(leave, always_call=True))
    return True


def decoder_layers(model) -> list:
    """The transformer blocks, in order (those gradient checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def skip_checkpointing(model, n_layers: int) -> bool:
    """Keep the activations of the last ``n_layers`` blocks instead of recomputing them.

    Selective checkpointing: each un-checkpointed block saves a forward pass in the backward
    pass at the price of its activations; checkpoint only as many as the memory needs.

    Returns:
        True when any block was changed.
    """
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
    for layer in layers[len(layers) - min(n_layers, len(layers)) :]:
        layer.gradient_checkpointing = False
        layer._qlorapipe_uncheckpointed = True
    return bool(layers) and n_layers > 0


def checkpoint_again(modules) -> None:
    """Undo ``skip_checkpointing`` on ``modules`` (those it did not change are left alone)."""
    for module in modules:
        if vars(module).pop("_qlorapipe_uncheckpointed", False):
            module.gradient_checkpointing = True


def uncheckpointed_count(model) -> int:
    """How many blocks ``skip_checkpointing`` took out of gradient checkpointing."""
    return sum(bool(vars(layer).get("_qlorapipe_uncheckpointed")) for layer in decoder_layers(model))


def blocks_within_budget(peak: float, kept: int, per_block: float, budget: float, n_blocks: int) -> int:
    """The most blocks that can keep their activations with the step's peak memory within ``budget``.

    The peak grows by a fixed amount per kept block (Qwen2.5-3B at 4,096 tokens on an H200:
    10.90, 12.14 and 14.61 GB with 24, 28 and 36 kept, 0.31 GB a block), so it is the line
    through one measured point: ``peak + (N - kept) * per_block``.

    Args:
        peak: the measured peak with ``kept`` blocks kept (GB, as ``budget``).
        kept: how many blocks were kept when ``peak`` was measured.
        per_block: what each further kept block adds (GB); <= 0 (nothing measurable): every
            block fits if ``peak`` does.
        budget: the peak allowed (GB).
        n_blocks: the blocks there are.

    Returns:
        The largest N in [0, n_blocks] whose predicted peak is at most ``budget``.
    """
    if per_block <= 0:
        return n_blocks if peak <= budget else 0
    room = kept + (budget - peak) / per_block
    if room >= n_blocks:
        return n_blocks
    # A hair of tolerance so that a budget on a predicted peak (a float sum) keeps that block.
    return max(0, math.floor(room + 1e-9))


def plan_uncheckpointed_layers(model, params: AccelerationParams, batch, device, num_processes: int = 1,
                               cuda_graphs: bool = False) -> int:
    """With ``uncheckpointed_layers: auto``, keep as many blocks as fit in the memory budget.

    Runs ``fit_uncheckpointed_layers`` on ``batch`` on CUDA in one process. With several
    processes every block stays checkpointed: each rank would measure its own memory and
    could keep a different number of blocks, and the ranks must agree (under FSDP a
    recomputed block gathers its shards again: ranks that recompute different blocks would
    wait on different collectives).

    Args:
        model: the PEFT model, after ``apply``.
        params: the acceleration section.
        batch: one micro-batch of prepared rows (``input_ids``, ``labels``, maybe
            ``position_ids``), as the training loop draws them.
        device: where the model lives.
        num_processes: how many processes train.
        cuda_graphs: training replays CUDA graphs (``graphed_step``): measure steps the same way.

    Returns:
        How many blocks keep their activations (0 on the CPU, or when none does).
    """
    if params.uncheckpointed_layers != "auto" or device.type != "cuda":
        return uncheckpointed_count(model)
    if num_processes != 1:
        logger.info("uncheckpointed_layers: auto keeps every block checkpointed with %d processes "
                    "(set an integer to keep some)", num_processes)
        return uncheckpointed_count(model)
    inputs, labels = model_inputs(batch, device), batch["labels"].to(device).long()
    kept, measured = fit_uncheckpointed_layers(model, inputs, labels, params.memory_budget_gb, device, cuda_graphs)
    if measured:
        logger.info("uncheckpointed_layers: auto keeps %d of %d blocks (%.2f GB each; %.2f GB with all "
                    "checkpointed, %.2f GB with %d kept; budget %.2f GB%s)", kept, measured["n_blocks"],
                    measured["per_block_gb"], measured["peak_all_checkpointed_gb"], measured["peak_gb"], kept,
                    measured["budget_gb"], "" if params.memory_budget_gb is not None else ", 90% of the GPU's memory")
        if measured["peak_all_checkpointed_gb"] > measured["budget_gb"]:
            logger.warning("A step peaks at %.2f GB with every block checkpointed, above the budget of "
                           "%.2f GB (acceleration.memory_budget_gb)", measured["peak_all_checkpointed_gb"],
                           measured["budget_gb"])
    return kept


def fit_uncheckpointed_layers(model, inputs: dict, labels, budget_gb: float | None, device,
                              cuda_graphs: bool = False) -> tuple[int, dict]:
    """Measure what a block's activations cost, then keep as many blocks as fit in ``budget_gb``.

    Forward and backward passes of one micro-batch (eager, or as CUDA graphs with
    ``cuda_graphs``) measure the peak allocated memory with every block checkpointed, with
    the last block kept and with the last two kept; the difference of the last two is what
    each further kept block adds, and the line through them predicts how many fit (``blocks_within_budget``). Not the difference to all
    checkpointed: that step already holds one block's activations at a time, recomputing
    each for its backward pass, so the first kept block adds less than the others
    (Qwen2.5-3B at 4,096 tokens on an H200: 3.79 GB with none kept; 10.90, 12.14 and 14.61 GB
    with 24, 28 and 36 kept, that is 3.79 + (N - 1) * 0.31 GB within 0.03 GB). The count the
    line predicts is then measured too, and while it peaks above the budget the count steps
    down along the line through the measured points (halfway down when it ran out of memory),
    at most MAX_FIT_CHECKS times: the count kept is one whose measured peak is within the
    budget. ``skip_checkpointing`` then keeps that many.

    It leaves no trace: the CPU and CUDA random states are put back (training draws the
    dropout masks it would have drawn without it), as are the gradients (None in the train
    stage) and the modules' train/eval modes; the memory it used is freed and the peak
    memory statistics are reset.

    Args:
        model: the PEFT model, after ``apply``.
        inputs: the model's keyword arguments for one micro-batch (``data.model_inputs``).
        labels: that micro-batch's labels, on ``device``.
        budget_gb: the peak allowed (GB, 1e9 bytes); None: 90% of the GPU's memory, that is
            of the free memory plus what this process has allocated, when it starts.
        device: where the model lives; on anything but CUDA nothing is done.
        cuda_graphs: measure each step as training will run it, captured and replayed as a
            ``GraphedStep`` (warm-up runs included): on an H200 the graphed step of the 3B model
            with 33 blocks kept peaked at least 1.3 GB above its eager step. A step that
            cannot be captured is measured eagerly, as it will then train.

    Returns:
        (N, measured): the blocks kept and, for the log and metrics, ``peak_all_checkpointed_gb``,
        ``per_block_gb``, ``budget_gb``, ``kept``, ``n_blocks`` and ``peak_gb`` (the measured
        peak with N kept); empty when nothing was measured (not CUDA, or no block under
        gradient checkpointing).

    Raises:
        torch.cuda.OutOfMemoryError: a step with every block checkpointed does not fit.
    """
    if device.type != "cuda":
        return 0, {}
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
    if not layers:
        return 0, {}
    import gc

    import torch

    n_blocks = len(layers)
    trainable = [param for param in model.parameters() if param.requires_grad]
    grads = [param.grad for param in trainable]
    modes = [(module, module.training) for module in model.modules()]

    def release():
        for param in trainable:
            param.grad = None
        gc.collect()
        torch.cuda.empty_cache()

    def measure(kept: int) -> float:
        """The peak allocated memory (GB) of one step with the last ``kept`` blocks kept; inf if it runs out."""
        release()
        skip_checkpointing(model, kept)
        step = None
        try:
            torch.cuda.reset_peak_memory_stats(device)
            step = GraphedStep(model) if cuda_graphs else None
            if step is None or step(inputs, labels, 1.0) is None:  # eager, or a step that could not be captured
                model(**inputs, labels=labels).loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / 1e9
        except torch.cuda.OutOfMemoryError:
            if kept == 0:
                raise  # training itself would not fit
            return math.inf
        finally:
            del step  # the graph and its memory pool
            checkpoint_again(layers[n_blocks - kept :])

    release()
    if budget_gb is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget_gb = 0.9 * (free + torch.cuda.memory_allocated(device)) / 1e9
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        model.train()  # checkpointing acts in training mode only
        with torch.random.fork_rng(devices=[index]):  # puts the CPU and CUDA random states back
            peaks = {kept: measure(kept) for kept in range(min(2, n_blocks) + 1)}
            top = min(2, n_blocks)
            slope = peaks[top] - peaks[top - 1]  # inf or nan when out of memory
            n_kept = blocks_within_budget(peaks[top], top, slope, budget_gb, n_blocks) if math.isfinite(slope) else 0
            for _ in range(MAX_FIT_CHECKS):
                if n_kept in peaks:
                    break
                peaks[n_kept] = measure(n_kept)
                if peaks[n_kept] <= budget_gb:
                    break
                below = max(kept for kept in peaks if kept < n_kept)
                if math.isinf(peaks[n_kept]):  # out of memory: no line to follow, halve the way down
                    n_kept = (below + n_kept) // 2
                else:
                    slope = (peaks[n_kept] - peaks[below]) / (n_kept - below)
                    n_kept = blocks_within_budget(peaks[below], below, slope, budget_gb, n_kept - 1)
    finally:
        release()
        for module, training in modes:
            module.training = training
        for param, grad in zip(trainable, grads, strict=True):
            param.grad = grad
        torch.cuda.reset_peak_memory_stats(device)
    # Only a measured peak decides: the most blocks measured within the budget, up to the count found.
    n_kept = max((kept for kept, peak in peaks.items() if kept <= n_kept and peak <= budget_gb), default=0)
    if n_kept:
        skip_checkpointing(model, n_kept)
    spread = sorted(kept for kept, peak in peaks.items() if kept >= 1 and math.isfinite(peak))
    per_block = ((peaks[spread[-1]] - peaks[spread[0]]) / (spread[-1] - spread[0])) if len(spread) > 1 else 0.0
    measured = {"peak_all_checkpointed_gb": round(peaks[0], 3), "per_block_gb": round(per_block, 4),
                "budget_gb": round(budget_gb, 3), "kept": n_kept, "n_blocks": n_blocks,
                "peak_gb": round(peaks[n_kept], 3)}
    return n_kept, measured


def compile_layers(model) -> bool:
    """torch.compile each transformer block (regional compilation: one graph, reused).

    Returns:
        True when any block was compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
        layer._qlorapipe_compiled = True
    return bool(layers)


def packed_causal_mask(position_ids):
    """The (batch, 1, seq, seq) boolean mask of packed rows: causal, and only within a document.

    A document starts wherever the position does not continue the previous one by 1, as
    transformers decides for packed rows it is given ``position_ids`` for
    (masking_utils.find_packed_sequence_indices). True means "may attend".
    """
    import torch

    steps = position_ids[:, 1:] - position_ids[:, :-1]
    starts = torch.nn.functional.pad(steps != 1, (1, 0), value=False)
    document = starts.cumsum(-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


class GraphedStep:
    """Forward and backward of one micro-batch, captured once as a CUDA graph and then replayed.

    The step is host-bound on a GPU: Python, peft, bitsandbytes and autograd issue about
    10,000 small kernels per step, and the GPU waits for them (docs/benchmarks.md). A CUDA
    graph records those kernels once and replays them with one launch, so the host no
    longer paces the GPU. What the graph computes is the eager step's function: the same
    kernels on the same weights; the trainable weights, their gradients (accumulated in
    place, so the optimizer must zero them without freeing them) and the inputs stay at
    fixed addresses. Packed rows get their block-diagonal mask as an input (transformers
    decides whether rows are packed with a host-side check, which a graph cannot contain).

    One graph, for the shape of the first micro-batch: other shapes (a short last batch) run
    eagerly. If capturing fails, a warning says why and every step runs eagerly.
    """

    WARMUP_RUNS = 2  # eager runs on a side stream first, as torch.cuda.graphs documents

    def __init__(self, model):
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.graph = None
        self.static: dict = {}
        self.loss = None
        self.key = None
        self.failed: str | None = None
        self.replays = 0

    def __call__(self, inputs: dict, labels, scale: float):
        """Run forward and ``(loss * scale).backward()``; return the loss, or None to run eagerly."""
        key = (tuple(inputs["input_ids"].shape), "position_ids" in inputs)
        if self.failed or (self.key is not None and key != self.key):
            return None
        if self.graph is None:
            self.key = key
            if not self._capture(inputs, labels, scale):
                return None
        self._load(inputs, labels, scale)
        self.graph.replay()
        self.replays += 1
        return self.loss

    def _load(self, inputs: dict, labels, scale: float) -> None:
        self.static["input_ids"].copy_(inputs["input_ids"])
        self.static["labels"].copy_(labels)
        self.static["scale"].fill_(scale)
        if "position_ids" in inputs:
            self.static["position_ids"].copy_(inputs["position_ids"])
            self.static["attention_mask"].copy_(packed_causal_mask(inputs["position_ids"]))

    def _run(self):
        static = self.static
        kwargs = {name: static[name] for name in ("input_ids", "position_ids", "attention_mask") if name in static}
        loss = self.model(**kwargs, labels=static["labels"], use_cache=False).loss
        (loss * static["scale"]).backward()
        return loss

    def _capture(self, inputs: dict, labels, scale: float) -> bool:
        import torch

        self.static = {"input_ids": inputs["input_ids"].clone(), "labels": labels.clone(),
                       "scale": torch.full((), scale, dtype=torch.float32, device=labels.device)}
        if "position_ids" in inputs:
            self.static["position_ids"] = inputs["position_ids"].clone()
            self.static["attention_mask"] = packed_causal_mask(inputs["position_ids"])
        # The warm-up runs really accumulate gradients: put back what the step had so far
        # (usually nothing: the first micro-batch of a step).
        kept = [None if param.grad is None else param.grad.clone() for param in self.trainable]
        for param in self.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        # A capture that fails part-way leaves the CUDA generator in capture mode, and every
        # later random draw (dropout) would fail: its state is put back from this copy.
        generator = torch.cuda.default_generators[labels.device.index or 0]
        generator_state = generator.clone_state()
        try:
            side = _warmup_stream(labels.device.index or 0)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_RUNS):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's activations: the graph gets its own pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self._run()
            self.loss = loss.detach()  # the kernels are in the graph; the autograd objects can go
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            logger.warning("CUDA graphs off (acceleration.cuda_graphs), training eagerly: capturing the step "
                           "failed with %s", self.failed)
            torch.cuda.synchronize()
            generator.graphsafe_set_state(generator_state)
        with torch.no_grad():
            for param, grad in zip(self.trainable, kept, strict=True):
                param.grad.zero_() if grad is None else param.grad.copy_(grad)
        return self.graph is not None


@functools.cache
def _warmup_stream(device_index: int):
    """One side stream per device for every capture's warm-up runs.

    torch keeps a cuBLAS workspace for every stream that ran a matmul, for the life of the
    process (about 0.07 GB on an H100): a new stream per capture would leave one behind each time.
    """
    import torch

    return torch.cuda.Stream(device=device_index)


def graphed_step(model, params: AccelerationParams, device, num_processes: int = 1) -> GraphedStep | None:
    """A GraphedStep for ``model`` when ``params.cuda_graphs`` is on, on CUDA, in one process.

    Several processes would need their gradient all-reduce inside the graph; they run eagerly.
    Compiled blocks failed to capture (torch 2.11, H100): with ``compile_layers`` the step runs
    compiled and eager, without a graph.
    """
    if not params.cuda_graphs or device.type != "cuda" or num_processes != 1:
        return None
    if params.compile_layers:
        logger.info("acceleration.cuda_graphs is not combined with compile_layers: training without CUDA graphs")
        return None
    if any(type(module).__name__ == "Linear8bitLt" for module in model.modules()):
        # LLM.int8() picks outlier columns on the host at every call: nothing a graph can replay.
        logger.info("acceleration.cuda_graphs does not apply to 8-bit layers: training without CUDA graphs")
        return None
    logger.info("Acceleration: cuda_graphs (captured at the first micro-batch)")
    return GraphedStep(model)

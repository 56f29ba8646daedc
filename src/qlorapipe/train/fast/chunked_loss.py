"""The training loss without full-vocabulary float32 logits (``acceleration.chunked_cross_entropy``).

``linear_cross_entropy`` computes transformers' causal-LM loss from the last hidden states
chunk by chunk (on CUDA with liger-kernel's cross-entropy kernel), and ``use_chunked_loss``
routes the model's training forward through it where it is the same function.
"""

from __future__ import annotations

import functools
import types

from qlorapipe import modeling
from qlorapipe.data import IGNORE_INDEX
from qlorapipe.train.fast import liger

# Largest float32 logits block the chunked loss materialises at once (elements): 256 MiB.
LOGITS_CHUNK_ELEMENTS = 2**26


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
            from qlorapipe.train.fast import fused_lora

            fused = fused_lora.on_triton(hidden) and liger.available()
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
    causal_lm = modeling.plain_head_causal_lm(model)
    if causal_lm is None:
        return False
    # Patched on the instance, not wrapped: peft's PeftModel holds this very object as its base
    # model, and the state-dict names and generation go through it.
    causal_lm.forward = types.MethodType(_chunked_loss_forward, causal_lm)
    causal_lm._qlorapipe_patched = True
    return True

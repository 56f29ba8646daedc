"""unsloth as a peer row of benchmarks/train_speed.py: one case, one dropout, in a process of its own.

    python benchmarks/unsloth_peer.py --model-dir DIR --seq 1024 --batch 4 --dropout 0.05 \
        --batches batches.safetensors --lora-init lora.safetensors --grads-out grads.safetensors --out row.json

unsloth patches transformers when it is imported, so it never shares a process with the plain
recipe or this project's rows; train_speed.py (``--peer unsloth``) starts this script per case
and dropout and reads its row back. unsloth is used through its own documented API, in its best
configuration for QLoRA on one GPU: ``FastLanguageModel.from_pretrained(load_in_4bit=True,
dtype=bfloat16)``, ``FastLanguageModel.get_peft_model`` with the same rank, alpha, dropout and
seven projections as the other rows and ``use_gradient_checkpointing="unsloth"`` (its
offloaded, recomputed checkpoints), bitsandbytes' AdamW8bit, and a plain loop with labels = input
ids (unsloth's own loss), after ``FastLanguageModel.for_training`` (which turns its checkpointing
on; the row says for how many blocks a checkpoint really ran). The LoRA weights start from the
same values as the other rows (``--lora-init``, B non-zero), the batches are the same
(``--batches``), so the loss on the last batch before any step can be compared with theirs. Not
available to it here: flash-attn (sdpa for every row). It needs a tokenizer in DIR (train_speed.py
writes one of the model's vocabulary size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--dropout", type=float, required=True)
    parser.add_argument("--batches", type=Path, required=True, help="safetensors file: batch_0 ... batch_N-1")
    parser.add_argument("--lora-init", type=Path, required=True, help="safetensors file of the LoRA weights to start from")
    parser.add_argument("--grads-out", type=Path, required=True,
                        help="safetensors file for the LoRA gradients on the last batch, dropout off")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from unsloth import FastLanguageModel  # before transformers: it patches it

    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = FastLanguageModel.from_pretrained(model_name=str(args.model_dir), max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=args.dropout,
                                             target_modules=list(TARGETS), bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=1,
                                             max_seq_length=args.seq)
    loaded = _load_lora(model, load_file(str(args.lora_init)))
    batches = load_file(str(args.batches))
    batches = [batches[f"batch_{i}"].cuda() for i in range(len(batches))]
    FastLanguageModel.for_training(model)  # unsloth's switch to training: it turns its checkpointing on
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    with checkpoint_calls(blocks) as called:  # the blocks that really ran through a checkpoint
        loss_before = _loss_and_grads(model, batches[-1], args.grads_out)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=2e-4, weight_decay=0.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, started = [], None
    for index, input_ids in enumerate(batches):
        if index == args.warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(b.numel() for b in batches[args.warmup:])
    import transformers
    import unsloth

    row = {
        "variant": f"unsloth {unsloth.__version__}, dropout {args.dropout:g}",
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / (len(batches) - args.warmup),
        "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "loss": loss_before,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "lora_tensors_loaded": loaded,
        "optimizer": "bitsandbytes AdamW8bit",
        "checkpointed_blocks": len(called),  # 0: unsloth trained without its checkpointing
        "blocks": len(blocks),
        "transformers": transformers.__version__,
        "packages": _versions(PEER_PACKAGES),
    }
    args.out.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)


# What the peer's speed may depend on beside unsloth itself: its row records the versions it ran with (unsloth's A
# step took 487 ms in one run and 245 ms in a later one with the same unsloth, transformers and API calls).
PEER_PACKAGES = ("unsloth_zoo", "torch", "triton", "bitsandbytes", "peft", "trl", "accelerate", "torchao",
                 "cut_cross_entropy", "xformers", "flash_attn", "datasets", "huggingface_hub", "tokenizers")


def _versions(names) -> dict:
    """The installed version of each of ``names`` (None where it is not installed)."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _loss_and_grads(model, input_ids, out: Path) -> float:
    """The loss and LoRA gradients on one batch with dropout off, before any step (as train_speed.py's
    ``loss_and_grads`` measures every other row); the gradients go to ``out``, flattened, in float32."""
    import torch
    from safetensors.torch import save_file

    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    save_file({n: p.grad.detach().float().flatten().cpu().contiguous() for n, p in model.named_parameters()
               if p.requires_grad}, str(out))
    model.zero_grad(set_to_none=True)
    for m, p in zip(dropouts, saved):
        m.p = p
    return float(loss)


@contextlib.contextmanager
def checkpoint_calls(blocks: list):
    """Yield the set of indices of ``blocks`` whose checkpoint function runs inside the ``with``.

    A block flagged for checkpointing may still not be checkpointed (a wrapper around its forward can
    bypass the call), so what runs is counted, not the flags. Each block's function is wrapped for the
    ``with`` only and put back after it.
    """
    called: set[int] = set()
    wrapped = []
    for index, block in enumerate(blocks):
        function = getattr(block, "_gradient_checkpointing_func", None)
        if function is None:
            continue

        def counting(*args, _index=index, _function=function, **kwargs):
            called.add(_index)
            return _function(*args, **kwargs)

        had_own = "_gradient_checkpointing_func" in vars(block)
        wrapped.append((block, function, had_own))
        block._gradient_checkpointing_func = counting
    try:
        yield called
    finally:
        for block, function, had_own in wrapped:
            if had_own:
                block._gradient_checkpointing_func = function
            else:
                del block._gradient_checkpointing_func


def _load_lora(model, state: dict) -> int:
    """Copy the LoRA weights of ``state`` (peft's names, as the other rows have them) into ``model``;
    returns how many were copied. Stops when a trainable tensor has no counterpart, so that every row
    starts from the same adapter."""
    import torch

    copied = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name not in state:
                raise SystemExit(f"unsloth's LoRA tensor {name} is not in the shared initial state")
            parameter.copy_(state[name].to(parameter.device, parameter.dtype))
            copied += 1
    return copied


if __name__ == "__main__":
    main()

"""The static-cache decoder (greedy.Decoder, CUDA graphs) against transformers' generate, on a GPU.

    PYTHONPATH=src python benchmarks/decoder_checks.py --shape qwen2.5-3b --workdir /tmp/decoder-checks

A random-init model of the shape (bfloat16, then 4-bit + a random rank-16 LoRA) decodes 4 prompts of
5-30 tokens left-padded in one batch, 24 new tokens, by generate, by the decoder with its graph and
by the decoder step by step; then the first prompt alone. It prints whether the tokens are the same
and, for each decoder, where its tokens first differ from a full forward over prompt + tokens (the
step, and the logit margin by which the full forward preferred another token): random weights have
near-ties that any change of attention kernel breaks either way. Then, on the 4-bit model, the
GPU memory still allocated after ``merge.speed.measure_speed`` and after the model is deleted, by
each decoder. Shapes: benchmarks/train_speed.py's, and "small-qwen2" (6 layers, hidden 256).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [list(range(100, 100 + n)) for n in (5, 17, 9, 30)]


def config(shape: str):
    from train_speed import shape_config
    from transformers import Qwen2Config

    if shape == "small-qwen2":
        return Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True)
    return shape_config(shape)


def first_disagreements(model, tokens, device) -> list[tuple[int, float]]:
    """Per prompt: (step, margin) where a full forward's argmax first differs from the decoded token."""
    import torch

    found = []
    for prompt, new in zip(PROMPTS, tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + new], device=device)).logits[0].float()
        logits = logits[len(prompt) - 1: len(prompt) + len(new) - 1]
        for step, token in enumerate(new):
            if int(logits[step].argmax()) != token:
                found.append((step, round(float(logits[step].max() - logits[step, token]), 4)))
                break
    return found


def compare_tokens(model, device) -> None:
    import torch

    from qlorapipe import greedy

    def decoder(graph: bool, prompts):
        ids, attention = greedy.left_padded(prompts, 0)
        decoding = greedy.Decoder(model, len(prompts), ids.shape[1], 24, set(), 0, device, graph=graph)
        with torch.no_grad():
            try:
                return decoding.run(ids, attention).tolist()
            finally:
                decoding.close()

    with torch.no_grad():
        reference = greedy.generate(model, PROMPTS, 24, 4, device, set(), 0, static=False)
        alone = greedy.generate(model, PROMPTS[:1], 24, 1, device, set(), 0, static=False)
    graphed, eager = decoder(True, PROMPTS), decoder(False, PROMPTS)
    print(f"  graph == generate: {graphed == reference}, eager == generate: {eager == reference}, "
          f"graph == eager: {graphed == eager}")
    for label, tokens in (("generate", reference), ("graph", graphed), ("eager", eager)):
        print(f"  {label}: first disagreement with the full forward (step, margin): "
              f"{first_disagreements(model, tokens, device)}")
    print(f"  one row: graph == generate {decoder(True, PROMPTS[:1]) == alone}, "
          f"eager == generate {decoder(False, PROMPTS[:1]) == alone}")


def memory_after_speed(model_dir: Path, device) -> None:
    import torch

    from qlorapipe import greedy, memory, modeling
    from qlorapipe.merge import speed
    from qlorapipe.params import LoraParams, QuantizationParams

    allocated = lambda: f"{torch.cuda.memory_allocated(device) / 1e9:.3f} GB"
    for static in (True, False):
        model = modeling.add_lora(modeling.load_base_model(model_dir, QuantizationParams(), device)[0],
                                  LoraParams(rank=16, alpha=32, dropout=0.0), quantized=True,
                                  gradient_checkpointing=False)
        model.eval()
        model.config.use_cache = True
        loaded = allocated()
        chosen = greedy.uses_static_decoder
        greedy.uses_static_decoder = lambda *args, static=static: static
        try:
            figures = speed.measure_speed(model, torch.arange(100, 116)[None], 32, device)
        finally:
            greedy.uses_static_decoder = chosen
        after = allocated()
        del model
        memory.release(device)
        print(f"  {figures['decoder']}: {figures['tokens_per_second']} tok/s; allocated: loaded {loaded}, "
              f"after measure_speed {after}, model deleted {allocated()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    device = torch.device("cuda")
    model_dir = args.workdir / args.shape
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(config(args.shape), dtype=torch.bfloat16).save_pretrained(model_dir)
    gc.collect()
    torch.cuda.empty_cache()
    print(f"{args.shape}: built in {time.perf_counter() - started:.1f} s")
    print("bfloat16")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    compare_tokens(model, device)
    del model
    print("4-bit + LoRA (B random)")
    model = modeling.add_lora(modeling.load_base_model(model_dir, QuantizationParams(), device)[0],
                              LoraParams(rank=16, alpha=32, dropout=0.0), quantized=True, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.eval()
    model.config.use_cache = True
    compare_tokens(model, device)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print("GPU memory after measure_speed (4-bit + LoRA)")
    memory_after_speed(model_dir, device)


if __name__ == "__main__":
    main()

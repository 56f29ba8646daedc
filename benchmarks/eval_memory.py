"""What an evaluation loss holds on the GPU and how long it takes: the head a chunk at a time against logits whole.

    PYTHONPATH=src python benchmarks/eval_memory.py --cases qwen2.5-3b:2048:4 llama-2-7b:2048:2 --out bench-out/eval

For each case (shape:sequence length:rows per batch) a random-init model of the shape
(``train_speed.save_random_model``) is loaded as the evaluate stage loads it (``modeling.load_base_model``:
4-bit NF4, bfloat16 compute; LoRA r=16 on every projection with B made non-zero, no float32 upcast), and
``perplexity.mean_token_loss`` runs over --batches batches of random tokens, every position predicted (the
most head work; a masked prompt only removes rows from the chunked head), in two ways on the same model and
batches:

- "head by chunks": what the evaluate stage and the train stage's evaluations run for the Llama, Mistral
  and Qwen families (the decoder's last hidden states, the head on the predicted positions a chunk at a
  time);
- "logits whole": the model's own forward with a batch's logits in the compute dtype, the loss upcast a
  chunk at a time (what other families, and a head trained through ``lora.modules_to_save``, run; what
  every family ran before).

The head's chunk (logits at a time) is the default, ``perplexity.LOSS_CHUNK_ELEMENTS``, and each of
--chunks beside it.

Reported per way: the memory allocated before, the peak allocated above it during the evaluation, the
median seconds of --repeats runs and the loss (both ways must agree). Prints a table with the ratios;
writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from train_speed import lora_params, randomize_lora_b, save_random_model

from qlorapipe import modeling, perplexity
from qlorapipe.params import QuantizationParams

HEAD_BY_CHUNKS, LOGITS_WHOLE = "head by chunks", "logits whole"


class Rows:
    """Prepared rows as ``datasets`` gives them with torch formatting: a slice is a dict of tensors."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: slice) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def measure(model, rows: Rows, batch: int, device, whole_logits: bool, chunk_elements: int, repeats: int) -> dict:
    """Peak memory above what was allocated before, median seconds and the loss of ``mean_token_loss``."""
    found = perplexity.modeling.plain_head_causal_lm
    if whole_logits:  # the model's own forward: every family outside PLAIN_HEAD_FAMILIES takes this way
        perplexity.modeling.plain_head_causal_lm = lambda model: None
    try:
        seconds, loss = [], None
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            loss, tokens = perplexity.mean_token_loss(model, rows, batch, device, chunk_elements=chunk_elements)
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated(device) - before
    finally:
        perplexity.modeling.plain_head_causal_lm = found
    return {"allocated_before_gb": round(before / 1e9, 3), "peak_above_gb": round(peak / 1e9, 3),
            "seconds": round(statistics.median(seconds), 3), "loss": loss, "tokens": tokens}


def load(model_dir: Path, device):
    """The 4-bit base with a LoRA adapter on every projection, as the evaluate stage holds it."""
    from peft import get_peft_model

    model, _ = modeling.load_base_model(model_dir, QuantizationParams(), device)
    torch.manual_seed(1)
    model = get_peft_model(model, modeling.lora_config(lora_params(0.05)))
    randomize_lora_b(model)
    return model.eval()


def run_case(case: str, workdir: Path, batches: int, repeats: int, chunks: list[int]) -> dict:
    shape, seq, batch = case.split(":")
    seq, batch = int(seq), int(batch)
    device = torch.device("cuda")
    model_dir, _ = save_random_model(shape, workdir)
    model = load(model_dir, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batches * batch, seq), generator=torch.Generator().manual_seed(0))
    rows = Rows(ids)
    ways = {LOGITS_WHOLE: (True, perplexity.LOSS_CHUNK_ELEMENTS)}
    for chunk in sorted({perplexity.LOSS_CHUNK_ELEMENTS, *chunks}):
        ways[f"{HEAD_BY_CHUNKS} of 2^{chunk.bit_length() - 1}"] = (False, chunk)
    for whole_logits, chunk in ways.values():  # warm-up: kernels, cuBLAS
        measure(model, Rows(ids[:batch]), batch, device, whole_logits, chunk, repeats=1)
    found = {way: measure(model, rows, batch, device, whole_logits, chunk, repeats)
             for way, (whole_logits, chunk) in ways.items()}
    whole = found[LOGITS_WHOLE]
    result = {"case": case, "vocabulary": vocab, "batches": batches, "ways": found,
              "ratios": {way: {"peak": round(whole["peak_above_gb"] / got["peak_above_gb"], 2),
                               "speed": round(whole["seconds"] / got["seconds"], 3),
                               "loss_difference": abs(whole["loss"] - got["loss"])}
                         for way, got in found.items() if way != LOGITS_WHOLE}}
    del model
    torch.cuda.empty_cache()
    return result


def table(results: list[dict]) -> str:
    lines = ["| case | way | allocated before (GB) | peak above it (GB) | seconds | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for way, found in result["ways"].items():
            lines.append(f"| {result['case']} | {way} | {found['allocated_before_gb']} | {found['peak_above_gb']} | "
                         f"{found['seconds']} | {found['loss']:.6f} |")
    lines.append("")
    for result in results:
        for way, ratio in result["ratios"].items():
            lines.append(f"- {result['case']} (vocabulary {result['vocabulary']:,}), {way}: peak above the weights "
                         f"1/{ratio['peak']} of logits whole's, {ratio['speed']}x its speed, losses differ by "
                         f"{ratio['loss_difference']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["qwen2.5-3b:2048:4", "llama-2-7b:2048:2"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", nargs="*", type=int, default=[2**24, 2**26], help="more head chunks (logits)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/eval"))
    args = parser.parse_args()
    results = [run_case(case, args.workdir, args.batches, args.repeats, args.chunks) for case in args.cases]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch":
                                                       torch.__version__, "results": results}, indent=2))
    text = table(results)
    (args.out / "results.md").write_text(f"{torch.cuda.get_device_name()}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()

"""Wall time and tokens/s of the pipeline's train stage on GPUs, on a random-init model of a real shape.

    PYTHONPATH=src python benchmarks/train_stage_time.py --out bench-out
    PYTHONPATH=src python benchmarks/train_stage_time.py --shape qwen2.5-3b --seq 1024 --batch 4 \
        --steps 20 --processes 1,2 --runs defaults --out bench-out/ddp        # data-parallel scaling
    PYTHONPATH=src python benchmarks/train_stage_time.py --steps 8 --rounds 2 --out bench-out/cpu \
        --runs "float32 compute, CPU levers off,float32 compute,bfloat16 compute, CPU levers off,defaults"  # the CPU

Builds a model of the named shape (default: SmolLM2-135M's, the offline default: llama, hidden
576, 30 layers, 9 / 3 heads, intermediate 1536, vocab 49152, tied) with random weights, writes
random token chunks in the prepare stage's format, and runs ``stages/train.py`` with
params.yaml's defaults (or --seq / --batch / --steps), once per acceleration run and process
count. Prints each run's wall time (process start to exit, model load included) and the
stage's own tokens/s. With several process counts every run keeps the same global batch
(--batch per device x accumulation x processes, the accumulation being the largest process
count divided by this run's), and the table adds, against the one-process run of the same
acceleration: tokens/s per process as a share of one process's (scaling efficiency) and the
largest difference of the per-step training losses (the same chunks train each step).
Several processes on GPUs need one GPU each (NCCL); on a machine without GPUs they run gloo.
CUDA graphs apply to one process only, so compare process counts within "without cuda_graphs"
(the one-process "defaults" run is the single-GPU figure to beat). The stage's tokens/s count
every step, the first included: use enough --steps that the first does not dominate.
On the CPU the runs that matter set the compute dtype (``auto`` is bfloat16 on CPUs with
bfloat16 instructions) and the three levers that act there (keep_frozen_dtype, lora_fast_forward,
chunked_cross_entropy); --rounds repeats the whole list, alternating, and every row gets its
tokens/s as a multiple of the first run's mean (``x first``).
With --budget B --gpu-cap each stage process may hold no more than B GB of GPU memory
(``torch.cuda.set_per_process_memory_fraction``, the caching allocator's reserve included): when it
reaches that, the allocator frees what it has cached and retries, then runs out of memory, as on a GPU
with B GB free for torch (``capped_stage.py``; the CUDA context is outside the cap, as it is outside the
budget). That checks that a run planned within the budget trains on a GPU of that size. One process only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import capped_stage  # noqa: E402
from train_speed import save_random_model, shape_config, write_random_source_record  # noqa: E402

from qlorapipe import data  # noqa: E402
from qlorapipe.records import SOURCE_RECORD  # noqa: E402

CPU_LEVERS_OFF = {"keep_frozen_dtype": False, "lora_fast_forward": False, "chunked_cross_entropy": False}
OFF = {**CPU_LEVERS_OFF, "fused_kernels": False, "uncheckpointed_layers": 0, "compile_layers": False, "unpaged_optimizer": False,
       "cuda_graphs": False, "async_optimizer": False, "host_kept_layers": 0}


def train_losses(history: Path) -> list[float]:
    rows = history.read_text().splitlines()
    column = rows[0].split(",").index("train_loss")
    return [float(row.split(",")[column]) for row in rows[1:]]


def capped(cap_gb: float | None) -> list[str]:
    """The interpreter arguments before a stage script: none, or the wrapper that caps its GPU memory at ``cap_gb``."""
    return [] if cap_gb is None else capped_stage.interpreter_args(cap_gb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-stage"))
    parser.add_argument("--runs", default="defaults,without cuda_graphs,all levers off",
                        help="comma-separated labels of the runs to make, in this order (an unknown one lists them)")
    parser.add_argument("--rounds", type=int, default=1, help="make the list of runs this many times, alternating")
    parser.add_argument("--shape", default="smollm2-135m", help="a shape of train_speed.shape_config")
    parser.add_argument("--seq", type=int, help="tokens per chunk (default: params.yaml data.max_length)")
    parser.add_argument("--batch", type=int, help="chunks per device (default: params.yaml)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: params.yaml training.max_steps)")
    parser.add_argument("--processes", default="1", help="comma-separated process counts (distributed.num_processes)")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--budget", type=float, help="acceleration.memory_budget_gb of every run (default: params.yaml)")
    parser.add_argument("--gpu-cap", action="store_true",
                        help="with --budget: each stage process may hold no more GPU memory than the budget")
    args = parser.parse_args()
    if args.gpu_cap and args.budget is None:
        parser.error("--gpu-cap: give --budget too (the cap is the budget)")
    if args.gpu_cap and args.processes != "1":
        parser.error("--gpu-cap: one process only (the ranks of a launch start without the cap)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base, _ = save_random_model(args.shape, args.workdir)
    config = shape_config(args.shape)
    if not (base / SOURCE_RECORD).is_file():  # the train stage reads where its base came from
        write_random_source_record(base, args.shape, config)
    vocab = config.vocab_size
    seq = args.seq or params["data"]["max_length"]
    batch = args.batch or params["training"]["per_device_batch_size"]
    steps = args.steps or params["training"]["max_steps"]
    counts = [int(n) for n in args.processes.split(",")]
    if any(max(counts) % n for n in counts):
        parser.error(f"--processes {args.processes}: each count must divide the largest (the global batch is kept)")
    generator = torch.Generator().manual_seed(0)
    prepared = args.workdir / f"prepared-{args.shape}-{seq}"
    for split, n in ((data.TRAIN_SPLIT, max(400, 2 * steps * batch * max(counts))), (data.EVAL_SPLIT, 40)):
        chunks = torch.randint(0, vocab, (n, seq), generator=generator).tolist()
        data.save_chunks(chunks, prepared / split)
    rows = []
    accel, quant = params["acceleration"], params["quantization"]
    runs = {"defaults": (accel, quant),
            "without cuda_graphs": (dict(accel, cuda_graphs=False), quant),
            "every block checkpointed": (dict(accel, uncheckpointed_layers=0, host_kept_layers=0), quant),
            "all levers off": (OFF, quant),
            "float32 compute": (accel, dict(quant, compute_dtype="float32")),
            "float32 compute, CPU levers off": (dict(accel, **CPU_LEVERS_OFF), dict(quant, compute_dtype="float32")),
            "bfloat16 compute, CPU levers off": (dict(accel, **CPU_LEVERS_OFF), dict(quant, compute_dtype="bfloat16"))}
    labels = [label.strip() for label in re.split(r",(?! )", args.runs)]  # labels hold ", " themselves
    if unknown := [label for label in labels if label not in runs]:
        parser.error(f"--runs: unknown {unknown}; known: {list(runs)}")
    for label in labels * args.rounds:
        accel, quant = runs[label]
        if args.budget is not None:
            accel = dict(accel, memory_budget_gb=args.budget)
        for processes in counts:
            training = dict(params["training"], per_device_batch_size=batch, max_steps=steps, eval_every_steps=steps,
                            max_eval_batches=2, gradient_accumulation_steps=max(counts))
            run_params = dict(params, acceleration=accel, quantization=quant, training=training,
                              data=dict(params["data"], max_length=seq),
                              distributed=dict(params["distributed"], num_processes=processes, strategy=args.strategy))
            params_file = args.workdir / f"params-{len(rows)}.yaml"
            params_file.write_text(yaml.safe_dump(run_params, sort_keys=False))
            out = args.workdir / f"run-{len(rows)}"
            shutil.rmtree(out, ignore_errors=True)  # a stale checkpoint would resume
            metrics = out / "train.json"
            stage = [*capped(args.budget if args.gpu_cap else None), str(ROOT / "stages" / "train.py")]
            command = [sys.executable, *stage, "--params", str(params_file),
                       "--base", str(base), "--data", str(prepared), "--adapter", str(out / "adapter"),
                       "--metrics", str(metrics), "--history", str(out / "history.csv"),
                       "--curves", str(out / "curves.png"), "--log", str(out / "log.txt"),
                       "--checkpoints", str(out / "checkpoints"), "--live", str(out / "live")]
            started = time.perf_counter()
            subprocess.run(command, check=True)
            wall = time.perf_counter() - started
            row = {"acceleration": label, "processes": processes, "shape": args.shape, "seq": seq,
                   "process_wall_s": round(wall, 2), **json.loads(metrics.read_text()),
                   "train_losses": train_losses(out / "history.csv")}
            # this round's one-process row of the same run (the rows so far, latest first)
            single = next((r for r in reversed(rows) if r["acceleration"] == label and r["processes"] == 1), None)
            if single is not None and processes > 1:
                row["scaling_efficiency"] = row["tokens_per_second"] / processes / single["tokens_per_second"]
                row["max_loss_diff_vs_one_process"] = max(
                    abs(a - b) for a, b in zip(row["train_losses"], single["train_losses"], strict=True))
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "train_stage.json").write_text(json.dumps(rows, indent=1))
    first = [r["tokens_per_second"] for r in rows if (r["acceleration"], r["processes"]) == (labels[0], counts[0])]
    print("\n| acceleration | processes | compute | process wall s | stage wall s | train s | tokens/s | x first "
          "| per process vs one | max loss diff | train loss | eval loss | peak GB (GPU allocated, else RSS) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        efficiency = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else ""
        loss_diff = f"{r['max_loss_diff_vs_one_process']:.2e}" if "max_loss_diff_vs_one_process" in r else ""
        peak = r.get("peak_gpu_allocated_gb", r.get("peak_rss_gb", ""))
        print(f"| {r['acceleration']} | {r['processes']} | {r['compute_dtype']} | {r['process_wall_s']} | "
              f"{r['wall_seconds']} | {r['train_seconds']} | {r['tokens_per_second']:,.0f} | "
              f"{r['tokens_per_second'] / statistics.mean(first):.2f} | {efficiency} | {loss_diff} | "
              f"{r['train_loss']} | {r['eval_loss']} | {peak} |")


if __name__ == "__main__":
    main()

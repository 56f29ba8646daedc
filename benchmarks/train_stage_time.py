"""Wall time of the pipeline's train stage on a GPU, on a random-init model of the offline default's shape.

    PYTHONPATH=src python benchmarks/train_stage_time.py --out bench-out

Builds a SmolLM2-135M-shaped model (llama, hidden 576, 30 layers, 9 / 3 heads, intermediate
1536, vocab 49152, tied) with random weights, writes random token chunks of data.max_length
in the prepare stage's format, and runs ``stages/train.py`` with params.yaml's defaults, once
with the acceleration defaults and once with every lever off. Prints each run's wall time
(process start to exit, model load included) and the stage's own tokens/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import save_random_model  # noqa: E402

from qlorapipe import data  # noqa: E402

OFF = {"keep_frozen_dtype": False, "lora_fast_forward": False, "chunked_cross_entropy": False,
       "fused_kernels": False, "uncheckpointed_layers": 0, "compile_layers": False, "unpaged_optimizer": False,
       "cuda_graphs": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-stage"))
    parser.add_argument("--runs", default="defaults,without cuda_graphs,all levers off",
                        help="comma-separated labels of the runs to make")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base, _ = save_random_model("smollm2-135m", args.workdir)
    seq = params["data"]["max_length"]
    generator = torch.Generator().manual_seed(0)
    for split, n in ((data.TRAIN_SPLIT, 400), (data.EVAL_SPLIT, 40)):
        chunks = torch.randint(0, 49152, (n, seq), generator=generator).tolist()
        data.save_chunks(chunks, args.workdir / "prepared" / split)
    rows = []
    runs = [("defaults", params["acceleration"]),
            ("without cuda_graphs", dict(params["acceleration"], cuda_graphs=False)),
            ("all levers off", OFF)]
    for label, accel in [(label, accel) for label, accel in runs if label in args.runs.split(",")]:
        run_params = dict(params, acceleration=accel)
        params_file = args.workdir / f"params-{len(rows)}.yaml"
        params_file.write_text(yaml.safe_dump(run_params, sort_keys=False))
        out = args.workdir / f"run-{len(rows)}"
        metrics = out / "train.json"
        command = [sys.executable, str(ROOT / "stages" / "train.py"), "--params", str(params_file),
                   "--base", str(base), "--data", str(args.workdir / "prepared"), "--adapter", str(out / "adapter"),
                   "--metrics", str(metrics), "--history", str(out / "history.csv"),
                   "--curves", str(out / "curves.png"), "--log", str(out / "log.txt"),
                   "--checkpoints", str(out / "checkpoints")]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        row = {"acceleration": label, "process_wall_s": round(wall, 2), **json.loads(metrics.read_text())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "train_stage.json").write_text(json.dumps(rows, indent=1))
    print("\n| acceleration | process wall s | stage wall s | train s | tokens/s | train loss | eval loss | peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['acceleration']} | {r['process_wall_s']} | {r['wall_seconds']} | {r['train_seconds']} | "
              f"{r['tokens_per_second']:,.0f} | {r['train_loss']} | {r['eval_loss']} | {r['peak_gpu_allocated_gb']} |")


if __name__ == "__main__":
    main()

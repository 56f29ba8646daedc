"""Which merge.dtype passes the merge gate at real scale: bfloat16, float16 and float32 merges of one adapter.

    PYTHONPATH=src python benchmarks/merge_dtype.py --prepared PREPARED --tokenizer DIR \
        --shape qwen2.5-3b --out bench-out/merge-dtype

Builds a random-init model of the named shape (benchmarks/train_speed.py) with the vocabulary of
the tokenizer in --tokenizer (its files are copied beside the weights), trains an adapter on the
prepared data in --prepared with the train stage (params.yaml's defaults but --steps optimizer
steps of --batch x --accumulation rows), then runs the merge stage once per dtype with the gate
as params.yaml sets it. Prints, per dtype: whether the gate passed, the merged model's largest and
mean logit difference and perplexity change against base + adapter as trained, the naive merge's
perplexity change, the stage's wall time and its peak GPU memory (torch's, from merge.json when
the gate passed, else from the stage's log).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import shape_config, write_random_source_record  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_base(shape: str, tokenizer_dir: Path, workdir: Path) -> Path:
    """A random-init bf16 model of ``shape`` with the tokenizer's vocabulary, its tokenizer and a source record."""
    import torch
    from transformers import AutoModelForCausalLM

    path = workdir / f"{shape}-base"
    if (path / "source.json").is_file():
        return path
    config = shape_config(shape)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config.vocab_size = len(vocab) + 17 if len(vocab) % 64 else len(vocab)  # the tokenizer's ids all fit
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    write_random_source_record(path, shape, config)
    return path


def run_sampling_gpu_memory(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command``; sample the GPU's used memory (nvidia-smi, GiB) every 0.2 s while it runs."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, smi = 0.0, shutil.which("nvidia-smi")
    while process.poll() is None:
        if smi:
            used = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                  capture_output=True, text=True, check=False).stdout.strip()
            peak = max(peak, float(used or 0) / 1024)
        time.sleep(0.2)
    out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err), round(peak, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output (train/ and eval/)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model directory with tokenizer.json")
    parser.add_argument("--shape", default="qwen2.5-3b")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=16)
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlorapipe-merge"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/merge-dtype"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = build_base(args.shape, args.tokenizer, args.workdir)
    params["training"].update(max_steps=args.steps, per_device_batch_size=args.batch,
                              gradient_accumulation_steps=args.accumulation, eval_every_steps=args.steps,
                              max_eval_batches=2, checkpoint_every_steps=0)
    params["merge"].update(speed_new_tokens=0, requantized_candidate=False)
    train_dir = args.workdir / f"{args.shape}-train"
    shutil.rmtree(train_dir, ignore_errors=True)
    params_file = args.workdir / "params-train.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "stages/train.py"), "--params", str(params_file), "--base", str(base),
                    "--data", str(args.prepared), "--adapter", str(train_dir / "adapter"),
                    "--metrics", str(train_dir / "train.json"), "--history", str(train_dir / "history.csv"),
                    "--curves", str(train_dir / "curves.png"), "--log", str(train_dir / "log.txt"),
                    "--checkpoints", str(train_dir / "checkpoints"), "--live", str(train_dir / "live")], check=True)
    train = json.loads((train_dir / "train.json").read_text())
    rows = [{"shape": args.shape, "stage": "train", "wall_s": round(time.perf_counter() - started, 1),
             "train_loss": train["train_loss"], "eval_loss": train["eval_loss"],
             "peak_gpu_allocated_gb": train.get("peak_gpu_allocated_gb")}]
    print(json.dumps(rows[-1]), flush=True)
    for dtype in args.dtypes.split(","):
        params["merge"]["dtype"] = dtype
        params_file = args.workdir / f"params-merge-{dtype}.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        merged, metrics = args.workdir / f"{args.shape}-merged-{dtype}", args.workdir / f"merge-{dtype}.json"
        shutil.rmtree(merged, ignore_errors=True)
        metrics.unlink(missing_ok=True)
        started = time.perf_counter()
        result, peak = run_sampling_gpu_memory([
            sys.executable, str(ROOT / "stages/merge.py"), "--params", str(params_file), "--base", str(base),
            "--adapter", str(train_dir / "adapter"), "--data", str(args.prepared), "--out", str(merged),
            "--metrics", str(metrics)])
        row = {"shape": args.shape, "stage": f"merge {dtype}", "wall_s": round(time.perf_counter() - started, 1),
               "gate_passed": result.returncode == 0, "peak_gpu_used_gib_nvidia_smi": peak}
        if metrics.is_file():
            row.update(json.loads(metrics.read_text()))
        else:
            row["error"] = [line for line in result.stderr.splitlines() if line.strip()][-1:]
            row["log_tail"] = result.stdout[-3000:] + result.stderr[-3000:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(merged, ignore_errors=True)
    (args.out / f"merge_dtype-{args.shape}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""How much of the 4-bit quality gap each lora.init closes, measured by the evaluate stage.

    PYTHONPATH=src python benchmarks/lora_init_quality.py --out bench-out/lora-init \
        [--datasets default chat] [--variants nf4-default nf4-loftq bf16-default bf16-pissa] [-S key=value ...]

For each dataset (``default``: the offline default, params.yaml as it is; ``chat``: the
chatterbot chat preset of the README) the base model is downloaded and the data prepared once,
then for each variant the train and evaluate stages run with their own command lines (as
dvc.yaml runs them) on params.yaml plus the variant's keys:

- ``nf4-default``: the 4-bit base, peft's default init (the pipeline's default);
- ``nf4-loftq``: the 4-bit base, ``lora.init: loftq``;
- ``bf16-default``: 16-bit LoRA (``quantization.load_in: none``), the quality 4-bit aims at;
- ``bf16-pissa``: 16-bit base, ``lora.init: pissa``.

Prints one table per dataset: held-out perplexity of the base and the fine-tuned model,
general-corpus perplexity (forgetting), the task scores and stop share on held-out answers
(chat), training wall time; and for each 4-bit variant the share of the gap between the
4-bit default and 16-bit LoRA's fine-tuned perplexity that it closes. Writes results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    "default": {},
    "chat": {"data.source": "builtin:chatterbot", "data.format": "chat", "evaluate.chat_template": True,
             "evaluate.general_corpus": "builtin:python-docs",
             "evaluate.prompts": ["What is a computer?", "Tell me a joke."]},
}
VARIANTS = {
    "nf4-default": {},
    "nf4-loftq": {"lora.init": "loftq"},
    "bf16-default": {"quantization.load_in": "none"},
    "bf16-pissa": {"quantization.load_in": "none", "lora.init": "pissa"},
}


def write_params(path: Path, overrides: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage(name: str, *args: str) -> float:
    """Run stages/<name>.py with ``args``; returns its wall seconds (raises on failure)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - started


def run_dataset(dataset: str, variants: list[str], extra: dict, out: Path) -> list[dict]:
    work = out / dataset
    work.mkdir(parents=True, exist_ok=True)
    common = write_params(work / "params.yaml", {**DATASETS[dataset], **extra})
    base, prepared = out / "base", work / "prepared"
    if not (base / "source.json").is_file():
        stage("download", "--params", str(common), "--out", str(base))
    stage("prepare", "--params", str(common), "--base", str(base), "--out", str(prepared),
          "--report", str(work / "data.json"), "--lengths", str(work / "lengths.csv"),
          "--lengths-plot", str(work / "lengths.png"))
    rows = []
    for variant in variants:
        run = work / variant
        run.mkdir(exist_ok=True)
        params = write_params(run / "params.yaml", {**DATASETS[dataset], **VARIANTS[variant], **extra})
        train_s = stage("train", "--params", str(params), "--base", str(base), "--data", str(prepared),
                        "--adapter", str(run / "adapter"), "--metrics", str(run / "train.json"),
                        "--history", str(run / "history.csv"), "--curves", str(run / "curves.png"),
                        "--log", str(run / "log.txt"), "--checkpoints", str(run / "checkpoints"),
                        "--live", str(run / "live"))
        eval_s = stage("evaluate", "--params", str(params), "--base", str(base), "--adapter", str(run / "adapter"),
                       "--data", str(prepared), "--metrics", str(run / "eval.json"),
                       "--samples", str(run / "samples.json"), "--scores-plot", str(run / "scores.png"))
        rows.append({"dataset": dataset, "variant": variant, "train_s": round(train_s, 1), "evaluate_s": round(eval_s, 1),
                     "train": json.loads((run / "train.json").read_text()),
                     "eval": json.loads((run / "eval.json").read_text())})
    return rows


def gap_closed(rows: list[dict]) -> dict[str, float]:
    """Per variant: (4-bit default's fine-tuned perplexity - its own) / (4-bit default's - 16-bit LoRA's)."""
    ppl = {r["variant"]: r["eval"]["finetuned"]["perplexity"] for r in rows}
    if "nf4-default" not in ppl or "bf16-default" not in ppl or ppl["nf4-default"] == ppl["bf16-default"]:
        return {}
    gap = ppl["nf4-default"] - ppl["bf16-default"]
    return {v: round((ppl["nf4-default"] - p) / gap, 3) for v, p in ppl.items()}


def table(rows: list[dict]) -> str:
    closed = gap_closed(rows)
    head = ("| variant | held-out ppl base -> fine-tuned | general ppl base -> fine-tuned | gap closed | "
            "ROUGE-L | chrF | stopped | train s |")
    lines = [head, "| --- " * 8 + "|"]
    for r in rows:
        e, ft = r["eval"], r["eval"]["finetuned"]
        general = (f"{e['base']['general']['perplexity']:.2f} -> {ft['general']['perplexity']:.2f}"
                   if "general" in ft else "-")
        task = ft.get("task")
        lines.append(f"| {r['variant']} | {e['base']['perplexity']:.2f} -> {ft['perplexity']:.2f} | {general} | "
                     f"{closed.get(r['variant'], '-')} | {task['rouge_l'] if task else '-'} | "
                     f"{task['chrf'] if task else '-'} | {task['stop_share'] if task else '-'} | {r['train_s']} |")
        if task:
            base = e["base"]["task"]
            lines[-1] += f" (base: ROUGE-L {base['rouge_l']}, chrF {base['chrf']}, stopped {base['stop_share']})"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value (YAML value), all runs")
    args = parser.parse_args()
    extra = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.overrides)}
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for dataset in args.datasets:
        rows = run_dataset(dataset, args.variants, extra, args.out)
        results += rows
        print(f"\n## {dataset}\n\n{table(rows)}\n", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

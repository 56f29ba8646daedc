"""Write the deliverables chosen in export.formats: merged safetensors, GGUF files, the adapter alone.

    python stages/export.py --params params.yaml --merged models/merged --adapter models/adapter \
        --data data/prepared --out models/export --metrics metrics/export.json \
        --data-report metrics/data.json --train-metrics metrics/train.json \
        --eval-metrics metrics/eval.json --merge-metrics metrics/merge.json

Reads the ``export`` section of params.yaml. Writes, in --out: the merged model with its
tokenizer and model card (safetensors), gguf/model-f16.gguf and gguf/model-q8_0.gguf, and
adapter/ (the adapter alone). Each GGUF file is read back with transformers and its logits
compared with the merged model's on eval batches; the differences go to --metrics.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlorapipe import data, gguf_export, merging
from qlorapipe.adapter_export import write_adapter_package
from qlorapipe.adapters import ADAPTER_RECORD
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.model_card import render_model_card
from qlorapipe.outputs import atomic_dir, read_json, write_json
from qlorapipe.params import load_section

logger = logging.getLogger("export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--merged", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True, help="GGUF read-back fidelity")
    parser.add_argument("--data-report", type=Path, required=True)
    parser.add_argument("--train-metrics", type=Path, required=True)
    parser.add_argument("--eval-metrics", type=Path, required=True)
    parser.add_argument("--merge-metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_section(args.params, "export")
    for path in (args.merged / "config.json", args.data_report, args.train_metrics, args.eval_metrics,
                 args.merge_metrics):
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro` to produce it")
    eval_set = data.load_split(args.data, data.EVAL_SPLIT)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.merged)  # keeps the saved dtype
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    record = read_json(args.merged / ADAPTER_RECORD)
    metrics = {"train": read_json(args.train_metrics), "eval": read_json(args.eval_metrics),
               "merge": read_json(args.merge_metrics)}
    export_metrics = {"formats": params.formats}
    with atomic_dir(args.out) as out:
        if "safetensors" in params.formats:
            model.save_pretrained(out, safe_serialization=True, max_shard_size=params.max_shard_size)
            tokenizer.save_pretrained(out)
            (out / ADAPTER_RECORD).write_text((args.merged / ADAPTER_RECORD).read_text())
            (out / "README.md").write_text(render_model_card(record, metrics, read_json(args.data_report)))
        gguf_types = [f.removeprefix("gguf-") for f in params.formats if f.startswith("gguf-")]
        if gguf_types:
            # The reference is the merged model in float32, what the GGUF files were written from.
            reference_model = model.float().eval()
            batches = merging.eval_batches(eval_set, batch_size=4, n_batches=params.verify_batches)
            reference = merging.logits_on(reference_model, batches, torch.device("cpu"))
            (out / "gguf").mkdir()
            for file_type in gguf_types:
                gguf_file = out / "gguf" / f"model-{file_type}.gguf"
                gguf_export.write_gguf(reference_model, args.merged, gguf_file, file_type)
                export_metrics[f"gguf_{file_type}"] = verify_gguf(gguf_file, tokenizer, reference, batches)
        if "adapter" in params.formats:
            write_adapter_package(args.adapter, read_json(args.adapter / ADAPTER_RECORD), tokenizer,
                                  out / "adapter", ADAPTER_RECORD)
    write_json(args.metrics, export_metrics)
    logger.info("Exported %s (%s) to %s", record.get("base_model", {}).get("repo_id"), ", ".join(params.formats),
                args.out)


def verify_gguf(gguf_file: Path, tokenizer, reference: list, batches: list) -> dict:
    """Read a GGUF file back with transformers; compare its logits and its tokenizer with the merged model's."""
    import torch

    model, gguf_tokenizer = gguf_export.load_gguf(gguf_file, dtype=torch.float32)
    fidelity = merging.compare(reference, merging.logits_on(model, batches, torch.device("cpu")), batches)
    texts = [tokenizer.decode(b[0], skip_special_tokens=True) for b in batches]
    same_ids = all(tokenizer(t)["input_ids"] == gguf_tokenizer(t)["input_ids"] for t in texts)
    if not same_ids:
        logger.warning("%s: the tokenizer read back from GGUF splits eval text differently", gguf_file.name)
    logger.info("%s read back: max logit diff %.4f, perplexity change %+.3f%% against the merged model",
                gguf_file.name, fidelity.max_logit_diff, 100 * fidelity.perplexity_change)
    return {**fidelity.as_metrics(), "size_mb": round(gguf_file.stat().st_size / 1e6, 2),
            "tokenizer_matches": same_ids}


if __name__ == "__main__":
    run_stage(main)

"""Export step: the deliverables chosen in export.formats.

``safetensors``: the merged model with its tokenizer, record and model card (``model_card``);
``gguf-f16`` / ``gguf-q8_0``: one GGUF file each (``gguf``), read back and compared with the
merged model (``verify``); ``adapter``: the adapter alone, loadable with peft (``adapter``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import data, fidelity
from qlorapipe.errors import UserError
from qlorapipe.export import gguf
from qlorapipe.export.adapter import write_adapter_package
from qlorapipe.export.model_card import render_model_card
from qlorapipe.export.verify import verify_gguf
from qlorapipe.outputs import atomic_dir, read_json, write_json
from qlorapipe.params import ExportParams
from qlorapipe.records import ADAPTER_RECORD, read_adapter_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """What the export step reads."""

    merged: Path  # the merged model (models/merged)
    adapter: Path  # the adapter (models/adapter)
    data: Path  # the prepared data: GGUF files are verified on its eval split
    data_report: Path  # metrics of the earlier stages, for the model card
    train_metrics: Path
    eval_metrics: Path
    merge_metrics: Path


def run(params: ExportParams, inputs: Inputs, out_dir: Path, metrics_path: Path) -> dict:
    """Write every format in ``params.formats`` into ``out_dir`` (replaced only on success).

    Args:
        params: the export section.
        inputs: the paths read.
        out_dir: the export directory (models/export).
        metrics_path: where the GGUF read-back fidelity goes (JSON).

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, or a model or tokenizer a format cannot take.
    """
    for path in (inputs.merged / "config.json", inputs.data_report, inputs.train_metrics, inputs.eval_metrics,
                 inputs.merge_metrics):
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro` to produce it")
    eval_set = data.load_split(inputs.data, data.EVAL_SPLIT)
    record = read_adapter_record(inputs.merged)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = record.base_model.trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(inputs.merged, trust_remote_code=trust)  # keeps the saved dtype
    tokenizer = AutoTokenizer.from_pretrained(inputs.merged, trust_remote_code=trust)
    metrics = {"train": read_json(inputs.train_metrics), "eval": read_json(inputs.eval_metrics),
               "merge": read_json(inputs.merge_metrics)}
    export_metrics = {"formats": params.formats}
    with atomic_dir(out_dir) as out:
        if "safetensors" in params.formats:
            model.save_pretrained(out, safe_serialization=True, max_shard_size=params.max_shard_size)
            tokenizer.save_pretrained(out)
            (out / ADAPTER_RECORD).write_text((inputs.merged / ADAPTER_RECORD).read_text())
            (out / "README.md").write_text(render_model_card(record, metrics, read_json(inputs.data_report),
                                                             out_dir))
        gguf_types = [f.removeprefix("gguf-") for f in params.formats if f.startswith("gguf-")]
        if gguf_types:
            # The reference is the merged model in float32, what the GGUF files were written from.
            reference_model = model.float().eval()
            batches = fidelity.eval_batches(eval_set, batch_size=4, n_batches=params.verify_batches)
            reference = fidelity.logits_on(reference_model, batches, torch.device("cpu"))
            (out / "gguf").mkdir()
            for file_type in gguf_types:
                gguf_file = out / "gguf" / f"model-{file_type}.gguf"
                gguf.write_gguf(reference_model, inputs.merged, gguf_file, file_type)
                export_metrics[f"gguf_{file_type}"] = verify_gguf(gguf_file, tokenizer, reference, batches)
        if "adapter" in params.formats:
            write_adapter_package(inputs.adapter, read_adapter_record(inputs.adapter), tokenizer, out / "adapter",
                                  out_dir / "adapter")
    write_json(metrics_path, export_metrics)
    logger.info("Exported %s (%s) to %s", record.base_model.repo_id, ", ".join(params.formats), out_dir)
    return export_metrics

"""Export step: the deliverables chosen in export.formats.

``safetensors``: the merged model with its tokenizer, record and model card (``model_card``);
``gguf-f16``: one GGUF file (``gguf``); ``gguf-q8_0`` / ``gguf-q5_k_m`` / ``gguf-q4_k_m`` /
``gguf-q4_0``: quantized from the f16 file by llama.cpp (``llamacpp``). ``onnx-fp32`` / ``onnx-int8`` /
``onnx-int4``: an ONNX Runtime GenAI folder each, built by onnxruntime-genai's model builder
(``onnxgenai``). Every GGUF file and ONNX model is run in its own runtime and measured against the
trained model, and gated (``gate``). ``adapter``: the adapter alone, loadable with peft (``adapter``).
"""

from __future__ import annotations

import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import data, fidelity, greedy, memory, modeling
from qlorapipe.clock import PhaseClock
from qlorapipe.errors import UserError
from qlorapipe.export import gguf, llamacpp, onnxgenai
from qlorapipe.export.adapter import write_adapter_package
from qlorapipe.export.model_card import render_model_card
from qlorapipe.export.modelfile import write_modelfile
from qlorapipe.outputs import atomic_dir, read_json, write_json
from qlorapipe.params import ExportParams
from qlorapipe.records import ADAPTER_RECORD, read_adapter_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """What the export step reads."""

    merged: Path  # the merged model (models/merged)
    base: Path  # the base model (models/base): base + adapter is what GGUF continuations are compared with
    adapter: Path  # the adapter (models/adapter)
    data: Path  # the prepared data: GGUF files are verified on its eval split
    card: Path  # what the model card quotes of the earlier stages' metrics (the card stage's output)


def run(params: ExportParams, inputs: Inputs, out_dir: Path, metrics_path: Path, budget_gb: float | None = None) -> dict:
    """Write every format in ``params.formats`` into ``out_dir`` (replaced only on success).

    Args:
        params: the export section.
        inputs: the paths read.
        out_dir: the export directory (models/export).
        metrics_path: where the GGUF read-back fidelity goes (JSON).
        budget_gb: acceleration.memory_budget_gb: on a GPU, the float32 reference and base + adapter stay within it.

    Returns:
        The metrics written.

    Raises:
        UserError: a missing input, or a model or tokenizer a format cannot take.
    """
    for path in (inputs.merged / "config.json", inputs.card):
        if not path.is_file():
            raise UserError(f"{path} not found; run `dvc repro` to produce it")
    eval_set = data.load_split(inputs.data, data.EVAL_SPLIT)
    record = read_adapter_record(inputs.merged)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = record.base_model.trust_remote_code
    device = modeling.pick_device()
    budget = memory.budget_bytes(budget_gb, device)
    gguf_types = [f.removeprefix("gguf-") for f in params.formats if f.startswith("gguf-")]
    onnx_types = [f.removeprefix("onnx-") for f in params.formats if f.startswith("onnx-")]
    if onnx_types:
        onnxgenai.require()
        onnxgenai.check_builder_options(params.onnx_builder_options, onnx_types)
    if gguf_types:
        llamacpp.require()  # refuse now, not after writing files
    if gguf_types or onnx_types:  # their references: base + adapter's continuations
        memory.check_quantized_fits("export", inputs.base, read_adapter_record(inputs.adapter).quantization, 1,
                                    max(len(eval_set[0]["input_ids"]), 64), budget, budget_gb, trust)
    memory.reset_peak(device)
    clock = PhaseClock("export")
    model = AutoModelForCausalLM.from_pretrained(inputs.merged, trust_remote_code=trust)  # keeps the saved dtype
    tokenizer = AutoTokenizer.from_pretrained(inputs.merged, trust_remote_code=trust)
    clock.lap("load")
    facts = read_json(inputs.card)
    export_metrics = {"formats": params.formats}
    with atomic_dir(out_dir) as out:
        # On a GPU the files are written (and quantized by llama.cpp) on the CPU while the GPU computes the
        # references; on a CPU each is made when its turn comes (``memory.write_beside_compute``).
        beside = memory.write_beside_compute(device)
        saver, writer = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
        try:
            saved = None
            if "safetensors" in params.formats:
                saved = saver.submit(_save_safetensors, model, tokenizer, inputs, record, facts, params, out, out_dir)
                if not beside:
                    saved.result()
                    clock.lap("safetensors")
            references = None
            if gguf_types:
                found, references = _gguf_files(params, inputs, model, tokenizer, eval_set, gguf_types, device,
                                                budget, trust, out, writer if beside else None, clock)
                export_metrics.update(found)
            if onnx_types:
                references = references or _references(params, inputs, model, tokenizer, eval_set, device, budget,
                                                        trust, in_place=True, clock=clock)
                if saved is not None:
                    saved.result()  # the safetensors writer holds the model until it is written
                del model  # the builder loads the merged model itself, and ONNX Runtime its own copy
                gc.collect()
                export_metrics.update(_onnx_models(params, inputs, tokenizer, onnx_types, references, out, clock))
            if saved is not None and beside:
                saved.result()
                clock.lap("safetensors")
        finally:
            for pool in (saver, writer):
                pool.shutdown(cancel_futures=True)  # a stage that stops waits for the file being written
        if "adapter" in params.formats:
            write_adapter_package(inputs.adapter, read_adapter_record(inputs.adapter), tokenizer, out / "adapter",
                                  out_dir / "adapter")
            clock.lap("adapter")
    export_metrics["seconds"] = clock.seconds
    export_metrics["memory"] = memory.peak_metrics(device, budget)
    llama_gb = [found["gpu_gb"] for key, found in export_metrics.items() if key.startswith("gguf_")]
    if device.type == "cuda" and llama_gb:
        export_metrics["memory"]["peak_gpu_llama_cpp_gb"] = max(llama_gb)  # llama.cpp's own buffers, beside torch's
    write_json(metrics_path, export_metrics)
    logger.info("Exported %s (%s) to %s", record.base_model.repo_id, ", ".join(params.formats), out_dir)
    return export_metrics


def _save_safetensors(model, tokenizer, inputs: Inputs, record, facts: dict, params: ExportParams, out: Path,
                      out_dir: Path) -> None:
    """The merged model in safetensors shards with its tokenizer, record and model card."""
    model.save_pretrained(out, safe_serialization=True, max_shard_size=params.max_shard_size)
    tokenizer.save_pretrained(out)
    (out / ADAPTER_RECORD).write_text((inputs.merged / ADAPTER_RECORD).read_text())
    (out / "README.md").write_text(render_model_card(record, facts, out_dir))


@dataclass(frozen=True)
class References:
    """What every GGUF file and ONNX model is measured against."""

    batches: list  # held-out rows
    logits: list  # the merged model's float32 logits on them
    scored: list  # where they are compared: the positions whose next token is a training target
    prompts: list[list[int]]  # held-out prompts
    continuations: list  # base + adapter's greedy continuations of them (llamacpp.Continuation)


def _references(params: ExportParams, inputs: Inputs, model, tokenizer, eval_set, device, budget: float | None,
                trust: bool, in_place: bool, clock: PhaseClock) -> References:
    """The merged model's logits on held-out rows, and base + adapter's continuations of held-out prompts."""
    batches = fidelity.eval_batches(eval_set, batch_size=4, n_batches=params.verify_batches)
    logits = _reference_logits(model, inputs.merged, batches, device, budget, trust, in_place=in_place)
    clock.lap("reference_logits")
    prompts = llamacpp.held_out_prompts(eval_set, params.parity_prompts)
    continuations = _trained_continuations(inputs, prompts, params.parity_tokens, tokenizer)
    memory.release(device)  # the GPU is llama.cpp's now
    clock.lap("reference_continuations")
    scored = fidelity.scored_positions(eval_set, batch_size=4, n_batches=params.verify_batches)
    return References(batches, logits, scored, prompts, continuations)


def _onnx_models(params: ExportParams, inputs: Inputs, tokenizer, onnx_types: list[str], references: References,
                 out: Path, clock: PhaseClock) -> dict:
    """Build, check and gate every ONNX Runtime GenAI folder; the metrics of each."""
    found_by_type = {}
    for precision in onnx_types:
        folder = out / "onnx" / precision
        folder.parent.mkdir(exist_ok=True)
        onnxgenai.build(inputs.merged, folder, precision, params.onnx_builder_options.get(precision))
        clock.lap(f"build_onnx_{precision}")
        found = onnxgenai.check_model(folder, tokenizer, references.logits, references.batches, references.prompts,
                                      references.continuations, params.parity_tokens, scored=references.scored)
        clock.lap(f"check_onnx_{precision}")
        gate(params, f"onnx-{precision}", found, runtime="ONNX Runtime")
        found_by_type[f"onnx_{precision}"] = found
    return found_by_type


def _gguf_files(params: ExportParams, inputs: Inputs, model, tokenizer, eval_set, gguf_types: list[str], device,
                budget: float | None, trust: bool, out: Path, writer, clock: PhaseClock) -> tuple[dict, References]:
    """Write, check and gate every GGUF file; the metrics of each, and what they were measured against.

    ``writer`` (an executor, or None) writes the f16 file and quantizes the others from it while the GPU
    computes the references; write_<type> is then the wait for that file. Without it each file is made
    in its turn, after the references: on a CPU those upcast ``model`` in place, and the files are
    written from the same values.
    """
    (out / "gguf").mkdir()
    order = _writing_order(gguf_types)
    path = {t: out / "gguf" / f"model-{t}.gguf" for t in order}
    pending = {}
    cores = os.cpu_count() or 2
    # Half the cores for the quantizer: the references' and the checks' CPU work runs beside it.
    quantizer_threads = max(1, cores // 2)
    if writer is not None:
        for file_type in order:
            if file_type in llamacpp.QUANTIZED_TYPES:
                pending[file_type] = writer.submit(llamacpp.quantize, path["f16"], path[file_type], file_type,
                                                   quantizer_threads)
            else:
                pending[file_type] = writer.submit(gguf.write_gguf, model, inputs.merged, path[file_type],
                                                   file_type)
    references = _references(params, inputs, model, tokenizer, eval_set, device, budget, trust,
                             in_place=writer is None, clock=clock)
    found_by_type = {}
    for file_type in order:
        if file_type in pending:
            pending.pop(file_type).result()
        elif file_type in llamacpp.QUANTIZED_TYPES:
            llamacpp.quantize(path["f16"], path[file_type], file_type)
        else:
            gguf.write_gguf(model, inputs.merged, path[file_type], file_type)
        clock.lap(f"write_{file_type}")
        if file_type not in gguf_types:
            continue
        found = llamacpp.check_file(path[file_type], tokenizer, references.logits, references.batches,
                                    references.prompts, references.continuations, params.parity_tokens, device, budget,
                                    threads_beside(pending, cores, quantizer_threads), scored=references.scored)
        clock.lap(f"check_{file_type}")
        gate(params, f"gguf-{file_type}", found)
        found["ollama_modelfile"] = _modelfile(path[file_type].with_suffix(".Modelfile"), path[file_type].name,
                                               tokenizer, inputs.merged)
        found_by_type[f"gguf_{file_type}"] = found
    if "f16" not in gguf_types:
        path["f16"].unlink(missing_ok=True)  # written only to quantize from
    return found_by_type, references


def threads_beside(pending: dict, cores: int, quantizer_threads: int) -> int | None:
    """The cores a llama.cpp check computes on: those the quantizer leaves while a file is still being quantized
    beside it, all of them (None) otherwise. llama.cpp's threads wait for each other at every operation, so
    sharing cores with the quantizer slows them several times (docs/benchmarks.md, 7B export)."""
    busy = any(not future.done() for future in pending.values())
    return max(1, cores - quantizer_threads) if busy else None


def _reference_logits(model, merged: Path, batches: list, device, budget: float | None, trust: bool,
                      in_place: bool = True) -> list:
    """The merged model's float32 logits on ``batches``, what each GGUF file is measured against.

    On the CPU ``model`` itself is upcast (exactly; the GGUF files are then written from the same
    values), or, when ``in_place`` is False (files being written from it), a float32 copy. On a GPU,
    when the 16-bit model fits the memory budget with one row's float32 logits, a copy of it on the
    GPU computes them one block in float32 at a time (``fidelity.float32_logits``); otherwise a float32
    copy does, with as many blocks on the GPU as the budget holds and the rest streamed from the CPU,
    as many rows at once as stream the fewest bytes (``memory.rows_at_once``).
    """
    import torch

    if device.type != "cuda":
        return fidelity.logits_on(model.float() if in_place else memory.load_on_cpu(merged, torch.float32, trust),
                                  batches, device)
    length = max(b.shape[1] for b in batches)
    rows = _resident_rows(model, length, max(b.shape[0] for b in batches), budget, device)
    if rows:
        from transformers import AutoModelForCausalLM

        resident = AutoModelForCausalLM.from_pretrained(merged, dtype=model.dtype, device_map={"": device},
                                                        trust_remote_code=trust)
        try:
            return fidelity.float32_logits(resident, batches, device, rows_at_once=rows)
        finally:
            del resident
            memory.release(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    row_bytes = memory.logits_bytes(1, length, vocab, 4 + 4)
    room = budget - memory.SLACK_BYTES - torch.cuda.memory_allocated(device)
    rows = memory.rows_at_once(memory.weight_bytes(model, bytes_16bit=4), memory.largest_block_bytes(model, 4),
                               room, row_bytes, max(b.shape[0] for b in batches))
    reserve = rows * row_bytes + memory.SLACK_BYTES
    copy, _ = memory.place(memory.load_on_cpu(merged, torch.float32, trust), device, budget, reserve)
    try:
        return fidelity.logits_on(copy, batches, device, rows_at_once=rows)
    finally:
        # accelerate's hooks on the streamed modules refer back to them (a cycle): only a collection frees the
        # blocks on the GPU, before base + adapter load for the continuations (about 3 GB more at 7B without it)
        del copy
        memory.release(device)


def _resident_rows(model, length: int, rows: int, budget: float | None, device) -> int:
    """How many rows at once ``fidelity.float32_logits`` runs with a copy of ``model`` on the GPU within the
    budget (0: the copy and one row do not fit, or the family is not one it computes)."""
    import torch

    if budget is None or not fidelity.computes_plain_logits(model):
        return 0
    fixed, per_row = fidelity.float32_working_bytes(model, length)
    weights = memory.weight_bytes(model, bytes_16bit=next(model.parameters()).element_size())
    room = budget - memory.SLACK_BYTES - torch.cuda.memory_allocated(device) - weights - fixed
    return max(0, min(int(room // per_row), rows))


def _modelfile(path: Path, gguf_name: str, tokenizer, merged: Path) -> bool:
    """Write the Ollama Modelfile for ``gguf_name``; False (and a warning) when its chat template has no
    Go template counterpart, which is no reason to withhold the GGUF file."""
    config = merged / "generation_config.json"
    sampling = read_json(config) if config.is_file() else None
    try:
        write_modelfile(path, gguf_name, tokenizer, sampling)
    except UserError as error:
        logger.warning("No Ollama Modelfile for %s: %s", gguf_name, error)
        return False
    return True


def _writing_order(gguf_types: list[str]) -> list[str]:
    """The GGUF files to write, f16 first when a llama.cpp quantization reads it."""
    quantized = [t for t in gguf_types if t in llamacpp.QUANTIZED_TYPES]
    written = [t for t in gguf_types if t not in llamacpp.QUANTIZED_TYPES]
    if quantized and "f16" not in written:
        written.insert(0, "f16")
    return sorted(written, key=lambda t: t != "f16") + quantized


def _trained_continuations(inputs: Inputs, prompts: list[list[int]], max_new_tokens: int, tokenizer) -> list:
    """Greedy continuations of ``prompts`` by base + adapter as trained (quantized as the adapter records)."""
    from qlorapipe.inference import load_with_adapters, pad_token_id
    from qlorapipe.modeling import pick_device

    device = pick_device()
    model = load_with_adapters(inputs.base, {"trained": inputs.adapter}, device).model
    return llamacpp.reference_continuations(model, prompts, max_new_tokens, greedy.stop_token_ids(model, tokenizer),
                                            pad_token_id(tokenizer), device)


def gate(params: ExportParams, file_format: str, found: dict, runtime: str = "llama.cpp") -> None:
    """Refuse a GGUF file (ONNX model) that drifts from the trained model in ``runtime`` beyond the export
    section's gates.

    Raises:
        UserError: naming the file's format, the figure, and the gate it breaks.
    """
    problems = []
    limit = float(params.max_perplexity_change[file_format])
    if not found["perplexity_change"] <= limit:  # NaN (overflowed logits) fails too
        problems.append(f"perplexity change {found['perplexity_change']:+.4f} > export.max_perplexity_change"
                        f".{file_format} {limit}")
    floor = float(params.min_token_agreement[file_format])
    if not found["token_agreement"] >= floor:
        problems.append(f"greedy agreement {found['token_agreement']:.3f} < export.min_token_agreement"
                        f".{file_format} {floor}")
    if found["stop_mismatches"] > params.max_stop_mismatches:
        problems.append(f"{found['stop_mismatches']} prompt(s) stop where the trained model does not "
                        f"(export.max_stop_mismatches {params.max_stop_mismatches})")
    if not found["tokenizer_matches"]:
        problems.append(f"{runtime} splits held-out text into other token ids than the tokenizer")
    if found["chat_template_matches"] is False:
        problems.append(f"{runtime} renders the chat template differently from transformers")
    if problems:
        raise UserError(f"{file_format} in {runtime} drifts from the trained model: " + "; ".join(problems)
                        + f" (to export it anyway, relax the gate named; or leave {file_format} out of export.formats)")

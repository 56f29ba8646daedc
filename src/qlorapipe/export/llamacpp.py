"""The GGUF files in llama.cpp itself: k-quants from its own quantizer, and parity with the trained model.

llama.cpp comes from the llama-cpp-python package, built from its pinned source at setup (see
the README); its bindings expose llama.cpp's C API. Every call runs in a process of its own
(``llama_worker``), which never imports torch and loads llama.cpp before numpy (a CUDA build crashed
loading any model in a process that had imported numpy first, seen on an H200); a crash must not take
the stage down unexplained.
``quantize`` calls ``llama_model_quantize``, the function the ``llama-quantize`` tool runs.
``check_file`` loads a file the way users run it (on a GPU, as many blocks as the memory budget
holds) and measures, against the model that was trained:

- logits on held-out rows (llama.cpp's own forward pass) against the merged model they were
  written from: largest and mean difference, perplexity and its change;
- greedy continuations of held-out prompts against base + adapter as trained: the share of
  tokens that agree (common prefix over the longer of the two), and whether and where each
  stops, on llama.cpp's end-of-generation tokens as the file carries them;
- the tokenizer (ids of held-out text) and the chat template (a probe conversation rendered
  by llama.cpp's Jinja formatter from the file's metadata) against the transformers ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from qlorapipe import fidelity
from qlorapipe.data import IGNORE_INDEX
from qlorapipe.errors import UserError

logger = logging.getLogger(__name__)

# export.formats gguf-<type> quantized by llama.cpp from the f16 file -> llama_ftype.
# llama_ftype values. q8_0 too: llama.cpp's quantizer writes the same bytes as the Python writer's
# q8_0 (gguf.write_gguf, checked on the offline default), on every core instead of one.
QUANTIZED_TYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q4_0": 2}
# llama.cpp's log line for each buffer it reserves, e.g. "load_tensors:  CUDA0 model buffer size = 5983.71 MiB".
BUFFER_LINE = re.compile(r"^\S+:\s+(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([0-9.]+)\s*MiB",
                         re.MULTILINE)
PROBE_CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a list comprehension?"},
    {"role": "assistant", "content": "A compact way to build a list."},
    {"role": "user", "content": "Show one."},
]


def llama_cpp_module():
    """The llama_cpp bindings.

    Raises:
        UserError: llama-cpp-python is not installed.
    """
    try:
        import llama_cpp
    except ImportError as error:
        raise UserError(f"GGUF export needs llama.cpp (the llama-cpp-python package): {error}; run `make install`, "
                        "which builds it (needs a C++ compiler and CMake)") from None
    return llama_cpp


def require() -> None:
    """Refuse early when llama-cpp-python is missing, without loading it here (``llama_worker`` does).

    Raises:
        UserError: saying how to install it.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        llama_cpp_module()


def quantize(f16_file: Path, out_file: Path, file_type: str, threads: int | None = None) -> None:
    """Quantize ``f16_file`` to ``file_type`` (a key of QUANTIZED_TYPES) with llama.cpp's quantizer, on
    ``threads`` cores (None: all of them).

    Tensors whose rows do not divide into the type's blocks (k-quants: 256) fall back to a type
    that fits, as llama-quantize does.

    Raises:
        UserError: llama.cpp refused the file.
    """
    # On the CPU alone: it may run beside a check that holds the GPU, which should see no other CUDA context.
    args = ["quantize", str(f16_file), str(out_file), file_type, *([str(threads)] if threads else [])]
    with _worker(args, f16_file, hide_gpus=True) as process:
        fallbacks = _json_line(process.stdout)["fallbacks"]
    logger.info("Quantized %s -> %s (%.1f MB) with llama.cpp%s", Path(f16_file).name, Path(out_file).name,
                Path(out_file).stat().st_size / 1e6,
                f"; {fallbacks} tensors whose rows do not divide into its blocks took a near type" if fallbacks else "")


@contextlib.contextmanager
def _worker(args: list[str], gguf_file: Path, stdin: bytes | None = None, hide_gpus: bool = False):
    """Run ``llama_worker`` with ``args`` and ``stdin`` (with no GPU visible when ``hide_gpus``); yields the
    process, its stdout a binary pipe.

    Raises:
        UserError: the worker's one-line error, or that llama.cpp crashed (its last log line).
    """
    import os
    import subprocess
    import sys
    import tempfile

    require()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if hide_gpus else None
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "-m", "qlorapipe.export.llama_worker", *args],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env)
        try:
            process.stdin.write(stdin or b"")
            process.stdin.close()
            yield process
        except (EOFError, BrokenPipeError):  # the worker stopped early (even before reading its input): it said why
            process.wait()
            _raise_reported(process.returncode or 1, errors, gguf_file)
        finally:
            process.stdout.close()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.returncode != 0:
            _raise_reported(process.returncode, errors, gguf_file)


class Crashed(UserError):
    """llama.cpp's process stopped without saying why (a crash)."""


def _raise_reported(returncode: int, errors, gguf_file: Path) -> NoReturn:
    """Raise the worker's one-line error, or say that llama.cpp stopped (a crash) with its last log line."""
    errors.seek(0)
    lines = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
    reported = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if reported:
        raise UserError(reported[-1])
    last = lines[-1].strip() if lines else "no output"
    raise Crashed(f"llama.cpp stopped with exit status {returncode} on {gguf_file} ({last}); drop its format "
                  "from export.formats and report the model's architecture")


def buffers_mb(log: str) -> dict[str, float]:
    """MiB of the buffers llama.cpp reserved while loading, per place (``CPU``, ``CPU_Mapped``, ``CUDA0``,
    ``CUDA_Host``...), from its log: the model's weights, the KV cache, the compute and output buffers."""
    largest: dict[tuple[str, str], float] = {}
    for place, kind, mib in BUFFER_LINE.findall(log):
        largest[place, kind] = max(largest.get((place, kind), 0.0), float(mib))  # a buffer logged again counts once
    places: dict[str, float] = {}
    for (place, _), mib in largest.items():
        places[place] = round(places.get(place, 0.0) + mib, 2)
    return places


def device_mb(buffers: dict[str, float]) -> float:
    """The MiB of ``buffers_mb`` that live on a GPU: every place but the CPU's and the pinned host memory."""
    return sum(mib for place, mib in buffers.items() if not place.startswith("CPU") and not place.endswith("_Host"))


def held_out_prompts(eval_set, n_prompts: int, default_length: int = 32) -> list[list[int]]:
    """Prompts from the first ``n_prompts`` held-out rows: each row's first example up to its first
    trained token (the rendered prompt of instruction, chat and completion data), or, where every
    token is trained (text), its first ``default_length`` tokens (at most half the example)."""
    prompts = []
    for index in range(min(n_prompts, len(eval_set))):
        row = eval_set[index]
        ids, labels, positions = (row[c].tolist() for c in ("input_ids", "labels", "position_ids"))
        end = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
        first = next((i for i in range(1, end) if labels[i] != IGNORE_INDEX), end)
        trained_all = all(label != IGNORE_INDEX for label in labels[1:end])
        length = min(default_length, end // 2) if trained_all else first
        if length >= 1:
            prompts.append(ids[:length])
    return prompts


@dataclass(frozen=True)
class Continuation:
    """A greedy continuation: its tokens (the stop token included) and where it stopped (None: it did not)."""

    tokens: list[int]
    stop: int | None


def agreement(reference: Continuation, candidate: Continuation) -> float:
    """Common prefix of the two continuations over the longer one (1.0: the same tokens and stop)."""
    common = 0
    for ref, cand in zip(reference.tokens, candidate.tokens):
        if ref != cand:
            break
        common += 1
    return common / max(len(reference.tokens), len(candidate.tokens), 1)


def stop_mismatch(reference: Continuation, candidate: Continuation) -> bool:
    """Whether one of the two stops where the other, with the same tokens up to there, does not: an end of
    generation the file misses or adds. Continuations that part before either stops differ in their tokens
    already (``agreement`` counts that); where each then stops says nothing of the file's ends."""
    if reference.stop == candidate.stop:
        return False
    first = min(stop for stop in (reference.stop, candidate.stop) if stop is not None)
    return reference.tokens[:first] == candidate.tokens[:first]


def reference_continuations(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                            pad_id: int | None, device) -> list[Continuation]:
    """Greedy continuations of ``prompts`` by a transformers model (base + adapter as trained), in one
    left-padded batch."""
    from qlorapipe import greedy

    return [continuation(tokens, stop_ids.__contains__)
            for tokens in greedy.generate(model, prompts, max_new_tokens, max(len(prompts), 1), device, stop_ids, pad_id)]


def ended_at(reference: Continuation, end_tokens: set[int]) -> Continuation:
    """``reference`` as a runtime that also ends generation on ``end_tokens`` reads it.

    llama.cpp ends generation on more tokens than the model's EOS: also <|im_end|>, <|eot_id|> and the like
    when the vocabulary has them. A base model trained on chat data answers "...<|im_end|>\n<|endoftext|>"; its
    continuation, read as the file's users read it, ends at <|im_end|>, and is compared so.
    """
    for index, token in enumerate(reference.tokens[: reference.stop]):
        if token in end_tokens:
            return Continuation(reference.tokens[: index + 1], index)
    return reference


def continuation(tokens: list[int], is_stop) -> Continuation:
    for index, token in enumerate(tokens):
        if is_stop(token):
            return Continuation(tokens[: index + 1], index)
    return Continuation(tokens, None)


def check_file(gguf_file: Path, tokenizer, reference_logits: list, batches: list, prompts: list[list[int]],
               reference: list[Continuation], max_new_tokens: int, device=None, budget: float | None = None,
               threads: int | None = None, scored: list | None = None) -> dict:
    """Run ``gguf_file`` in llama.cpp and measure it against the trained model (see the module docstring).
    On a GPU (``device``) with a CUDA build of llama.cpp, as many blocks as ``budget`` holds beside what
    torch keeps run there; the rest on ``threads`` cores (None: all of them). Logits are compared at the
    ``scored`` positions of each batch (``fidelity.scored_positions``; None: every position).

    Returns:
        The metrics for metrics/export.json.
    """
    import torch

    n_ctx = max([len(b[0]) for b in batches] + [len(p) + max_new_tokens for p in prompts]) + 8
    on_gpu = device is not None and device.type == "cuda" and budget is not None
    texts = [tokenizer.decode(b[0], skip_special_tokens=True) for b in batches]
    expected = [tokenizer(text)["input_ids"] for text in texts]
    spec = {"file": str(gguf_file), "n_ctx": n_ctx, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "free_bytes": budget - torch.cuda.memory_reserved(device) if on_gpu else None, "threads": threads,
            "rows": [row for batch in batches for row in batch.tolist()],
            "texts": [[t, ids, bool(ids) and ids[0] == tokenizer.bos_token_id] for t, ids in zip(texts, expected)],
            "chat": {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
            if getattr(tokenizer, "chat_template", None) else None,
            "probe_tokens": sorted({t for r in reference for t in r.tokens})}
    try:
        header, result, found = _run_check(spec, gguf_file, batches, reference_logits, scored)
    except Crashed as crash:
        if spec["free_bytes"] is None:
            raise
        # A CUDA build of llama.cpp that crashes with blocks on the GPU may still run the file on the CPU.
        logger.warning("%s; running %s on the CPU instead", crash, Path(gguf_file).name)
        header, result, found = _run_check({**spec, "free_bytes": None}, gguf_file, batches, reference_logits,
                                           scored)
    continuations = [Continuation(tokens, stop) for tokens, stop in found["continuations"]]
    reference = [ended_at(r, set(found["eog"])) for r in reference]
    chat = found["chat_rendering"]
    metrics = {
        **result.as_metrics(),
        "size_mb": round(Path(gguf_file).stat().st_size / 1e6, 2),
        "token_agreement": round(sum(agreement(r, c) for r, c in zip(reference, continuations))
                                 / max(len(prompts), 1), 4),
        "stops_trained": sum(r.stop is not None for r in reference),
        "stops_gguf": sum(c.stop is not None for c in continuations),
        "stop_mismatches": sum(stop_mismatch(r, c) for r, c in zip(reference, continuations)),
        "tokenizer_matches": found["tokenizer_matches"],
        "chat_template_matches": None if spec["chat"] is None else chat == tokenizer.apply_chat_template(
            PROBE_CONVERSATION, tokenize=False, add_generation_prompt=True),
        "gpu_layers": header["gpu_layers"],
        "n_ubatch": header["n_ubatch"],
        "gpu_gb": round(device_mb(header["buffers_mb"]) * 2**20 / 1e9, 3),
        "buffers_mb": header["buffers_mb"],
        "seconds": found["seconds"],
    }
    where = f" ({header['gpu_layers']} layers on the GPU)" if header["gpu_layers"] else ""
    logger.info("%s in llama.cpp%s: perplexity change %+.3f%% against the merged model, "
                "greedy agreement %.0f%% with base + adapter, %d stop mismatch(es)", Path(gguf_file).name, where,
                100 * result.perplexity_change, 100 * metrics["token_agreement"], metrics["stop_mismatches"])
    return metrics


def _run_check(spec: dict, gguf_file: Path, batches: list, reference_logits: list, scored: list | None) -> tuple:
    """One run of ``llama_worker check``: its header, its logits compared with ``reference_logits`` (a Fidelity),
    and its closing line.

    A thread drains the worker's pipe batch by batch while the batch before is compared, so the comparison
    (CPU) runs while llama.cpp computes the next batch, and only a few batches of logits are held at once.
    """
    import queue
    import threading

    import torch

    comparison = fidelity.Comparison()
    with _worker(["check"], gguf_file, json.dumps(spec).encode()) as process:
        header = _json_line(process.stdout)
        arrived: queue.Queue = queue.Queue(maxsize=2)

        def drain() -> None:
            try:
                for batch in batches:
                    # Memory touched by every core first: the pipe's copy into it does not fault page by page.
                    block = torch.zeros((*batch.shape, header["vocab"]), dtype=torch.float32)
                    _read_into(process.stdout, memoryview(block.numpy()).cast("B"))
                    arrived.put(block)
            except BaseException as exc:  # noqa: BLE001 - raised again by the comparing thread
                arrived.put(exc)

        reader = threading.Thread(target=drain, name="llama-logits", daemon=True)
        reader.start()
        for reference, batch, mask in zip(reference_logits, batches, fidelity.each_batch(scored, batches)):
            block = arrived.get()
            if isinstance(block, BaseException):
                raise block
            comparison.add(reference, block, batch, mask)
            del block
        reader.join()
        found = _json_line(process.stdout)
    return header, comparison.result(), found


def _json_line(stream) -> dict:
    """The next JSON line of ``stream``.

    Raises:
        EOFError: the stream ended (the worker stopped; its error is raised instead).
    """
    line = stream.readline()
    if not line.strip():
        raise EOFError("no line")
    return json.loads(line)


def _read_into(stream, view: memoryview) -> None:
    """Fill ``view`` with exactly its size in bytes from ``stream``.

    Raises:
        EOFError: the stream ended first (the worker stopped; its error is raised instead).
    """
    done, size = 0, len(view)
    while done < size:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError(f"{done} of {size} bytes")
        done += got

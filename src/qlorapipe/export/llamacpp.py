"""The GGUF files in llama.cpp itself: k-quants from its own quantizer, and parity with the trained model.

llama.cpp comes from the llama-cpp-python package, built from its pinned source at setup (see
the README); its bindings expose llama.cpp's C API. ``quantize`` calls ``llama_model_quantize``,
the function the ``llama-quantize`` tool runs. ``check_file`` loads a file the way users run it
and measures, against the model that was trained:

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
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qlorapipe import fidelity
from qlorapipe.data import IGNORE_INDEX
from qlorapipe.errors import UserError

logger = logging.getLogger(__name__)

# export.formats gguf-<type> quantized by llama.cpp from the f16 file -> llama_ftype.
# llama_ftype values. q8_0 too: llama.cpp's quantizer writes the same bytes as the Python writer's
# q8_0 (gguf.write_gguf, checked on the offline default), on every core instead of one.
QUANTIZED_TYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q4_0": 2}
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


def quantize(f16_file: Path, out_file: Path, file_type: str) -> None:
    """Quantize ``f16_file`` to ``file_type`` (a key of QUANTIZED_TYPES) with llama.cpp's quantizer.

    Tensors whose rows do not divide into the type's blocks (k-quants: 256) fall back to a type
    that fits, as llama-quantize does.

    Raises:
        UserError: llama.cpp refused the file.
    """
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED_TYPES[file_type]
    params.nthread = os.cpu_count() or 1
    with _native_stderr() as captured:  # a line per tensor and per fallback, written by the C++ code
        status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(),
                                                ctypes.byref(params))
    log = captured[0]
    if status != 0 or not Path(out_file).is_file():
        last = [line for line in log.splitlines() if line.strip()][-1:] or [f"status {status}"]
        raise UserError(f"export.formats gguf-{file_type}: llama.cpp's quantizer failed on {f16_file} "
                        f"({last[0].strip()}); drop gguf-{file_type} from export.formats")
    fallbacks = log.count("falling back to")
    logger.info("Quantized %s -> %s (%.1f MB) with llama.cpp%s", Path(f16_file).name, Path(out_file).name,
                Path(out_file).stat().st_size / 1e6,
                f"; {fallbacks} tensors whose rows do not divide into its blocks took a near type" if fallbacks else "")


@contextlib.contextmanager
def _native_stderr():
    """Redirect file descriptor 2 (where llama.cpp's C++ code logs) into a temporary file; the list
    yielded holds its text once the block is left."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved, captured = os.dup(2), []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def load(gguf_file: Path, n_ctx: int):
    """Load ``gguf_file`` in llama.cpp on the CPU with logits for every position.

    Raises:
        UserError: llama.cpp refuses the file.
    """
    llama_cpp = llama_cpp_module()
    try:
        return llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=True, n_threads=os.cpu_count() or 1, n_gpu_layers=0, verbose=False)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"llama.cpp refuses to load {gguf_file}: {error}; drop its format from export.formats "
                        "and report the model's architecture") from None


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


def reference_continuations(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                            pad_id: int | None, device) -> list[Continuation]:
    """Greedy continuations of ``prompts`` by a transformers model (base + adapter as trained)."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids) or None,
                                       pad_token_id=pad_id)
            out.append(_continuation(generated[0, len(prompt):].tolist(), stop_ids.__contains__))
    return out


def _continuation(tokens: list[int], is_stop) -> Continuation:
    for index, token in enumerate(tokens):
        if is_stop(token):
            return Continuation(tokens[: index + 1], index)
    return Continuation(tokens, None)


def llama_continuations(llm, prompts: list[list[int]], max_new_tokens: int) -> list[Continuation]:
    """Greedy continuations of ``prompts`` by llama.cpp, stopping on the file's end-of-generation tokens."""
    llama_cpp = llama_cpp_module()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for prompt in prompts:
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(tokens) == max_new_tokens:
                break
        out.append(_continuation(tokens, lambda t: llama_cpp.llama_vocab_is_eog(vocab, t)))
    return out


def llama_logits(llm, batches: list) -> list:
    """llama.cpp's float32 logits for every row of ``batches`` (each row a fresh sequence)."""
    import numpy as np
    import torch

    out = []
    for batch in batches:
        rows = []
        for row in batch.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        out.append(torch.from_numpy(np.stack(rows)))
    return out


def same_chat_rendering(llm, tokenizer) -> bool | None:
    """Whether the file's chat template, rendered by llama.cpp's formatter, gives transformers' text.

    None when the tokenizer has no chat template.
    """
    template = llm.metadata.get("tokenizer.chat_template")
    if not getattr(tokenizer, "chat_template", None):
        return None
    if not template:
        return False
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "")
    rendered = formatter(messages=PROBE_CONVERSATION).prompt
    expected = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    return rendered == expected


def same_tokens(llm, tokenizer, texts: list[str]) -> bool:
    """Whether llama.cpp splits ``texts`` into the ids transformers does (special tokens as the tokenizer adds them)."""
    for text in texts:
        expected = tokenizer(text)["input_ids"]
        adds_bos = bool(expected) and expected[0] == tokenizer.bos_token_id
        if llm.tokenize(text.encode(), add_bos=adds_bos, special=False) != expected:
            return False
    return True


def check_file(gguf_file: Path, tokenizer, reference_logits: list, batches: list, prompts: list[list[int]],
               reference: list[Continuation], max_new_tokens: int) -> dict:
    """Run ``gguf_file`` in llama.cpp and measure it against the trained model (see the module docstring).

    Returns:
        The metrics for metrics/export.json.
    """
    n_ctx = max([len(b[0]) for b in batches] + [len(p) + max_new_tokens for p in prompts]) + 8
    llm = load(gguf_file, n_ctx)
    try:
        result = fidelity.compare(reference_logits, llama_logits(llm, batches), batches)
        continuations = llama_continuations(llm, prompts, max_new_tokens)
        texts = [tokenizer.decode(b[0], skip_special_tokens=True) for b in batches]
        metrics = {
            **result.as_metrics(),
            "size_mb": round(Path(gguf_file).stat().st_size / 1e6, 2),
            "token_agreement": round(sum(agreement(r, c) for r, c in zip(reference, continuations))
                                     / max(len(prompts), 1), 4),
            "stops_trained": sum(r.stop is not None for r in reference),
            "stops_gguf": sum(c.stop is not None for c in continuations),
            "stop_mismatches": sum(r.stop != c.stop for r, c in zip(reference, continuations)),
            "tokenizer_matches": same_tokens(llm, tokenizer, texts),
            "chat_template_matches": same_chat_rendering(llm, tokenizer),
        }
    finally:
        llm.close()
    logger.info("%s in llama.cpp: perplexity change %+.3f%% against the merged model, greedy agreement %.0f%% "
                "with base + adapter, %d stop mismatch(es)", Path(gguf_file).name, 100 * result.perplexity_change,
                100 * metrics["token_agreement"], metrics["stop_mismatches"])
    return metrics

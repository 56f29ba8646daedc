"""The llama.cpp side of the GGUF checks, in a process of its own (no torch is imported here).

A CUDA build of llama.cpp crashed loading any model in a process that had imported numpy before it
(torch does; seen on an H200), and a crash must not take the export stage down unexplained, so the
stage makes every llama.cpp call through this module, which loads llama.cpp first:

    python -m qlorapipe.export.llama_worker check      # a JSON spec on stdin (``llamacpp.check_file``)
    python -m qlorapipe.export.llama_worker quantize F16_FILE OUT_FILE TYPE [THREADS]

``check`` writes to stdout a JSON line (vocabulary, blocks on the GPU, the buffers llama.cpp
reserved as its own log reports them), then every held-out row's float32 logits as raw bytes, row
after row, then a JSON line with the greedy continuations, the tokenizer comparison, the chat
template as llama.cpp renders it and the seconds each part took. ``quantize`` (on THREADS cores,
default all) writes one JSON line. A failure is one line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import time
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.export import llamacpp

# What llama.cpp's own process holds on the GPU beside its weights: the CUDA context and cuBLAS.
CONTEXT_BYTES = 600e6


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # llama.cpp's library loads before numpy: a CUDA build crashed (SIGSEGV, H200) loading any model in a
        # process that had imported numpy first, and ran in one that imported it after.
        llamacpp.llama_cpp_module()
        if argv[:1] == ["check"]:
            check(json.loads(sys.stdin.read()), sys.stdout.buffer)
        elif argv[:1] == ["quantize"] and len(argv) in (4, 5):
            fallbacks = quantize(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]) if len(argv) == 5 else None)
            sys.stdout.write(json.dumps({"fallbacks": fallbacks}) + "\n")
        else:
            raise UserError("usage: python -m qlorapipe.export.llama_worker check|quantize F16 OUT TYPE [THREADS], "
                            f"not {argv}")
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    return 0


def gpu_plan(gguf_file: Path, n_ctx: int, free_bytes: float | None) -> tuple[int, int]:
    """How many of the file's blocks run on the GPU, and the positions llama.cpp computes at once (n_ubatch).

    None on a CPU (``free_bytes`` None) or with a CPU-only llama.cpp, all ``n_ctx`` positions at once. On a
    GPU, as many blocks as fit in ``free_bytes`` beside this process's CUDA context and llama.cpp's buffers
    (``plan_layers``).
    """
    if free_bytes is None or not llamacpp.llama_cpp_module().llama_supports_gpu_offload():
        return 0, n_ctx
    blocks, output, vocab = tensor_bytes(gguf_file)
    return plan_layers(blocks, output, vocab, n_ctx, free_bytes)


# Positions computed at once, tried in turn when the whole file does not fit beside a compute buffer for
# every position of the context.
UBATCHES = (256, 128, 64)


def plan_layers(blocks: list[float], output: float, vocab: int, n_ctx: int, free: float) -> tuple[int, int]:
    """(n_gpu_layers, n_ubatch) for blocks of ``blocks`` bytes and an output layer of ``output`` bytes in
    ``free`` bytes of the GPU.

    llama.cpp's compute buffer holds a row of float32 logits per position computed at once, and the output
    copies them once more: with all ``n_ctx`` positions at once that is 0.6 GB for a 151,936-token vocabulary
    at 512 positions, which can keep the output layer (as large again in f16) on the CPU, where every
    generated token then multiplies it. So when the whole file does not fit beside that buffer, fewer positions
    at once (the largest of ``UBATCHES`` that lets every block and the output layer fit) take the rest of the
    file to the GPU. A file that does not fit whole either way keeps all positions at once: the CPU's share
    computes faster in large batches.
    """
    def fitting(ubatch: int) -> int:
        buffers = 2 * ubatch * vocab * 4 + CONTEXT_BYTES + 400e6
        return layers_within(blocks, output, free - buffers)

    whole = len(blocks) + 1
    layers = fitting(n_ctx)
    if layers < whole:
        for ubatch in UBATCHES:
            if ubatch < n_ctx and fitting(ubatch) == whole:
                return whole, ubatch
    return layers, n_ctx


def check(spec: dict, out) -> None:
    """Run the file of ``spec`` as ``llamacpp.check_file`` describes, writing to the binary stream ``out``."""
    import numpy as np

    gguf_file = Path(spec["file"])
    seconds, started = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name], started = round(now - started, 2), now

    on_gpu, ubatch = gpu_plan(gguf_file, spec["n_ctx"], spec["free_bytes"])
    with llama_log() as log:
        llm = load(gguf_file, spec["n_ctx"], on_gpu, spec.get("threads"), ubatch)
    lap("load")
    try:
        out.write((json.dumps({"vocab": llm.n_vocab(), "gpu_layers": on_gpu, "n_ubatch": ubatch, "buffers_mb": llamacpp.buffers_mb("".join(log))})
                   + "\n").encode())
        sending = 0.0  # of the logits' seconds, those spent handing them to the stage's process
        for row in spec["rows"]:
            llm.reset()
            llm.eval(row)
            handing = time.perf_counter()
            out.write(memoryview(np.ascontiguousarray(llm.scores[: len(row)], dtype=np.float32)).cast("B"))
            sending += time.perf_counter() - handing
        out.flush()
        lap("logits")
        seconds["logits_sent"] = round(sending, 2)
        continuations = llama_continuations(llm, spec["prompts"], spec["max_new_tokens"])
        lap("continuations")
        tokens_match = all(llm.tokenize(text.encode(), add_bos=adds_bos, special=False) == ids
                           for text, ids, adds_bos in spec["texts"])
        chat = spec.get("chat")
        rendered = render_chat(llm, chat["bos"], chat["eos"]) if chat else None
        llama_cpp = llamacpp.llama_cpp_module()
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eog = [t for t in spec.get("probe_tokens", []) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        lap("tokenizer_and_chat")
        out.write((json.dumps({"continuations": [[c.tokens, c.stop] for c in continuations],
                               "tokenizer_matches": tokens_match, "chat_rendering": rendered, "eog": eog,
                               "seconds": seconds}) + "\n").encode())
        out.flush()
    finally:
        llm.close()


@contextlib.contextmanager
def llama_log():
    """Collect what llama.cpp (and ggml) log while the block runs; the list yielded holds the text pieces."""
    llama_cpp = llamacpp.llama_cpp_module()
    pieces: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        pieces.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield pieces
    finally:  # llama-cpp-python's own logger again (its callback object lives in its module)
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize(f16_file: Path, out_file: Path, file_type: str, threads: int | None = None) -> int:
    """Quantize with llama.cpp's quantizer (``llamacpp.quantize`` says how) on ``threads`` cores (None: all);
    returns the tensors that fell back to a near type because their rows do not divide into the type's blocks.

    Raises:
        UserError: llama.cpp refused the file.
    """
    llama_cpp = llamacpp.llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llamacpp.QUANTIZED_TYPES[file_type]
    params.nthread = threads or os.cpu_count() or 1
    with native_stderr() as captured:  # a line per tensor and per fallback, written by the C++ code
        status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(),
                                                ctypes.byref(params))
    log = captured[0]
    if status != 0 or not out_file.is_file():
        last = [line for line in log.splitlines() if line.strip()][-1:] or [f"status {status}"]
        raise UserError(f"export.formats gguf-{file_type}: llama.cpp's quantizer failed on {f16_file} "
                        f"({last[0].strip()}); drop gguf-{file_type} from export.formats")
    return log.count("falling back to")


@contextlib.contextmanager
def native_stderr():
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


def load(gguf_file: Path, n_ctx: int, n_gpu_layers: int = 0, threads: int | None = None, n_ubatch: int | None = None):
    """Load ``gguf_file`` in llama.cpp with logits for every position, ``n_gpu_layers`` of its blocks on the GPU
    (more than it has: the output layer too), computing ``n_ubatch`` positions at once (None: all ``n_ctx``) on
    ``threads`` cores (None: all).

    Raises:
        UserError: llama.cpp refuses the file.
    """
    llama_cpp = llamacpp.llama_cpp_module()
    without_amx(llama_cpp)
    try:
        return llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch or n_ctx,
                               logits_all=True, n_threads=threads or os.cpu_count() or 1,
                               n_threads_batch=threads or os.cpu_count() or 1, n_gpu_layers=n_gpu_layers, verbose=False)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"llama.cpp refuses to load {gguf_file}: {error}; drop its format from export.formats "
                        "and report the model's architecture") from None


def without_amx(llama_cpp, force: bool = False) -> bool:
    """Load models without llama.cpp's extra CPU buffer types when its build uses Intel AMX (or ``force``).

    A native build on a CPU with AMX (Sapphire Rapids and later) puts quantized weights in an AMX buffer,
    and its AMX matrix product crashed (SIGSEGV) on the first token of a q8_0 file on such a machine
    (ggml-org/llama.cpp#20824). ``make install`` builds llama.cpp without AMX; this covers a build made
    with it (pip's cache keeps a build across installs). Without extra buffer types (llama.cpp's
    ``--no-repack``) weights stay in plain CPU buffers: the same values, no repacking. The Llama class
    takes no such argument, so its default model parameters are replaced in this process (the worker's own).

    Returns:
        Whether extra buffer types are now off.
    """
    low = llama_cpp.llama_cpp
    if getattr(low.llama_model_default_params, "without_extra_buffers", False):
        return True
    if not force and b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return False
    default = low.llama_model_default_params

    def params():
        params = default()
        params.use_extra_bufts = False
        return params

    params.without_extra_buffers = True
    low.llama_model_default_params = params
    return True


def layers_within(blocks: list[float], output: float, free: float) -> int:
    """llama.cpp's n_gpu_layers for blocks of ``blocks`` bytes and an output layer of ``output`` bytes in
    ``free`` bytes: llama.cpp offloads the last blocks first, and the output layer only after all of them."""
    if sum(blocks) + output <= free:
        return len(blocks) + 1
    fit, used = 0, 0.0
    for size in reversed(blocks):
        if used + size > free:
            break
        used, fit = used + size, fit + 1
    return fit


def tensor_bytes(gguf_file: Path) -> tuple[list[float], float, int]:
    """The bytes of each block (``blk.N.*``), of the output layer (the token embeddings when they are tied)
    and the vocabulary size, from the file's tensor index."""
    blocks: dict[int, float] = {}
    named = {}
    for name, shape, n_bytes in tensor_index(gguf_file):
        named[name] = (shape, n_bytes)
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            blocks[index] = blocks.get(index, 0.0) + n_bytes
    head = named.get("output.weight", named.get("token_embd.weight"))
    vocab = int(max(head[0])) if head is not None else 0
    return [blocks[i] for i in sorted(blocks)], float(head[1]) if head is not None else 0.0, vocab


def tensor_index(gguf_file: Path) -> list[tuple[str, tuple[int, ...], int]]:
    """Each tensor's name, shape and bytes, read from the GGUF header while skipping the metadata values.

    gguf.GGUFReader parses every metadata value too, the tokenizer's vocabulary and merges included: seconds
    for a 150,000-token vocabulary, where this takes a fraction of one.
    """
    import math
    import mmap
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

    # The metadata types of a fixed size -> bytes (the others: a string, an array).
    value_bytes = {int(t): np.dtype(scalar).itemsize for t, scalar in GGUFReader.gguf_scalar_to_np.items()}
    string_type, array_type = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
    with open(gguf_file, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, _, n_tensors, n_values = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF":
            raise UserError(f"{gguf_file} is not a GGUF file")
        at = 24

        def string() -> str:
            nonlocal at
            (length,) = struct.unpack_from("<Q", data, at)
            at += 8 + length
            return bytes(data[at - length: at]).decode()

        def skip(value_type: int) -> None:
            nonlocal at
            if value_type == string_type:
                (length,) = struct.unpack_from("<Q", data, at)
                at += 8 + length
            elif value_type == array_type:
                item_type, count = struct.unpack_from("<IQ", data, at)
                at += 12
                if item_type in value_bytes:
                    at += count * value_bytes[item_type]
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                at += value_bytes[value_type]

        for _ in range(n_values):
            string()
            (value_type,) = struct.unpack_from("<I", data, at)
            at += 4
            skip(value_type)
        index = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", data, at)
            shape = struct.unpack_from(f"<{n_dims}Q", data, at + 4)
            tensor_type, _ = struct.unpack_from("<IQ", data, at + 4 + 8 * n_dims)
            at += 4 + 8 * n_dims + 12
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
            index.append((name, tuple(shape), math.prod(shape) // block * block_bytes))
    return index


def llama_continuations(llm, prompts: list[list[int]], max_new_tokens: int) -> list[llamacpp.Continuation]:
    """Greedy continuations of ``prompts`` by llama.cpp, stopping on the file's end-of-generation tokens."""
    llama_cpp = llamacpp.llama_cpp_module()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for prompt in prompts:
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(tokens) == max_new_tokens:
                break
        out.append(llamacpp.continuation(tokens, lambda t: llama_cpp.llama_vocab_is_eog(vocab, t)))
    return out


def render_chat(llm, bos_token: str, eos_token: str) -> str | None:
    """The probe conversation rendered by llama.cpp's Jinja formatter from the file's chat template (None: it
    has none)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token)
    return formatter(messages=llamacpp.PROBE_CONVERSATION).prompt


if __name__ == "__main__":
    sys.exit(main())

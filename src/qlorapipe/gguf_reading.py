"""Reading GGUF files through transformers, each parsed once."""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def gguf_read_once():
    """While the block runs, each GGUF file is parsed once.

    transformers reads a GGUF file's header and metadata (its whole vocabulary and merges among them) once
    for the config, once for the tokenizer and once for the weights: 2.6-3.4 s each for the offline
    default's file on 2 CPU cores. Within the block ``gguf.GGUFReader`` hands out the reader it made for a
    file the first time; transformers only reads from it. Its tqdm bar over the tensors it dequantizes, which
    no environment switch turns off, is off too (a stage's log showed it as a run of carriage returns).
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    original, bar = gguf.GGUFReader, loader.tqdm
    loader.tqdm = functools.partial(bar, disable=True)
    readers = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader, loader.tqdm = original, bar

"""A per-machine cache of the quantized base, so that each model stage does not quantize it again.

Train, evaluate, merge, export (its reference continuations) and the chat tool each load the base
quantized as training did. Quantizing reads every 16-bit weight, and transformers loads a model it
quantizes one tensor at a time. The first load on a machine saves the quantized model as
bitsandbytes serializes it (``save_pretrained``: the packed 4-bit weights and their statistics, a
third of the 16-bit bytes) under the cache folder; the next loads of the same base with the same
quantization read that instead, with transformers' parallel loader. Quantizing is deterministic, so
the loaded model is the same, tensor for tensor, with or without the cache (tests/test_quantized_cache.py),
and so are the stages' outputs: the cache is not a DVC output, like Triton's kernel cache.

An entry is keyed by what decides the loaded model: the base's weights (the content hash the
download stage recorded, the config, the generation config and the weight files' sizes), the
quantization section, the compute dtype, the torch, transformers and bitsandbytes versions, and the
device kind. The ``KEEP`` entries used last are kept, and any used in the last ``IN_USE_SECONDS``;
older ones are deleted. The cache only ever costs time: an entry that cannot be written is skipped,
one that cannot be read is deleted and written again. ``QLORAPIPE_QUANTIZED_CACHE`` names another
folder, or ``off`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from qlorapipe.pinned_wheels import wheel_cache_dir
from qlorapipe.records import SOURCE_RECORD, sha256_file

logger = logging.getLogger(__name__)

ENV = "QLORAPIPE_QUANTIZED_CACHE"
KEEP = 2  # entries kept, the most recently used: a base or two of the sizes this project trains
IN_USE_SECONDS = 600  # an entry used this recently may be being read by another process: never deleted
_MARK = "qlorapipe_quantized.json"  # written last into an entry: its key and its files' sizes, and that it is whole


def cache_dir() -> Path | None:
    """The cache folder (QLORAPIPE_QUANTIZED_CACHE, else ``quantized`` beside the wheel cache); None when off."""
    chosen = os.environ.get(ENV, "")
    if chosen.lower() in ("off", "0", "false", "no"):
        return None
    return Path(chosen) if chosen else wheel_cache_dir().parent / "quantized"


def entry_key(base_dir: Path, params, compute_dtype, device) -> str | None:
    """The cache key of ``base_dir`` quantized as ``params`` say on ``device``; None where nothing is cached
    (no quantization, no download record to identify the weights)."""
    base_dir = Path(base_dir)
    if cache_dir() is None or params.load_in != "4bit" or not (base_dir / SOURCE_RECORD).is_file():
        return None
    import bitsandbytes
    import torch
    import transformers

    record = json.loads((base_dir / SOURCE_RECORD).read_text())
    weights = sorted((p.name, p.stat().st_size) for p in base_dir.glob("*.safetensors"))
    if device.type == "cuda":
        kind = f"cuda {torch.cuda.get_device_name(device)} {torch.cuda.get_device_capability(device)}"
    else:
        kind = f"cpu {platform.machine()}"
    facts = {
        "content_sha256": record.get("content_sha256"),
        "config_sha256": sha256_file(base_dir / "config.json"),
        # Loaded with the model (its generation_config), and saved with it into the entry.
        "generation_config_sha256": (sha256_file(base_dir / "generation_config.json")
                                     if (base_dir / "generation_config.json").is_file() else None),
        "weights": weights,
        "quantization": [params.load_in, params.quant_type, params.use_double_quant, str(compute_dtype)],
        "versions": [torch.__version__, transformers.__version__, bitsandbytes.__version__],
        "device": kind,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str, base_dir: Path, dtype, device):
    """The quantized base from the cache entry ``key``, or None when there is none (or it cannot be read:
    it is then deleted, so that this load's ``store`` writes it again)."""
    from transformers import AutoModelForCausalLM

    root = cache_dir()
    entry = None if root is None else root / key
    if entry is None or not (entry / _MARK).is_file():
        return None
    started = time.perf_counter()
    # Most recently used, and in use: ``_evict`` in another process spares it. Gone already, the read fails below.
    with contextlib.suppress(OSError):
        os.utime(entry)
    try:
        # A file cut short or grown since it was written (a full disk, a crash before the data reached it).
        sizes = json.loads((entry / _MARK).read_text())["sizes"]
        changed = [name for name, size in sizes.items() if (entry / name).stat().st_size != size]
        if changed:
            raise ValueError(f"{', '.join(changed)}: not the size written")
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, device_map={"": device})
    except Exception as error:  # noqa: BLE001 - whatever broke the entry (a truncated file, a foreign format), not the stage
        logger.warning("Quantized base cache entry %s could not be read (%s); quantizing the base again", entry,
                       error)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    # As loaded from the base itself: peft records this path in the adapter's config, and save_pretrained wrote
    # the class the entry was saved from as its architectures.
    model.config._name_or_path = model.name_or_path = str(base_dir)
    model.config.architectures = json.loads((base_dir / "config.json").read_text()).get("architectures")
    logger.info("Quantized base loaded from the cache in %.1f s (%s)", time.perf_counter() - started, entry)
    return model


def store(model, key: str) -> None:
    """Save the freshly quantized ``model`` as the entry ``key`` (whole or not at all), then drop the entries
    ``_evict`` finds old. Skipped, with a log line, when the disk has too little room, and on any error: the
    cache saves time, it never fails a stage. In a distributed run only rank 0 stores (every rank would
    write the same entry)."""
    root = cache_dir()
    if root is None or any(os.environ.get(name, "0") != "0" for name in ("RANK", "LOCAL_RANK")):
        return
    tmp = None
    try:
        if (root / key / _MARK).is_file():
            return
        root.mkdir(parents=True, exist_ok=True)
        size = model.get_memory_footprint()
        free = shutil.disk_usage(root).free
        if free < 2 * size + 2e9:
            logger.info("Quantized base not cached: %.1f GB free under %s for %.1f GB", free / 1e9, root, size / 1e9)
            return
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        # save_pretrained sets the config's architectures to the model's class and its dtype to a string: the
        # model goes on as loaded.
        kept = {name: getattr(model.config, name) for name in ("architectures", "dtype")}
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for name, value in kept.items():
                setattr(model.config, name, value)
        sizes = {path.name: path.stat().st_size for path in tmp.iterdir()}
        (tmp / _MARK).write_text(json.dumps({"key": key, "sizes": sizes}))
        _sync(tmp)  # on disk before it is marked whole under its key, so a crash leaves no entry cut short
        try:
            os.rename(tmp, root / key)
        except OSError:
            if (root / key / _MARK).is_file():
                return  # another process stored it first
            raise
        logger.info("Quantized base cached in %.1f s (%.2f GB, %s); later loads read it",
                    time.perf_counter() - started, size / 1e9, root / key)
        _evict(root, keep=KEEP)
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written costs the next load time, not the stage
        logger.warning("Quantized base not cached (%s)", error)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _sync(folder: Path) -> None:
    """fsync each file in ``folder``, then the folder itself."""
    for path in [*folder.iterdir(), folder]:
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _evict(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` entries used last, sparing any used in the last IN_USE_SECONDS, and leftovers
    of interrupted stores. Another process may delete any of them meanwhile."""
    now = time.time()
    entries = []
    for path in root.iterdir():
        with contextlib.suppress(OSError):
            if path.is_dir() and (path / _MARK).is_file():
                entries.append((path.stat().st_mtime, path))
    entries.sort(reverse=True)
    for used, old in entries[keep:]:
        if used < now - IN_USE_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < now - 86400:  # not a store in progress
                shutil.rmtree(leftover, ignore_errors=True)

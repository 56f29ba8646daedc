"""Causal-LM training data: load documents, split them, tokenize, pack into fixed-length chunks.

The reference task's shape: documents are joined with EOS, the token stream is cut into
``max_length`` chunks, and labels are the input ids. The train/eval split is made over
whole documents (seeded), so no held-out text leaks into training through a chunk border.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.params import DataParams

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"


@dataclass(frozen=True)
class Documents:
    texts: list[str]
    empty_skipped: int  # blank documents are not errors (wikitext has many blank lines): counted


def builtin_python_docs() -> list[str]:
    """The Python reference manual's topic texts, shipped with every CPython (PSF licence)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_documents(params: DataParams) -> Documents:
    """Load raw documents from the source params name.

    Raises:
        UserError: missing files, unknown extensions, missing columns, non-text values.
    """
    if params.source == "builtin:python-docs":
        raw = builtin_python_docs()
        origin = "builtin:python-docs"
    elif params.source == "local":
        raw = list(_read_local(Path(params.path).expanduser(), params.text_column))
        origin = params.path
    else:
        raw = _read_hub(params)
        origin = f"{params.path}/{params.name or ''}"
    texts = [t for t in raw if t.strip()]
    if params.max_documents is not None:
        texts = texts[: params.max_documents]
    if len(texts) < 2:
        raise UserError(
            f"{origin}: found {len(texts)} non-empty document(s); need at least 2 (one to train on, one to evaluate)"
        )
    return Documents(texts=texts, empty_skipped=len(raw) - len([t for t in raw if t.strip()]))


def _read_local(path: Path, text_column: str) -> Iterable[str]:
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".txt", ".jsonl")]
    if not files:
        raise UserError(f"data.path '{path}': no .txt or .jsonl files found")
    for file in files:
        try:
            if file.suffix == ".txt":
                # One document per file; blank-line separated paragraphs stay together.
                yield file.read_text(encoding="utf-8")
                continue
            for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{file}:{line_no}: not valid JSON ({exc.msg})") from None
                yield _text_of(record, text_column, f"{file}:{line_no}")
        except UnicodeDecodeError as exc:
            raise UserError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _text_of(record, column: str, where: str) -> str:
    if not isinstance(record, dict) or column not in record:
        have = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{where}: no '{column}' field (has: {have}); set data.text_column")
    value = record[column]
    if not isinstance(value, str):
        raise UserError(f"{where}: '{column}' is {type(value).__name__}, not text; set data.text_column")
    return value


def _read_hub(params: DataParams) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(params.path, params.name, revision=params.revision, split=params.split)
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise UserError(
            f"cannot load hub dataset {params.path} ({exc.__class__.__name__}); without network, "
            "set data.source: local with data.path to .txt/.jsonl files, or data.source: builtin:python-docs"
        ) from None
    except ValueError as exc:
        raise UserError(f"hub dataset {params.path}: {exc}") from None
    if params.text_column not in dataset.column_names:
        raise UserError(
            f"{params.path}: no column '{params.text_column}' (has: {', '.join(dataset.column_names)}); "
            "set data.text_column"
        )
    return [t if isinstance(t, str) else "" for t in dataset[params.text_column]]


def split_documents(texts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents into train and eval sets, reproducibly from ``seed``."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(texts) * eval_fraction))
    eval_ids = sorted(order[:n_eval])
    train_ids = sorted(order[n_eval:])
    return [texts[i] for i in train_ids], [texts[i] for i in eval_ids]


def tokenize_and_chunk(texts: list[str], tokenizer, max_length: int) -> tuple[list[list[int]], dict]:
    """Join documents with EOS and cut the token stream into ``max_length`` chunks.

    Returns:
        The chunks, and counts: documents, tokens, chunks, tokens_dropped (the tail that
        does not fill a whole chunk).
    """
    eos = tokenizer.eos_token_id
    # Batched fast-tokenizer call; no special tokens, so a BOS is not repeated per document.
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    n_chunks = len(stream) // max_length
    chunks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_chunks)]
    stats = {
        "documents": len(texts),
        "tokens": len(stream),
        "chunks": n_chunks,
        "tokens_dropped": len(stream) - n_chunks * max_length,
    }
    return chunks, stats


def save_chunks(chunks: list[list[int]], out_dir: Path) -> None:
    """Write chunks as an Arrow dataset (input_ids and labels) that datasets.load_from_disk reads."""
    import datasets

    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32"))}
    )
    dataset = datasets.Dataset.from_dict({"input_ids": chunks, "labels": chunks}, features=features)
    # A content-derived fingerprint keeps state.json identical for identical data (the
    # default is random), so the output's DVC hash depends on the data alone.
    dataset._fingerprint = _fingerprint(chunks)
    dataset.save_to_disk(str(out_dir))


def _fingerprint(chunks: list[list[int]]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(json.dumps(chunk).encode())
    return digest.hexdigest()[:16]


def load_split(data_dir: Path, split: str):
    """Load one prepared split as a datasets.Dataset in torch format.

    Raises:
        UserError: the split is missing (run the prepare stage).
    """
    import datasets

    path = Path(data_dir) / split
    if not path.is_dir():
        raise UserError(f"{path}: prepared data not found; run `dvc repro prepare`")
    dataset = datasets.load_from_disk(str(path))
    dataset.set_format("torch", columns=["input_ids", "labels"])
    return dataset

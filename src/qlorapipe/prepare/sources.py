"""Reading raw records from where the data lives: builtin corpora, local files, the Hub.

Every record is a plain dict of column -> value plus ``where``, a short "file:row" string
that error messages and the data report use to point at it. Nothing here knows about
formats or tokenizers; the examples module turns records into training examples.

Sources:
- ``builtin:python-docs``: the Python reference manual's topic texts (PSF licence),
  shipped with every CPython; one record per topic with a ``text`` column.
- ``builtin:chatterbot``: the English question/answer pairs of the PyPI package
  chatterbot-corpus (BSD), read from its wheel at a pinned sha256 without installing it.
- ``local``: .txt, .jsonl, .json, .csv and .parquet files, or a directory of them.
- ``hub``: ``datasets.load_dataset`` at a pinned revision, subset (name) and split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qlorapipe import corpora
from qlorapipe.errors import UserError
from qlorapipe.inputs import data_files
from qlorapipe.local_data import READERS, Record
from qlorapipe.params import DataParams

logger = logging.getLogger(__name__)


def load_records(params: DataParams) -> tuple[list[Record], str]:
    """Read every record of the source params name, in a stable order.

    Returns:
        The records and a one-word description of the origin (for messages).

    Raises:
        UserError: missing files, unknown extensions, invalid JSON/CSV, undecodable bytes,
            an unreachable hub dataset.
    """
    if params.source == "builtin:python-docs":
        return python_docs_records(), "builtin:python-docs"
    if params.source == "builtin:chatterbot":
        return chatterbot_records(), "builtin:chatterbot"
    if params.source == "local":
        return list(_read_local(Path(params.path).expanduser())), params.path
    return _read_hub(params), f"hub:{params.path}"


def python_docs_records() -> list[Record]:
    """The Python reference manual's topic texts, one record per topic."""
    return [Record({"text": text}, f"builtin:python-docs:{key}") for key, text in corpora.python_docs()]


def chatterbot_records() -> list[Record]:
    """One record per chatterbot (question, answer) pair.

    The record carries every column spelling the formats read, so any of chat, instruction
    or completion works.
    """
    wheel = corpora.fetch_chatterbot_wheel("check network access to PyPI, or set data.source: local with data.path")
    return [Record({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "instruction": question, "input": "", "output": answer,
                    "prompt": question, "completion": answer}, where)
            for where, question, answer in corpora.chatterbot_pairs(wheel)]


# --- local files -------------------------------------------------------------------------


def _read_local(path: Path):
    for file in data_files(path):
        yield from READERS[file.suffix](file)


# --- the Hub -----------------------------------------------------------------------------


def _read_hub(params: DataParams) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(params.path, params.name, revision=params.revision, split=params.split)
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise UserError(
            f"cannot load hub dataset {params.path} ({exc.__class__.__name__}); without network, set "
            "data.source: local with data.path to local files, or data.source: builtin:chatterbot"
        ) from None
    except ValueError as exc:
        raise UserError(f"hub dataset {params.path}: {exc}; check data.name and data.split") from None
    where = f"{params.path}[{params.split}]"
    return [Record(row, f"{where}:{i}") for i, row in enumerate(dataset.to_list(), start=1)]

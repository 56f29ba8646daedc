"""The builtin corpora: real text that needs no model hub, for training and for evaluation.

- ``builtin:python-docs``: the Python reference manual's topic texts (PSF licence), shipped
  with every CPython.
- ``builtin:chatterbot``: the English question/answer pairs of the PyPI package
  chatterbot-corpus (BSD), read from its wheel at a pinned sha256 without installing it.

The prepare step turns them into training records; the evaluate step reads one that is not
the training data as its general corpus, to measure what fine-tuning made the model forget.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.inputs import CHATTERBOT, PYTHON_DOCS, corpus_files
from qlorapipe.pinned_wheels import fetch_pinned_wheel

CHATTERBOT_WHEEL = "chatterbot-corpus==1.3.3"
CHATTERBOT_WHEEL_FILE = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
CHATTERBOT_WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
CHATTERBOT_ENGLISH_DIR = "chatterbot_corpus/data/english/"


def python_docs() -> list[tuple[str, str]]:
    """(topic, text) for every topic of the Python reference manual, sorted by topic."""
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)]


def fetch_chatterbot_wheel(fallback: str) -> Path:
    """The chatterbot-corpus wheel, fetched without its dependencies and verified (pinned_wheels).

    Args:
        fallback: what the user can do instead when PyPI is unreachable (names the param).
    """
    return fetch_pinned_wheel(CHATTERBOT_WHEEL, CHATTERBOT_WHEEL_FILE, CHATTERBOT_WHEEL_SHA256, "0.33 MiB", fallback)


def chatterbot_pairs(wheel: Path) -> list[tuple[str, str, str]]:
    """(where, question, answer) for every pair in the English YAML files inside the wheel (a zip).

    Each conversation in the corpus is a question followed by one or more alternative
    answers; each (question, answer) pair is one item. ``where`` is "chatterbot:file:number".
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: 10x faster
    pairs = []
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist()
                       if n.startswith(CHATTERBOT_ENGLISH_DIR) and n.endswith((".yml", ".yaml")))
        for name in names:
            document = yaml.load(archive.read(name).decode("utf-8"), Loader=loader) or {}
            for number, conversation in enumerate(document.get("conversations") or [], start=1):
                if not isinstance(conversation, list) or len(conversation) < 2:
                    continue
                # YAML turns answers such as "42" or "yes" into numbers or booleans.
                question, *answers = [str(turn).strip() for turn in conversation]
                pairs += [(f"chatterbot:{Path(name).name}:{number}", question, answer) for answer in answers]
    return pairs


def general_texts(source: str, param: str) -> list[str]:
    """The documents of a general corpus: a builtin corpus or a local .txt file or folder of them.

    Chatterbot pairs become one document each ("question\\nanswer"); repeated documents are
    kept once.

    Args:
        source: ``builtin:python-docs``, ``builtin:chatterbot`` or a path.
        param: the params key that names ``source``, for messages.

    Raises:
        UserError: a path that does not exist or holds no .txt file, or an undecodable file.
    """
    if source == PYTHON_DOCS:
        texts = [text for _, text in python_docs()]
    elif source == CHATTERBOT:
        wheel = fetch_chatterbot_wheel(f"check network access to PyPI, or set {param} to a local .txt file")
        texts = [f"{question}\n{answer}" for _, question, answer in chatterbot_pairs(wheel)]
    else:
        texts = []
        for file in corpus_files(source, param):
            try:
                texts.append(file.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError as exc:
                raise UserError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                f"convert it or change {param}") from None
    return [t for t in dict.fromkeys(texts) if t.strip()]

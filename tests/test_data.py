"""Causal-LM data preparation: chunking, seeded document split, byte-identical outputs, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import build_tokenizer
from qlorapipe import data
from qlorapipe.errors import UserError
from qlorapipe.params import DataParams


def test_documents_are_joined_with_eos_and_cut_into_full_chunks():
    tokenizer = build_tokenizer()
    texts = ["Python is a programming language.", "The with statement is used to wrap a block."]
    chunks, stats = data.tokenize_and_chunk(texts, tokenizer, max_length=8)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stats == {"documents": 2, "tokens": len(stream), "chunks": len(stream) // 8,
                     "tokens_dropped": len(stream) % 8}
    assert [t for chunk in chunks for t in chunk] == stream[: 8 * (len(stream) // 8)]
    assert all(len(chunk) == 8 for chunk in chunks)
    assert tokenizer.bos_token_id not in stream  # no BOS repeated per document


def test_split_is_seeded_disjoint_and_complete():
    texts = [f"document {i}" for i in range(50)]
    train, held_out = data.split_documents(texts, 0.2, seed=7)
    assert (len(train), len(held_out)) == (40, 10)
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(texts)
    assert data.split_documents(texts, 0.2, seed=7) == (train, held_out)
    assert data.split_documents(texts, 0.2, seed=8)[1] != held_out


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_chunks_give_byte_identical_datasets(tmp_path):
    chunks = [[1, 2, 3, 4], [5, 6, 7, 8]]
    data.save_chunks(chunks, tmp_path / "a")
    data.save_chunks(chunks, tmp_path / "b")
    data.save_chunks([[1, 2, 3, 4], [5, 6, 7, 9]], tmp_path / "c")
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    loaded = data.load_split(tmp_path, "a")
    assert loaded[1]["input_ids"].tolist() == [5, 6, 7, 8] == loaded[1]["labels"].tolist()


def test_builtin_corpus_is_real_prose_that_needs_no_download():
    documents = data.load_documents(DataParams())
    assert len(documents.texts) > 50
    assert sum(len(t) for t in documents.texts) > 300_000  # characters of reference-manual prose


def _params(path: Path, **kwargs) -> DataParams:
    return DataParams(source="local", path=str(path), **kwargs)


def test_jsonl_without_the_text_column_lists_the_columns_it_has(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"content": "a"}) + "\n" + json.dumps({"content": "b"}) + "\n")
    with pytest.raises(UserError, match=r"corpus.jsonl:1: no 'text' field \(has: content\); set data.text_column"):
        data.load_documents(_params(path))
    assert data.load_documents(_params(path, text_column="content")).texts == ["a", "b"]


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: not valid JSON"):
        data.load_documents(_params(path))


def test_non_text_values_and_undecodable_bytes_are_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: 'text' is int, not text"):
        data.load_documents(_params(path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.txt: not UTF-8 text"):
        data.load_documents(_params(latin))


def test_blank_documents_are_counted_not_silently_dropped(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(["first document", "   ", "second document", ""]):
        (folder / f"{i}.txt").write_text(text)
    documents = data.load_documents(_params(folder))
    assert documents.texts == ["first document", "second document"]
    assert documents.empty_skipped == 2


def test_too_few_documents_is_an_error(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("only one document")
    with pytest.raises(UserError, match="found 1 non-empty document"):
        data.load_documents(_params(path))

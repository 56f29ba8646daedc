"""The per-machine cache of quantized bases: the same model with or without it, keyed, bounded, optional."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from qlorapipe import modeling, quantized_cache
from qlorapipe.params import QuantizationParams

QUANT = QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=True, compute_dtype="auto")
DEVICES = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


@pytest.fixture
def base(tmp_path, tiny_llama_dir):
    """A base directory as the download stage leaves it: the model and its source record."""
    path = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, path)
    (path / "source.json").write_text(json.dumps({"content_sha256": "ab" * 32}))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(quantized_cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_model(found, expected) -> None:
    found_state, expected_state = found.state_dict(), expected.state_dict()
    assert sorted(found_state) == sorted(expected_state)  # the packed weights and every quantization statistic
    assert [k for k in expected_state if not torch.equal(found_state[k].cpu(), expected_state[k].cpu())] == []
    assert found.config.to_dict() == expected.config.to_dict()
    assert found.generation_config.to_dict() == expected.generation_config.to_dict()
    assert found.name_or_path == expected.name_or_path


def _same_logits(found, expected) -> None:
    """After ``_same_model``: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights at their first forward."""
    ids = torch.arange(3, 40).reshape(1, -1).to(found.device)
    with torch.no_grad():
        assert torch.equal(found(input_ids=ids).logits, expected(input_ids=ids).logits)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_base_loaded_from_the_cache_is_the_base_quantized_again(base, cache, device, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="qlorapipe.quantized_cache")
    stored, _ = modeling.load_base_model(base, QUANT, device)
    assert "Quantized base cached" in caplog.text and len(list(cache.iterdir())) == 1
    caplog.clear()
    cached, dtype = modeling.load_base_model(base, QUANT, device)
    assert "loaded from the cache" in caplog.text
    monkeypatch.setenv(quantized_cache.ENV, "off")
    direct, direct_dtype = modeling.load_base_model(base, QUANT, device)
    assert dtype == direct_dtype
    _same_model(cached, direct)
    _same_model(stored, direct)
    _same_logits(cached, direct)
    _same_logits(stored, direct)


def test_each_quantization_has_its_entry_and_only_the_last_used_are_kept(base, cache, monkeypatch):
    cpu = torch.device("cpu")
    modeling.load_base_model(base, QUANT, cpu)
    fp4 = QuantizationParams(load_in="4bit", quant_type="fp4", use_double_quant=False, compute_dtype="auto")
    modeling.load_base_model(base, fp4, cpu)
    keys = {quantized_cache.entry_key(base, q, torch.float32, cpu) for q in (QUANT, fp4)}
    assert {p.name for p in cache.iterdir()} == keys and len(keys) == 2
    monkeypatch.setattr(quantized_cache, "KEEP", 1)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")  # another base: a new key
    modeling.load_base_model(base, QUANT, cpu)
    assert [p.name for p in cache.iterdir()] == [quantized_cache.entry_key(base, QUANT, torch.float32, cpu)]


def test_nothing_is_cached_when_off_or_for_a_model_without_a_download_record(base, cache, monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    monkeypatch.setenv(quantized_cache.ENV, "off")
    modeling.load_base_model(base, QUANT, cpu)
    assert not cache.exists()
    monkeypatch.setenv(quantized_cache.ENV, str(cache))
    (base / "source.json").unlink()  # a merged model: merge's re-quantized candidate loads one
    modeling.load_base_model(base, QUANT, cpu)
    unquantized = QuantizationParams(load_in="none", quant_type="nf4", use_double_quant=True, compute_dtype="auto")
    modeling.load_base_model(base, unquantized, cpu)
    assert not cache.exists()


def test_an_unreadable_entry_is_quantized_again_with_a_warning(base, cache, caplog, monkeypatch):
    cpu = torch.device("cpu")
    modeling.load_base_model(base, QUANT, cpu)
    (weights,) = cache.glob("*/*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    caplog.set_level(logging.WARNING, logger="qlorapipe.quantized_cache")
    loaded, _ = modeling.load_base_model(base, QUANT, cpu)
    assert "could not be read" in caplog.text
    monkeypatch.setenv(quantized_cache.ENV, "off")
    direct = modeling.load_base_model(base, QUANT, cpu)[0]
    _same_model(loaded, direct)
    _same_logits(loaded, direct)

"""The per-machine cache of quantized bases: the same model with or without it, keyed, bounded, optional."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from qlorapipe import modeling, quantized_cache
from qlorapipe.params import QuantizationParams

QUANT = QuantizationParams(load_in="4bit", quant_type="nf4", use_double_quant=True, compute_dtype="auto")
AUTO_ON_CPU = modeling.resolve_compute_dtype("auto", torch.device("cpu"))  # bfloat16 or float32 by processor
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
    assert found.config.dtype == expected.config.dtype  # to_dict writes a torch dtype and its name alike
    assert found.generation_config.to_dict() == expected.generation_config.to_dict()
    assert found.name_or_path == expected.name_or_path


def _same_logits(found, expected) -> None:
    """After ``_same_model``: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights at their first forward."""
    ids = torch.arange(3, 40).reshape(1, -1).to(found.device)
    with torch.no_grad():
        assert torch.equal(found(input_ids=ids).logits, expected(input_ids=ids).logits)


def _same_as_a_fresh_quantization(base, device, monkeypatch, *models):
    """Each of ``models`` against the base quantized again with the cache off; returns the compute dtype."""
    monkeypatch.setenv(quantized_cache.ENV, "off")
    direct, dtype = modeling.load_base_model(base, QUANT, device)
    for model in models:  # every state before any forward (see _same_logits)
        _same_model(model, direct)
    for model in models:
        _same_logits(model, direct)
    return dtype


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_base_loaded_from_the_cache_is_the_base_quantized_again(base, cache, device, monkeypatch, caplog):
    # Architectures other than the class loaded: save_pretrained writes the class, a fresh load keeps the base's.
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    caplog.set_level(logging.INFO, logger="qlorapipe.quantized_cache")
    stored, _ = modeling.load_base_model(base, QUANT, device)
    assert "Quantized base cached" in caplog.text and len(list(cache.iterdir())) == 1
    caplog.clear()
    cached, dtype = modeling.load_base_model(base, QUANT, device)
    assert "loaded from the cache" in caplog.text
    assert dtype == _same_as_a_fresh_quantization(base, device, monkeypatch, cached, stored)


def test_each_quantization_has_its_entry_and_only_the_last_used_are_kept(base, cache, monkeypatch):
    cpu = torch.device("cpu")
    modeling.load_base_model(base, QUANT, cpu)
    fp4 = QuantizationParams(load_in="4bit", quant_type="fp4", use_double_quant=False, compute_dtype="auto")
    modeling.load_base_model(base, fp4, cpu)
    keys = {quantized_cache.entry_key(base, q, AUTO_ON_CPU, cpu) for q in (QUANT, fp4)}
    assert {p.name for p in cache.iterdir()} == keys and len(keys) == 2
    monkeypatch.setattr(quantized_cache, "KEEP", 1)
    hour_ago = time.time() - 3600
    for entry in cache.iterdir():  # not used in the last minutes: no other process may be reading them
        os.utime(entry, (hour_ago, hour_ago))
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")  # another base: a new key
    modeling.load_base_model(base, QUANT, cpu)
    assert [p.name for p in cache.iterdir()] == [quantized_cache.entry_key(base, QUANT, AUTO_ON_CPU, cpu)]


def test_eviction_spares_entries_in_use_and_passes_over_what_another_process_deletes(cache, monkeypatch):
    cache.mkdir()
    now = time.time()
    for name, used in (("last", now), ("in-use", now - 60), ("old", now - 3600), ("deleted-meanwhile", now - 3600)):
        (cache / name).mkdir()
        (cache / name / quantized_cache._MARK).write_text("{}")
        os.utime(cache / name, (used, used))
    (cache / ".stale.tmp-1").mkdir()
    os.utime(cache / ".stale.tmp-1", (now - 2 * 86400, now - 2 * 86400))
    (cache / ".deleted.tmp-2").symlink_to(cache / "nothing")  # a leftover gone once listed
    is_file = Path.is_file

    def deleted_once_found(path):  # another process evicts the entry just after this one found it whole
        found = is_file(path)
        if path == cache / "deleted-meanwhile" / quantized_cache._MARK:
            shutil.rmtree(path.parent)
        return found

    monkeypatch.setattr(Path, "is_file", deleted_once_found)
    quantized_cache._evict(cache, keep=1)
    assert sorted(p.name for p in cache.iterdir()) == [".deleted.tmp-2", "in-use", "last"]


def test_a_changed_generation_config_is_another_entry(base, cache, monkeypatch):
    cpu = torch.device("cpu")
    modeling.load_base_model(base, QUANT, cpu)
    key = quantized_cache.entry_key(base, QUANT, torch.float32, cpu)
    generation = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 7}))
    assert quantized_cache.entry_key(base, QUANT, torch.float32, cpu) != key
    cached, _ = modeling.load_base_model(base, QUANT, cpu)
    monkeypatch.setenv(quantized_cache.ENV, "off")
    direct, _ = modeling.load_base_model(base, QUANT, cpu)
    assert cached.generation_config.max_new_tokens == 7
    assert cached.generation_config.to_dict() == direct.generation_config.to_dict()


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
    caplog.set_level(logging.INFO, logger="qlorapipe.quantized_cache")
    loaded, _ = modeling.load_base_model(base, QUANT, cpu)
    assert "could not be read" in caplog.text and "Quantized base cached" in caplog.text  # deleted, written again
    caplog.clear()
    again, _ = modeling.load_base_model(base, QUANT, cpu)
    assert "loaded from the cache" in caplog.text and "could not be read" not in caplog.text
    _same_as_a_fresh_quantization(base, cpu, monkeypatch, loaded, again)


def test_an_entry_whose_files_changed_size_is_read_as_unreadable(base, cache, caplog):
    cpu = torch.device("cpu")
    modeling.load_base_model(base, QUANT, cpu)
    (config,) = cache.glob("*/config.json")
    written = config.read_text()
    config.write_text(written + " ")  # still a config transformers reads
    caplog.set_level(logging.INFO, logger="qlorapipe.quantized_cache")
    modeling.load_base_model(base, QUANT, cpu)
    assert "config.json: not the size written" in caplog.text and "Quantized base cached" in caplog.text
    assert config.read_text() == written


@pytest.mark.parametrize("failure", ["disk_usage", "save_pretrained"])
def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_stage(base, cache, caplog, monkeypatch, failure):
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise PermissionError("not allowed") if failure == "disk_usage" else TypeError("not serializable")

    monkeypatch.setattr(shutil if failure == "disk_usage" else PreTrainedModel, failure, fail)
    caplog.set_level(logging.WARNING, logger="qlorapipe.quantized_cache")
    model, _ = modeling.load_base_model(base, QUANT, torch.device("cpu"))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["Quantized base not cached"]
    assert list(cache.iterdir()) == []  # no entry, no leftover
    assert model.config.architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK"])
def test_only_rank_0_of_a_distributed_run_stores(base, cache, monkeypatch, variable):
    cpu = torch.device("cpu")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(variable, "1")
    modeling.load_base_model(base, QUANT, cpu)
    assert not cache.exists()
    monkeypatch.setenv(variable, "0")
    modeling.load_base_model(base, QUANT, cpu)
    assert len(list(cache.iterdir())) == 1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_an_entry_is_on_disk_before_it_takes_its_key(base, cache, monkeypatch):
    synced, fsync = [], os.fsync

    def named_fsync(handle):
        synced.append(Path(os.readlink(f"/proc/self/fd/{handle}")))
        fsync(handle)

    monkeypatch.setattr(os, "fsync", named_fsync)
    modeling.load_base_model(base, QUANT, torch.device("cpu"))
    (entry,) = cache.iterdir()
    *files, folder = (path for path in synced if path.is_relative_to(cache.resolve()))
    assert folder.parent == cache.resolve() and folder.name.startswith(f".{entry.name}.tmp-")
    assert sorted(path.relative_to(folder) for path in files) == sorted(p.relative_to(entry) for p in entry.iterdir())

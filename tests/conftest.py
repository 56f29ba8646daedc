"""Shared fixtures: tiny tokenizers and models built in-process, so tests need nothing from a hub."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A few hundred words of real prose is enough for a tokenizer and for a loss that can fall.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Python is a programming language that lets you work quickly and integrate systems more effectively.
A list comprehension provides a concise way to create lists from other sequences and iterables.
The with statement is used to wrap the execution of a block with methods defined by a context manager.
Exceptions are raised when an error is detected, and they can be handled with try and except clauses.
Generators produce items lazily, one at a time, and remember where they left off between calls.
Dictionaries map hashable keys to values; they keep insertion order and offer fast lookups.
Functions are defined with the def keyword, take parameters, and may return a value to the caller.
Classes bundle data and behaviour; instances are created by calling the class like a function.
Modules group related code; a package is a directory of modules with a shared namespace.
"""


_QUANTIZED_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Quantized bases the stages cache go to a folder of the test run's own: not the user's cache, nor one the
    # environment names (entries this run did not write would be read in place of the loads under test).
    folder = tempfile.mkdtemp(prefix="qlorapipe-quantized-")
    config.stash[_QUANTIZED_CACHE] = os.environ["QLORAPIPE_QUANTIZED_CACHE"] = folder
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def pytest_unconfigure(config):
    shutil.rmtree(config.stash[_QUANTIZED_CACHE], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skip them, saying so, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, with BOS/EOS/pad/unk specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(arch: str, vocab_size: int, num_hidden_layers: int = 2):
    """A small model (2 layers unless told) of the given architecture with grouped-query attention."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Save a tiny random model and its tokenizer as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), num_hidden_layers))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-qwen2") / "model", "qwen2")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .jsonl corpus: each line of CORPUS, repeated so there is enough to chunk and split."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    with open(path, "w") as handle:
        for i in range(6):
            for line in lines:
                handle.write(json.dumps({"text": f"{line} ({i})"}) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir, corpus_file) -> Path:
    """models/base and data/prepared of the tiny model, made by the real download and prepare stages."""
    work = tmp_path_factory.mktemp("prepared")
    params = write_params(work / "params.yaml", tiny_params(tiny_llama_dir, corpus_file))
    load_stage("download").main(["--params", str(params), "--out", str(work / "models/base")])
    load_stage("prepare").main(["--params", str(params), "--base", str(work / "models/base"),
                                "--out", str(work / "data/prepared"), "--report", str(work / "data.json"),
                                "--lengths", str(work / "lengths.csv"), "--lengths-plot", str(work / "lengths.png")])
    return work


def tiny_lora_model(model_dir: Path, device="cpu", dropout: float = 0.0, gradient_checkpointing: bool = True,
                    load_in: str = "4bit", seed: int = 0, compute_dtype: str | None = None, bias: str = "none"):
    """A tiny model quantized as ``load_in`` with rank-8 LoRA on every linear layer, in training mode.

    B is set to small seeded values (at init it is zero, which would hide every A gradient).
    ``compute_dtype`` None is float32 on the CPU (whatever ``auto`` picks on this processor, so
    the tests' tolerances hold on every machine) and ``auto`` on a GPU.

    Returns:
        (model, compute_dtype)
    """
    import torch

    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    if compute_dtype is None:
        compute_dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    model, dtype = modeling.load_base_model(model_dir, QuantizationParams(load_in=load_in, compute_dtype=compute_dtype),
                                            torch.device(device))
    torch.manual_seed(seed)
    model = modeling.add_lora(model, LoraParams(rank=8, alpha=16, dropout=dropout, bias=bias), quantized=True,
                              gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.train()
    return model, dtype


def run_under_triton_interpreter(code: str) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1``: the Triton kernels the GPU
    runs then run on CPU tensors. The variable must be set before triton is first imported,
    hence the fresh process; ``code`` can import the test modules. Skipped where CUDA is:
    the GPU tests run the same kernels there."""
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: tests/test_acceleration_gpu.py runs the kernels on it")
    import os
    import subprocess

    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def load_stage(name: str):
    """Import stages/<name>.py as a module (stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_params(model_path: Path, corpus: Path, **overrides) -> dict:
    """params.yaml contents for a tiny, seconds-long run of the whole pipeline."""
    params = {
        "model": {"source": "local", "local_path": str(model_path), "dtype": "float32"},
        "data": {"source": "local", "path": str(corpus), "max_length": 32, "eval_fraction": 0.2, "seed": 1},
        "quantization": {"load_in": "4bit", "quant_type": "nf4", "use_double_quant": True},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 12, "per_device_batch_size": 4, "learning_rate": 0.003, "warmup_steps": 0,
                     "eval_every_steps": 6, "optimizer": "adamw_torch", "max_eval_batches": None,
                     "early_stopping_patience": 0, "checkpoint_every_steps": 0},
        "acceleration": {"memory_budget_gb": None},  # dvc.yaml declares this key for evaluate, merge, export
        "distributed": {},
        "evaluate": {"batch_size": 4, "prompts": ["Python is", "The with statement"], "max_new_tokens": 5,
                     "general_corpus": "builtin:python-docs", "general_batches": 2},
        "merge": {"dtype": "float32", "fidelity_batches": 2, "requantized_candidate": False},
        "export": {"formats": ["safetensors"]},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    return params


def train_args(params: Path, base: Path, data: Path, out: Path) -> list[str]:
    """stages/train.py's arguments, every output under ``out`` with the names the tests read."""
    return ["--params", str(params), "--base", str(base), "--data", str(data), "--adapter", str(out / "adapter"),
            "--metrics", str(out / "train.json"), "--history", str(out / "history.csv"),
            "--curves", str(out / "curves.png"), "--log", str(out / "log.txt"),
            "--checkpoints", str(out / "checkpoints"), "--live", str(out / "live")]


def write_params(path: Path, params: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def interruptible():
    """For ``subprocess.Popen(preexec_fn=...)``: the child takes Ctrl-C (SIGINT) as a terminal's foreground process
    does, whatever this process inherited. A shell starts background jobs with SIGINT ignored and a child keeps
    that (Python then never raises KeyboardInterrupt): the suite run as ``make test &`` would see an interrupted
    stage run to its end."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cmd(cmd: list[str], cwd: Path, check: bool = True):
    """Run a command with this interpreter's bin directory first on PATH (stage commands say `python`)."""
    import os
    import subprocess

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path,
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def init_project(work: Path, params: dict) -> Path:
    """A fresh git + DVC project holding this repository's pipeline and code, with ``params``."""
    tracked = run_cmd(["git", "ls-files"], ROOT).stdout.split()
    for rel in tracked:
        project_file = rel.startswith((".dvc/", "dvc.yaml", "stages/", "src/", ".dvcignore", ".gitignore"))
        if project_file and (ROOT / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
    write_params(work / "params.yaml", params)
    run_cmd(["git", "init", "-q"], work)
    run_cmd(["git", "add", "-A"], work)
    run_cmd(["git", "commit", "-qm", "init"], work)
    return work

"""GGUF files written for tiny Llama and Qwen2 models read back with the same logits and tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qlorapipe import fidelity
from qlorapipe.errors import UserError
from qlorapipe.export.gguf import (
    gguf_tensor_name,
    load_gguf,
    permute_for_rope,
    write_gguf,
)

TEXT = "Generators produce items lazily, 2026 of them, and remember where they left off!"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("file_type, max_diff", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_round_trip_keeps_logits_and_tokenizer(arch, file_type, max_diff, request, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = tmp_path / f"model-{file_type}.gguf"  # alone in its directory, as transformers reads the dir's files too
    write_gguf(model, model_dir, out, file_type)

    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight", "blk.0.attn_q.weight"} <= names
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    quantized = {t.name: t.tensor_type.name for t in reader.tensors}
    assert quantized["blk.0.attn_q.weight"] == file_type.upper() and quantized["blk.0.attn_norm.weight"] == "F32"

    gguf_model, gguf_tokenizer = load_gguf(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert gguf_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert gguf_tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (gguf_model(ids).logits - model(ids).logits).abs().max().item()
    assert diff < max_diff


def test_llama_rope_permutation_is_what_transformers_undoes():
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8 * 3, 4)  # 3 heads of dim 8
    permuted = permute_for_rope(weight, 3)
    assert not np.array_equal(permuted, weight)
    undone = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, 3, 3)
    assert np.array_equal(undone, weight)


def test_tensor_names_follow_llama_cpp_and_unknown_ones_are_refused():
    assert gguf_tensor_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(UserError, match="no GGUF name for parameter model.layers.0.mlp.experts.0.weight"):
        gguf_tensor_name("model.layers.0.mlp.experts.0.weight")


def test_a_sentencepiece_tokenizer_is_refused_with_the_file_named(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["model"]["type"] = "Unigram"
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(UserError, match=f"export.formats gguf-f16: GGUF files are written for byte-level BPE "
                                        f"tokenizers; {model_dir}/tokenizer.json is Unigram"):
        write_gguf(model, model_dir, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_itself_runs_the_written_file_as_transformers_runs_the_model(arch, request, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe.export import llama_worker

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    write_gguf(model, model_dir, tmp_path / "model-f16.gguf", "f16")
    llm = llama_worker.load(tmp_path / "model-f16.gguf", n_ctx=64)
    try:
        ids = tokenizer(TEXT)["input_ids"]
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids  # digits, punctuation, spaces
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 2e-3


def test_fewer_positions_at_once_give_the_logits_of_all_at_once(tiny_qwen2_dir, tmp_path):
    """The check computes fewer positions at once on a GPU when that takes the whole file there
    (``plan_layers``): llama.cpp gives every position's logits all the same."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe.export import llama_worker

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    write_gguf(model, tiny_qwen2_dir, tmp_path / "model-f16.gguf", "f16")
    ids = AutoTokenizer.from_pretrained(tiny_qwen2_dir)(TEXT)["input_ids"]
    scores = {}
    for ubatch in (None, 4):
        llm = llama_worker.load(tmp_path / "model-f16.gguf", n_ctx=64, n_ubatch=ubatch)
        try:
            llm.eval(ids)
            scores[ubatch] = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
    assert len(ids) > 4 * 2 and np.abs(scores[4] - scores[None]).max() < 1e-4


def test_without_extra_cpu_buffers_a_q8_0_file_gives_the_same_logits(tiny_llama_dir, tmp_path, monkeypatch):
    """Where llama.cpp's build uses Intel AMX, the worker loads files without extra CPU buffer types (its AMX
    matrix product crashed on the first token of q8_0 files: ``without_amx``); the logits stay the same."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorapipe.export import llama_worker

    low = llama_cpp.llama_cpp
    monkeypatch.setattr(low, "llama_model_default_params", low.llama_model_default_params)  # restored after
    amx_build = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    write_gguf(model, tiny_llama_dir, tmp_path / "model-q8_0.gguf", "q8_0")
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(TEXT)["input_ids"]
    scores = {}
    for forced in (False, True):
        if forced:
            assert llama_worker.without_amx(llama_cpp, force=True)
        llm = llama_worker.load(tmp_path / "model-q8_0.gguf", n_ctx=64)
        try:
            assert llm.model_params.use_extra_bufts == (not forced and not amx_build)
            llm.eval(ids)
            scores[forced] = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
    assert np.isfinite(scores[True]).all() and np.abs(scores[True] - scores[False]).max() < 1e-3


def test_a_file_llama_cpp_cannot_load_or_quantize_is_named_in_one_line(tmp_path):
    from qlorapipe.export import llama_worker, llamacpp

    broken = tmp_path / "model-f16.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(UserError, match=f"^llama.cpp refuses to load {broken}: ") as info:
        llama_worker.load(broken, n_ctx=64)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=f"^export.formats gguf-q4_k_m: llama.cpp's quantizer failed on {broken}"):
        llamacpp.quantize(broken, tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-f16.gguf"]


def test_llama_cpp_q8_0_is_the_python_writers_q8_0_byte_for_byte(tiny_qwen2_dir, tmp_path):
    """The export quantizes q8_0 with llama.cpp (on every core); it writes what the Python writer writes."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qlorapipe.export import llamacpp

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float16)
    write_gguf(model, tiny_qwen2_dir, tmp_path / "f16.gguf", "f16")
    write_gguf(model, tiny_qwen2_dir, tmp_path / "written.gguf", "q8_0")
    llamacpp.quantize(tmp_path / "f16.gguf", tmp_path / "quantized.gguf", "q8_0")
    written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "written.gguf")).tensors}
    quantized = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "quantized.gguf")).tensors}
    assert sorted(written) == sorted(quantized)
    assert written["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert [n for n in written if written[n].tensor_type != quantized[n].tensor_type
            or not np.array_equal(np.asarray(written[n].data), np.asarray(quantized[n].data))] == []


def test_llama_cpp_gets_the_gpu_blocks_the_budget_holds(tiny_qwen2_dir, tmp_path):
    """The blocks and output layer are read from the file; llama.cpp offloads the last blocks first."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from qlorapipe.export import llama_worker

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float16)
    write_gguf(model, tiny_qwen2_dir, tmp_path / "f16.gguf", "f16")
    blocks, output, vocab = llama_worker.tensor_bytes(tmp_path / "f16.gguf")
    tensors = gguf.GGUFReader(str(tmp_path / "f16.gguf")).tensors
    assert len(blocks) == model.config.num_hidden_layers and vocab == model.config.vocab_size
    assert sum(blocks) == sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk."))
    # The header read that skips the metadata gives what gguf's reader gives, tensor by tensor.
    assert llama_worker.tensor_index(tmp_path / "f16.gguf") == [
        (t.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in tensors]
    assert output == 2 * model.config.vocab_size * model.config.hidden_size  # tied: the f16 token embeddings

    assert llama_worker.layers_within([10, 20, 30], 5, free=65) == 4  # every block and the output layer
    assert llama_worker.layers_within([10, 20, 30], 5, free=64) == 3  # every block, not the output layer
    assert llama_worker.layers_within([10, 20, 30], 5, free=59) == 2  # 30 + 20 from the end
    assert llama_worker.layers_within([10, 20, 30], 5, free=29) == 0
    assert llama_worker.gpu_plan(tmp_path / "f16.gguf", 64, free_bytes=None) == (0, 64)  # on a CPU: all of it


def test_fewer_positions_at_once_take_the_output_layer_to_the_gpu_only_when_that_fits_the_whole_file():
    """Qwen2.5-3B's f16 file in 7.5 GB: at 520 positions at once the logits' buffers keep its 0.62 GB output
    layer on the CPU; at 256 the whole file fits."""
    from qlorapipe.export import llama_worker

    blocks, output, vocab, n_ctx = [154.3e6] * 36, 622e6, 151_936, 520
    slack = llama_worker.CONTEXT_BYTES + 400e6

    def buffers(ubatch):
        return 2 * ubatch * vocab * 4 + slack

    whole = sum(blocks) + output
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, whole + buffers(n_ctx)) == (37, n_ctx)
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, 7.5e9) == (37, 256)
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, whole + buffers(128)) == (37, 128)
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, whole + buffers(64)) == (37, 64)
    # Not whole even at 64 positions: every position at once, the blocks that fit beside that buffer.
    short = whole + buffers(64) - 1
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, short) == (36, n_ctx)
    assert llama_worker.plan_layers(blocks, output, vocab, n_ctx, 3e9) == (
        llama_worker.layers_within(blocks, output, 3e9 - buffers(n_ctx)), n_ctx)
    # A context of fewer positions than a smaller batch would hold is computed at once.
    assert llama_worker.plan_layers(blocks, output, vocab, 200, whole + buffers(128)) == (37, 128)
    assert llama_worker.plan_layers(blocks, output, vocab, 100, whole + buffers(64)) == (37, 64)
    assert llama_worker.plan_layers(blocks, output, vocab, 64, whole + buffers(64)) == (37, 64)


def test_llama_cpp_runs_in_a_process_without_torch_and_loads_before_numpy():
    """A CUDA build of llama.cpp crashed (SIGSEGV, H200) loading any model in a process that had imported
    numpy before llama.cpp's library (torch imports numpy); loaded first, it ran."""
    import subprocess
    import sys

    code = ("import sys; from qlorapipe.export import llama_worker; llama_worker.main(['usage']); "
            "names = list(sys.modules); print('torch' in names, names.index('llama_cpp.llama_cpp') < names.index('numpy'))")
    found = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True).stdout
    assert found.split() == ["False", "True"]


def test_a_llama_cpp_crash_is_one_line_naming_the_file_and_its_last_words(tmp_path):
    import tempfile

    from qlorapipe.export import llamacpp

    with tempfile.TemporaryFile() as errors:
        errors.write(b"ggml_cuda_init: found 1 CUDA devices\n  Device 0: NVIDIA H200\n\n")
        with pytest.raises(llamacpp.Crashed, match=r"^llama.cpp stopped with exit status -11 on m.gguf "
                                                   r"\(Device 0: NVIDIA H200\); drop its format"):
            llamacpp._raise_reported(-11, errors, Path("m.gguf"))
    with tempfile.TemporaryFile() as errors:
        errors.write(b"some log\nerror: llama.cpp refuses to load m.gguf: bad magic\n")
        with pytest.raises(UserError, match="^llama.cpp refuses to load m.gguf: bad magic$") as info:
            llamacpp._raise_reported(1, errors, Path("m.gguf"))
        assert not isinstance(info.value, llamacpp.Crashed)


def test_the_gpu_memory_llama_cpp_reports_is_read_from_its_own_log():
    """gpu_gb is what llama.cpp says it reserved on the GPU (weights, KV cache, compute buffer), read from
    its log lines as a CUDA build writes them; host buffers (pinned or not) are not counted."""
    from qlorapipe.export import llamacpp

    log = """load_tensors: offloaded 37/37 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   315.30 MiB
load_tensors:        CUDA0 model buffer size =  2967.03 MiB
llama_context:  CUDA_Host  output buffer size =     0.58 MiB
llama_kv_cache:      CUDA0 KV buffer size =    18.00 MiB
sched_reserve:      CUDA0 compute buffer size =   300.75 MiB
sched_reserve:  CUDA_Host compute buffer size =     5.01 MiB
sched_reserve:      CUDA0 compute buffer size =   296.00 MiB
~llama_context:      CUDA0 compute buffer size is 300.7500 MiB, matches expectation of 300.7500 MiB
"""
    buffers = llamacpp.buffers_mb(log)
    assert buffers == {"CPU_Mapped": 315.3, "CUDA0": 3285.78, "CUDA_Host": 5.59}  # a buffer logged twice: once
    assert llamacpp.device_mb(buffers) == 3285.78
    assert llamacpp.buffers_mb("load_tensors: loading model tensors, this can take a while") == {}


def test_a_crash_with_blocks_on_the_gpu_runs_the_file_again_on_the_cpu(tiny_qwen2_dir, monkeypatch, caplog, tmp_path):
    """A CUDA build of llama.cpp that crashes with blocks on the GPU: the stage checks the file on the CPU."""
    import torch
    from transformers import AutoTokenizer

    from qlorapipe.export import llamacpp

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    batch = torch.tensor([[1, 2, 3, 4]])
    reference = [torch.randn(1, 4, 32)]
    specs = []

    def run_check(spec, gguf_file, batches, reference_logits, scored):
        specs.append(spec)
        if spec["free_bytes"] is not None:
            raise llamacpp.Crashed("llama.cpp stopped with exit status -11 on m.gguf (load_tensors)")
        found = {"continuations": [[[5, 6], None]], "tokenizer_matches": True, "chat_rendering": None, "eog": [],
                 "seconds": {"load": 0.1}}
        result = fidelity.compare(reference_logits, [reference_logits[0].clone()], batches)
        return {"vocab": 32, "gpu_layers": 0, "n_ubatch": 8, "buffers_mb": {"CPU_Mapped": 0.1}}, result, found

    monkeypatch.setattr(llamacpp, "_run_check", run_check)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1e9)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # only its size is read here
    found = llamacpp.check_file(tmp_path / "m.gguf", tokenizer, reference, [batch], [[1, 2]],
                                [llamacpp.Continuation([5, 6], None)], 2, torch.device("cuda", 0), 8e9, threads=3)
    assert [spec["free_bytes"] for spec in specs] == [7e9, None]  # the budget beside torch's, then the CPU
    assert [spec["threads"] for spec in specs] == [3, 3]
    assert found["gpu_layers"] == 0 and found["n_ubatch"] == 8
    assert found["max_logit_diff"] == 0 and found["token_agreement"] == 1.0
    assert "running m.gguf on the CPU instead" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_f16_files_hold_each_weight_rounded_once_from_its_exact_value(arch, dtype, request, tmp_path):
    """The writer converts with torch straight to float16 (no float32 copy, no numpy conversion): each
    2-D weight is what rounding its exact float32 value to float16 gives, norms and biases float32."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    write_gguf(model, model_dir, tmp_path / "m.gguf", "f16")
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    config = model.config
    checked = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_tensor_name(hf_name)
        expected = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in name:
            expected = permute_for_rope(expected, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            expected = permute_for_rope(expected, config.num_key_value_heads)
        expected = expected.astype(np.float32 if expected.ndim == 1 else np.float16)
        assert written[name].dtype == expected.dtype and np.array_equal(written[name].reshape(expected.shape), expected)
        checked += 1
    assert checked == len(written)


def test_reference_continuations_in_one_batch_are_those_one_prompt_at_a_time(tiny_llama_dir):
    """Base + adapter as trained (4-bit, LoRA) continues the parity prompts in one left-padded batch."""
    import torch

    from qlorapipe import greedy, modeling
    from qlorapipe.export import llamacpp
    from qlorapipe.params import LoraParams, QuantizationParams

    base, _ = modeling.load_base_model(tiny_llama_dir, QuantizationParams(), torch.device("cpu"))
    model = modeling.add_lora(base, LoraParams(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                              quantized=True, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    prompts = [[5, 17, 42, 9, 3, 77, 21], [8, 2], [11, 12, 13, 14]]
    stops = {0, 2}
    batched = llamacpp.reference_continuations(model, prompts, 10, stops, None, "cpu")
    one_by_one = [llamacpp.reference_continuations(model, [p], 10, stops, None, "cpu")[0] for p in prompts]
    assert batched == one_by_one
    raw = greedy.generate(model, prompts, 10, 3, "cpu", stops, None)
    assert len({len(tokens) for tokens in raw}) == 1  # a row that stopped first is padded to the batch's length
    assert [llamacpp.continuation(tokens, stops.__contains__) for tokens in raw] == batched


def test_a_check_beside_the_quantizer_computes_on_the_cores_it_leaves(tiny_qwen2_dir, tmp_path):
    """While llama.cpp still quantizes a file in the background, a check gets the other cores (llama.cpp's
    threads wait on each other: sharing cores slowed a 7B check four times); once it is done, all of them."""
    from concurrent.futures import Future

    import torch
    from transformers import AutoModelForCausalLM

    from qlorapipe.export import llama_worker, threads_beside

    quantizing, done = Future(), Future()
    done.set_result(None)
    assert threads_beside({"q8_0": quantizing}, 16, 8) == 8
    assert threads_beside({"q4_k_m": quantizing}, 3, 1) == 2
    assert threads_beside({"q8_0": done}, 16, 8) is None and threads_beside({}, 16, 8) is None
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    write_gguf(model, tiny_qwen2_dir, tmp_path / "m.gguf", "f16")
    for threads, expected in ((1, 1), (None, os.cpu_count())):
        llm = llama_worker.load(tmp_path / "m.gguf", n_ctx=32, threads=threads)
        try:
            assert llm.context_params.n_threads == llm.context_params.n_threads_batch == expected
        finally:
            llm.close()


def test_a_reference_continuation_ends_where_the_file_ends_generation():
    """A base trained on chat data answers "...<|im_end|>\\n<|endoftext|>": llama.cpp ends at <|im_end|> (one of
    its end-of-generation tokens), and the trained model's continuation is compared as ending there too."""
    from qlorapipe.export.llamacpp import Continuation, ended_at

    im_end, newline, eos = 7, 8, 2
    trained = Continuation([40, 41, im_end, newline, eos], 4)  # stopped on its EOS
    assert ended_at(trained, {im_end, eos}) == Continuation([40, 41, im_end], 2)
    assert ended_at(trained, {eos}) == trained  # the file ends only on EOS: compared as it is
    unstopped = Continuation([40, im_end, 41], None)
    assert ended_at(unstopped, {im_end}) == Continuation([40, im_end], 1)
    assert ended_at(Continuation([40, 41], None), {im_end}) == Continuation([40, 41], None)


def test_a_tokenizer_without_bos_takes_the_configs_as_llama_cpps_converter_does(tmp_path, tiny_qwen2_dir):
    """Qwen2's tokenizer has no BOS; without the key llama.cpp would name its BPE default (id 11) as BOS."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from qlorapipe.export.gguf import tokenizer_metadata

    model_dir = tmp_path / "qwen2"
    shutil.copytree(tiny_qwen2_dir, model_dir)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": None}))
    config = json.loads((model_dir / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(model_dir).bos_token_id is None and isinstance(config["bos_token_id"], int)
    found = tokenizer_metadata(model_dir, config["vocab_size"])
    assert found["bos"] == config["bos_token_id"] and found["add_bos"] is False


def test_the_pre_tokenizer_is_named_only_when_its_rule_is_one_llama_cpp_knows():
    """llama.cpp splits text by the name the file carries: a guessed name would tokenize otherwise."""
    from qlorapipe.compat import gguf_pre_tokenizer

    # as Qwen2.5's and Llama 3's tokenizer.json spell their split rules
    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+")
    llama3 = qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

    def split_then_bytes(pattern):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert gguf_pre_tokenizer(split_then_bytes(qwen2)) == "qwen2"
    assert gguf_pre_tokenizer(split_then_bytes(llama3)) == "llama-bpe"
    assert gguf_pre_tokenizer(byte_level) == "gpt-2"
    assert gguf_pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    # DeepSeek LLM's rules (newlines apart, its own letters and digits): no name the writer knows
    assert gguf_pre_tokenizer(split_then_bytes(r"[\r\n]|\s?[A-Za-z]+|\p{N}{1,3}|\s+")) is None
    assert gguf_pre_tokenizer({"type": "Metaspace", "replacement": "\u2581"}) is None
    assert gguf_pre_tokenizer(None) is None


def test_compat_refuses_gguf_for_a_pre_tokenizer_without_a_name(tmp_path, tiny_llama_dir):
    import json
    import shutil

    from transformers import AutoConfig

    from qlorapipe.compat import gguf_problem

    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m/tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"[\r\n]|\s?[A-Za-z]+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "m/tokenizer.json").write_text(json.dumps(spec))
    problem = gguf_problem(AutoConfig.from_pretrained(tmp_path / "m"), tmp_path / "m")
    assert problem.startswith(f"GGUF files name how llama.cpp splits text before BPE, and {tmp_path / 'm'}")
    assert "(qwen2, llama-bpe, smollm, gpt-2)" in problem
    assert gguf_problem(AutoConfig.from_pretrained(tiny_llama_dir), tiny_llama_dir) is None


def test_a_stop_mismatch_is_a_stop_missed_or_added_where_the_tokens_agreed():
    """A file that runs on where the trained model stops (or stops where it runs on) with the same tokens before
    it is a mismatch; continuations that parted before either stopped differ in tokens, not in their ends."""
    from qlorapipe.export.llamacpp import Continuation, stop_mismatch

    eos = 2
    trained = Continuation([40, 41, eos], 2)
    assert not stop_mismatch(trained, Continuation([40, 41, eos], 2))
    assert stop_mismatch(trained, Continuation([40, 41, 42, 43], None))  # an end of generation missed
    assert stop_mismatch(trained, Continuation([40, eos], 1))  # one added
    assert stop_mismatch(Continuation([40, 41, 42], None), Continuation([40, 41, eos], 2))
    assert not stop_mismatch(trained, Continuation([40, 50, 51, 52], None))  # parted at the second token
    assert not stop_mismatch(trained, Continuation([50, eos], 1))
    assert not stop_mismatch(Continuation([40, 41], None), Continuation([40, 41], None))

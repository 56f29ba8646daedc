"""Writing a merged Llama or Qwen2 model as a GGUF file (f16 or q8_0) for llama.cpp and friends.

Tensor names, metadata keys and the Llama Q/K row permutation follow llama.cpp's
convert_hf_to_gguf.py, the layout llama.cpp reads; transformers reads it too
(``from_pretrained(dir, gguf_file=...)``), which is how the export stage verifies it.
The tokenizer travels as metadata (``tokenizer.ggml.*``): vocabulary, merges, token types,
special token ids and the chat template. Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM,
GPT-2 style) are supported; sentencepiece vocabularies are refused with a message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qlorapipe.compat import GGUF_ARCHITECTURES, gguf_pre_tokenizer, gguf_problem
from qlorapipe.errors import UserError

logger = logging.getLogger(__name__)

# Hugging Face parameter name (after "model.layers.{i}.") -> GGUF tensor name (after "blk.{i}.").
_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face parameter, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight.

    Raises:
        UserError: a parameter with no GGUF counterpart (an architecture we do not support).
    """
    stem, _, kind = hf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK_TENSORS:
        return f"blk.{parts[2]}.{_BLOCK_TENSORS[parts[3]]}.{kind}"
    raise UserError(f"GGUF export: no GGUF name for parameter {hf_name}; only {', '.join(GGUF_ARCHITECTURES)} are supported")


def permute_for_rope(weight, n_head: int):
    """Reorder Q/K rows from Hugging Face's rotate-half layout to llama.cpp's interleaved one (Llama only).

    As convert_hf_to_gguf.py's LlamaModel.permute; transformers undoes it on load.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _config_bos(model_dir: Path) -> int | None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    bos = config.get("bos_token_id")
    return bos if isinstance(bos, int) else None


def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict:
    """The tokenizer of ``model_dir`` (one ``gguf_problem`` accepts) as GGUF metadata values.

    Returns:
        dict with tokens, token_types, merges, pre, special ids, add_bos and chat_template.

    Raises:
        UserError: more tokens than the model has embedding rows.
    """
    from transformers import AutoTokenizer

    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    model = spec.get("model", {})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if len(by_id) > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {len(by_id)} tokens, more than the model's vocab_size "
                        f"{vocab_size}")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows with no token, as llama.cpp pads them
            tokens.append(f"[PAD{index}]")
            types.append(_UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(_CONTROL if added[index].get("special") else _USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "pre": gguf_pre_tokenizer(spec.get("pre_tokenizer")),  # gguf_problem refused a pre-tokenizer without name
        # Qwen2's tokenizer has no BOS; llama.cpp's converter then takes config.json's (else llama.cpp would
        # name its BPE default, id 11, as BOS)
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _config_bos(model_dir),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def write_gguf(model, model_dir: Path, out_file: Path, file_type: str) -> None:
    """Write ``model`` (a merged Llama or Qwen2 transformers model) and its tokenizer as one GGUF file.

    Args:
        model: the model whose weights are written.
        model_dir: the directory it was loaded from (for tokenizer.json).
        out_file: the .gguf file to write.
        file_type: f16 (2-D weights in float16) or q8_0 (2-D weights in 8-bit blocks of 32).

    Raises:
        UserError: an unsupported architecture, rope scaling or tokenizer.
    """
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch = config.model_type
    why = gguf_problem(config, model_dir)
    if why:
        raise UserError(f"export.formats gguf-{file_type}: {why}; keep safetensors and adapter only")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tok = tokenizer_metadata(model_dir, config.vocab_size)

    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or model_dir).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    writer.add_token_merges(tok["merges"])
    for key, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if tok[key] is not None:
            adder(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = gguf_tensor_name(hf_name)
        quantized = file_type == "q8_0" and tensor.ndim > 1 and tensor.shape[-1] % 32 == 0
        # Norms and biases stay float32, as in llama.cpp; the rest is converted once, by torch (on every
        # core; a float16 model's weights not at all), to the dtype written: the same values as going
        # through float32, where numpy's float16 conversion ran on one core.
        wanted = torch.float32 if tensor.ndim == 1 or quantized else torch.float16
        data = tensor.detach().to("cpu", wanted).numpy()
        if arch == "llama" and ".attn_q." in name:
            data = permute_for_rope(data, n_head)
        elif arch == "llama" and ".attn_k." in name:
            data = permute_for_rope(data, n_kv)
        if quantized:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("Wrote %s (%s, %.1f MB)", out_file, file_type, Path(out_file).stat().st_size / 1e6)


def load_gguf(gguf_file: Path, dtype=None):
    """Read a GGUF file back with transformers (dequantized): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)

"""ONNX Runtime GenAI models: built from the merged model by onnxruntime-genai's own model builder, and
checked in ONNX Runtime itself against the trained model.

``build`` runs the builder (``python -m onnxruntime_genai.models.builder``) in a process of its own,
for ONNX Runtime's CPU execution provider, in 32-bit floats or with its 8- or 4-bit weight quantization
(``MatMulNBits``). The result is a folder ONNX Runtime GenAI loads as it is: ``model.onnx``, its weights in
``model.onnx.data``, ``genai_config.json``, the tokenizer and the chat template.

``check_model`` measures it as ``llamacpp.check_file`` measures a GGUF file:

- logits on held-out rows (ONNX Runtime's ``InferenceSession`` on the decoder, an empty key-value cache)
  against the merged model: largest and mean difference, perplexity and its change;
- greedy continuations of held-out prompts by ONNX Runtime GenAI's generator (the program that serves
  these folders) against base + adapter as trained: agreement, and whether and where each stops on the
  end-of-sequence ids the folder's ``genai_config.json`` names;
- the tokenizer (ids of held-out text) and the chat template (a probe conversation) against transformers'.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlorapipe import fidelity, onnx_builder
from qlorapipe.errors import UserError
from qlorapipe.export.llamacpp import (
    PROBE_CONVERSATION,
    Continuation,
    agreement,
    continuation,
    stop_mismatch,
)

logger = logging.getLogger(__name__)

_PACKAGES = {"onnxruntime_genai": "onnxruntime-genai", "onnxruntime": "onnxruntime", "onnx_ir": "onnx-ir",
             "onnx": "onnx"}


def require() -> None:
    """Refuse ONNX formats before any file is written when the packages that build and run them are missing.

    Raises:
        UserError: naming the missing package.
    """
    missing = [package for module, package in _PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"export.formats onnx-*: {', '.join(missing)} not installed; run `make install` "
                        "(or pip install -e .) again, or drop the onnx formats")


def check_builder_options(options: dict[str, dict], precisions: list[str]) -> None:
    """Refuse, before any file is written, option names the installed builder does not document: it would
    ignore them without a word (``onnx_builder.unknown_options_problem``, as the check stage asks).

    Raises:
        UserError: naming the key and the builder's nearest option.
    """
    if problem := onnx_builder.unknown_options_problem(options, precisions):
        raise UserError(problem)


def build(merged: Path, out_dir: Path, precision: str, options: dict | None = None) -> None:
    """Build the ONNX Runtime GenAI folder ``out_dir`` from the merged model directory ``merged``; ``options``:
    the builder's ``--extra_options`` (for example ``{"algo_config": "k_quant"}``).

    Raises:
        UserError: the builder failed; its own error line says why.
    """
    logger.info("Building onnx-%s with onnxruntime-genai's model builder%s", precision,
                f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
    with tempfile.TemporaryDirectory(prefix="onnx-build-") as scratch:
        log = Path(scratch) / "builder.log"
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out_dir),
                   "-p", precision, "-e", "cpu", "-c", str(Path(scratch) / "cache")]
        if options:
            command += ["--extra_options", *(f"{key}={option_value(value)}" for key, value in options.items())]
        with log.open("wb") as sink:  # unbuffered: its prints and its traceback in the order they happened
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                                       "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            raise UserError(f"onnx-{precision}: onnxruntime-genai's model builder failed on {merged}: "
                            f"{_why(log.read_text(errors='replace'), done.returncode)}")


def option_value(value) -> str:
    """A builder option's value as its command line spells it (true/false, not Python's True/False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _why(log: str, returncode: int) -> str:
    """The builder's own error line (the last ``SomethingError: ...`` it printed), or how it ended."""
    if returncode < 0:
        return f"killed by signal {-returncode} (out of memory?)"
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return (errors or lines or [f"exit status {returncode}"])[-1]


def check_model(model_dir: Path, tokenizer, reference_logits: list, batches: list, prompts: list[list[int]],
                reference: list[Continuation], max_new_tokens: int, scored: list | None = None) -> dict:
    """Run the ONNX Runtime GenAI folder ``model_dir`` (named by its precision) and measure it against the
    trained model (see the module docstring).

    Returns:
        The metrics for metrics/export.json.

    Raises:
        UserError: ONNX Runtime cannot load or run the folder (some builder options write graphs it refuses), or
            its logits are not one row per position (builder options that prune or remove the output layer).
    """
    started = time.perf_counter()
    label = f"onnx-{model_dir.name}"
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    result = _logits_comparison(label, model_dir, config, reference_logits, batches, scored)
    logits_seconds = time.perf_counter() - started
    continuations, tokens_match, chat_matches = _generator_checks(label, model_dir, config, tokenizer, batches,
                                                                  prompts, max_new_tokens)
    metrics = {
        **result.as_metrics(),
        "size_mb": round(sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 1e6, 2),
        "token_agreement": round(sum(agreement(r, c) for r, c in zip(reference, continuations))
                                 / max(len(prompts), 1), 4),
        "stops_trained": sum(r.stop is not None for r in reference),
        "stops_onnx": sum(c.stop is not None for c in continuations),
        "stop_mismatches": sum(stop_mismatch(r, c) for r, c in zip(reference, continuations)),
        "tokenizer_matches": tokens_match,
        "chat_template_matches": chat_matches,
        "seconds": {"logits": round(logits_seconds, 3),
                    "generator": round(time.perf_counter() - started - logits_seconds, 3)},
    }
    logger.info("%s in ONNX Runtime: perplexity change %+.3f%% against the merged model, greedy agreement %.1f%% "
                "with base + adapter, %d stop mismatch(es)", model_dir.name, 100 * result.perplexity_change,
                100 * metrics["token_agreement"], metrics["stop_mismatches"])
    return metrics


@contextlib.contextmanager
def _runtime_errors(label: str):
    """ONNX Runtime's and its GenAI generator's own errors, said in one line naming the format."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # onnxruntime raises its own types
        first = (str(error).strip().splitlines() or [""])[0]
        raise UserError(f"{label}: ONNX Runtime cannot run what the builder wrote ({type(error).__name__}: {first}); "
                        "try other export.onnx_builder_options") from error


def _logits_comparison(label: str, model_dir: Path, config: dict, reference_logits: list, batches: list,
                       scored: list | None):
    """The decoder's logits on ``batches`` (ONNX Runtime, all positions of one row at once from an empty cache)
    compared with ``reference_logits``."""
    import numpy as np
    import onnxruntime
    import torch

    decoder = config["decoder"]
    names = decoder["inputs"]
    if not {"input_ids", "attention_mask"} <= set(names) or "logits" not in decoder["outputs"]:
        raise UserError(f"{label}: the model takes no token ids or gives no logits (genai_config.json: inputs "
                        f"{sorted(names)}, outputs {sorted(decoder['outputs'])}); drop exclude_embeds / "
                        "exclude_lm_head from export.onnx_builder_options")
    with _runtime_errors(label):
        session = onnxruntime.InferenceSession(str(model_dir / decoder["filename"]),
                                               providers=["CPUExecutionProvider"])
    past = {names[key] % layer for key in ("past_key_names", "past_value_names")
            for layer in range(decoder["num_hidden_layers"])}
    cache_dtypes = {spec.name: np.float16 if spec.type == "tensor(float16)" else np.float32
                    for spec in session.get_inputs() if spec.name in past}
    comparison = fidelity.Comparison()
    for reference, batch, mask in zip(reference_logits, batches, fidelity.each_batch(scored, batches)):
        for row in range(batch.shape[0]):  # a row at a time: one row's float32 logits held, not the batch's
            ids = batch[row : row + 1].numpy().astype(np.int64)
            feed = {names["input_ids"]: ids, names["attention_mask"]: np.ones_like(ids)}
            if "position_ids" in names:
                feed[names["position_ids"]] = np.arange(ids.shape[1], dtype=np.int64)[None]
            for name, dtype in cache_dtypes.items():  # an empty cache: every position computed at once
                feed[name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype)
            with _runtime_errors(label):
                (logits,) = session.run([decoder["outputs"]["logits"]], feed)
            if logits.shape != tuple(reference[row : row + 1].shape):
                raise UserError(f"{label}: ONNX Runtime gives logits of shape {list(logits.shape)} for "
                                f"{ids.shape[1]} tokens, not one row per position; drop prune_lm_head from "
                                "export.onnx_builder_options")
            comparison.add(reference[row : row + 1], torch.from_numpy(logits), batch[row : row + 1],
                           None if mask is None else mask[row : row + 1])
            del logits
    del session
    return comparison.result()


def _generator_checks(label: str, model_dir: Path, config: dict, tokenizer, batches: list, prompts: list[list[int]],
                      max_new_tokens: int) -> tuple[list[Continuation], bool, bool | None]:
    """ONNX Runtime GenAI's greedy continuations of ``prompts``, whether its tokenizer splits held-out text as
    transformers' does, and whether it renders a probe conversation as transformers does (None: the tokenizer
    has no chat template)."""
    import onnxruntime_genai as og

    eos = config.get("eos_token_id")
    stops = {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
    continuations = []
    with _runtime_errors(label):
        model = og.Model(str(model_dir))
        for prompt in prompts:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            tokens = []
            while not generator.is_done() and len(tokens) < max_new_tokens:
                generator.generate_next_token()
                tokens.append(int(generator.get_next_tokens()[0]))
            del generator
            continuations.append(continuation(tokens, stops.__contains__))
        own = og.Tokenizer(model)
        texts = [tokenizer.decode(b[0], skip_special_tokens=True) for b in batches]
        tokens_match = all(own.encode(text).tolist() == tokenizer(text)["input_ids"] for text in texts)
    chat_matches = _chat_matches(own, tokenizer) if getattr(tokenizer, "chat_template", None) else None
    del own, model
    return continuations, tokens_match, chat_matches


def _chat_matches(own, tokenizer) -> bool:
    """Whether ONNX Runtime GenAI's tokenizer renders the probe conversation as transformers does; a template that
    refuses a system turn (Gemma's) is probed without it. A rendering it cannot do is a mismatch."""
    from jinja2 import TemplateError

    for conversation in (PROBE_CONVERSATION, PROBE_CONVERSATION[1:]):
        try:
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:  # the template's own raise_exception: probed without the system turn
            logger.debug("The chat template refuses the probe conversation (%s)", error)
            continue
        try:
            return own.apply_chat_template(json.dumps(conversation), add_generation_prompt=True) == expected
        except Exception as error:  # noqa: BLE001 - said in the log, and the gate names the mismatch
            logger.warning("ONNX Runtime GenAI cannot render the chat template: %s", error)
            return False
    return False

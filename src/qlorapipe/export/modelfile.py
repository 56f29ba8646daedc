"""An Ollama Modelfile for an exported GGUF file: FROM, the chat template as TEMPLATE, stops, sampling.

Ollama renders prompts with a Go text/template, not with the Jinja chat template the GGUF carries
(https://github.com/ollama/ollama/blob/main/docs/template.md). Jinja cannot be translated into Go
in general, so the template is not parsed: transformers renders it on probe conversations, and the
text around each message's content gives the per-role prefix and suffix, the generation prompt and
whatever comes before a first message that is not a system message (a default system prompt). The
TEMPLATE is built from those strings, then rendered by ``render_ollama_template`` (an evaluator of
the Go subset written here) on check conversations; it must give exactly what transformers renders,
or the template is refused with a ``UserError``.

Ollama has no add_generation_prompt: a prompt always asks for the next assistant message, and a
conversation that ends with an assistant message is continued from where it stops (prefill), which
is transformers' ``continue_final_message``. The TEMPLATE follows both rules, as Ollama's own
templates do (the ``$last`` index trick).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.export.go_template import render_ollama_template
from qlorapipe.outputs import write_text_atomic

OLLAMA_TEMPLATE_DOCS = "https://github.com/ollama/ollama/blob/main/docs/template.md"

# With no generation_config: near the greedy samples the evaluate stage writes, with a little randomness;
# repeat_penalty 1 (off, as in transformers) whatever the Ollama version's own default is.
GREEDY_ISH = {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.0}
# What transformers' generate uses for keys a generation_config leaves out (Ollama's defaults differ):
# GenerationConfig._get_default_generation_params.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0}

# Probe contents: distinct, no whitespace (some templates trim content), no substring of another.
_SYSTEM, _SYSTEM2 = "QPSYSTEMONE", "QPSYSTEMTWO"
_USER, _USER2 = "QPUSERONE", "QPUSERTWO"
_ASSISTANT = "QPASSISTANTONE"

# (messages, how Ollama renders them): "generate" asks for the next assistant message, "continue"
# continues the last one. Rendering the TEMPLATE must give transformers' string for each.
CHECK_CONVERSATIONS = [
    ([{"role": "user", "content": "What does the with statement do?"}], "generate"),
    ([{"role": "system", "content": "Answer in one sentence."},
      {"role": "user", "content": "What is a generator?"}], "generate"),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Define a list."},
      {"role": "assistant", "content": "A mutable sequence."},
      {"role": "user", "content": "And a tuple?"}], "generate"),
    ([{"role": "user", "content": "Name a keyword."},
      {"role": "assistant", "content": "def"},
      {"role": "user", "content": "Another one."},
      {"role": "assistant", "content": "The keyword"}], "continue"),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Say hi."},
      {"role": "assistant", "content": "Hi"}], "continue"),
]
# A system message after the first one; checked only where the Jinja template renders it as a message of its own.
MID_SYSTEM_CONVERSATION = ([{"role": "user", "content": "Hello."},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "system", "content": "From now on, answer in French."},
                            {"role": "user", "content": "How are you?"}], "generate")


@dataclass(frozen=True)
class Turn:
    """What a chat template writes around one message's content."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class ChatFormat:
    """A per-message chat template, as strings (BOS already left out where llama.cpp adds it).

    ``head`` comes before a first message that is not a system message (e.g. a default system
    prompt, then ``default_system`` is its content); ``first_system`` renders a system message at
    position 0, ``system`` one further on.
    """

    bos: str  # the BOS text the Jinja template writes and llama.cpp adds by itself ("" if none)
    head: str
    first_system: Turn
    system: Turn
    user: Turn
    assistant: Turn
    generation: str
    default_system: str | None
    trims_content: bool  # the Jinja template strips whitespace around content; Go templates cannot
    later_system_guessed: bool  # the Jinja template refuses a later system message or moves it: ``system`` is a guess


class _NotPerMessage(Exception):
    """The chat template is not a per-message prefix/suffix kind (the reason is the message)."""


def modelfile_text(gguf_name: str, tokenizer, sampling: dict | None = None) -> str:
    """The Modelfile that runs ``gguf_name`` (a file beside it) in Ollama with the tokenizer's chat format.

    Args:
        gguf_name: the GGUF file's name, in the Modelfile's directory (``FROM ./<gguf_name>``).
        tokenizer: a transformers tokenizer loaded from the merged model directory.
        sampling: the model's generation_config as a dict (``GenerationConfig.to_dict()`` or its JSON
            file), or None for greedy-ish defaults (``GREEDY_ISH``).

    Returns:
        The Modelfile's text.

    Raises:
        UserError: the tokenizer's chat template is not a per-message prefix/suffix template.
    """
    if not gguf_name or "/" in gguf_name or "\n" in gguf_name:
        raise ValueError(f"gguf_name must be a file name beside the Modelfile, got {gguf_name!r}")
    lines = [f"# Ollama Modelfile for {gguf_name}: ollama create NAME -f {Path(gguf_name).stem}.Modelfile "
             "(in this directory)",
             f"FROM ./{gguf_name}"]
    if not _chat_template(tokenizer):
        lines += ["# The tokenizer has no chat template: prompts reach the model as they are written.",
                  'TEMPLATE """{{ .Prompt }}"""']
        stops = _unique([tokenizer.eos_token, *_generation_eos(tokenizer, sampling)])
    else:
        fmt = derive_chat_format(tokenizer)
        problem = _unwritable(fmt)
        if problem:
            raise _refusal(tokenizer, problem)
        template = go_template(fmt)
        check_template(tokenizer, template, fmt)
        lines.append("# TEMPLATE: the tokenizer's chat template as a Go template, checked to render what "
                     "transformers renders.")
        if fmt.bos:
            lines.append(f"# {fmt.bos} is left out: llama.cpp adds it (the GGUF's tokenizer.ggml.add_bos_token).")
        if fmt.default_system:
            shown = fmt.default_system if len(fmt.default_system) <= 80 else fmt.default_system[:80] + "..."
            lines.append(f"# Without a system message, the chat template's default one is used: {shown!r}")
        if fmt.trims_content:
            lines.append("# The chat template strips whitespace around each message; this TEMPLATE keeps it.")
        if fmt.later_system_guessed:
            lines.append("# A system message after the first message renders here as a first one; the chat template "
                         "refuses it or moves it.")
        lines.append(f'TEMPLATE """{template}"""')
        stops = stop_tokens(tokenizer, fmt, sampling)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    comment, parameters = sampling_parameters(sampling)
    lines.append(f"# {comment}")
    lines += [f"PARAMETER {name} {value}" for name, value in parameters]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, tokenizer, sampling: dict | None = None) -> None:
    """Write ``modelfile_text(gguf_name, tokenizer, sampling)`` to ``path`` atomically.

    Raises:
        UserError: as ``modelfile_text``; nothing is written then.
    """
    write_text_atomic(Path(path), modelfile_text(gguf_name, tokenizer, sampling))


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default")
    return template or None


def _refusal(tokenizer, reason: str) -> UserError:
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    head = " ".join((_chat_template(tokenizer) or "").split())
    shown = head[:60] + ("..." if len(head) > 60 else "")
    return UserError(f"Ollama Modelfile: the chat template of {name} ({shown!r}) cannot be written as an Ollama "
                     f"TEMPLATE: {reason}; write the TEMPLATE by hand ({OLLAMA_TEMPLATE_DOCS}) or use a model "
                     "whose template wraps each message in a fixed prefix and suffix")


def _render(tokenizer, messages: list[dict], mode: str | None = None) -> str:
    """transformers' rendering: mode None (as is), "generate" (generation prompt) or "continue"."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=mode == "generate",
                                             continue_final_message=mode == "continue")
    except Exception as error:  # a template may raise anything (raise_exception, a missing key, ...)
        roles = ", ".join(m["role"] for m in messages)
        said = " ".join(str(error).split())
        raise _NotPerMessage(f"rendering [{roles}] failed ({type(error).__name__}: {said})") from error


def _split(text: str, content: str, what: str) -> Turn:
    if text.count(content) != 1:
        raise _NotPerMessage(f"{what} does not contain the message's content once, as written")
    prefix, suffix = text.split(content)
    return Turn(prefix, suffix)


def _after(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise _NotPerMessage(f"{what} changes how the earlier messages render")
    return longer[len(shorter):]


def derive_chat_format(tokenizer) -> ChatFormat:
    """The per-role strings of the tokenizer's chat template, from transformers' renderings of probes.

    Raises:
        UserError: the template does not render each message as prefix + content + suffix.
    """
    try:
        return _derive(tokenizer)
    except _NotPerMessage as error:
        raise _refusal(tokenizer, str(error)) from None


def _derive(tokenizer) -> ChatFormat:
    user, assistant = {"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}
    system = {"role": "system", "content": _SYSTEM}
    one = _render(tokenizer, [user])
    generation = _after(_render(tokenizer, [user], "generate"), one, "the generation prompt")
    two = _render(tokenizer, [user, assistant])
    assistant_turn = _split(_after(two, one, "an assistant message"), _ASSISTANT, "an assistant message")
    three = _render(tokenizer, [user, assistant, {"role": "user", "content": _USER2}])
    user_turn = _split(_after(three, two, "a second user message"), _USER2, "a user message")
    user_text = user_turn.prefix + _USER + user_turn.suffix
    if not one.endswith(user_text):
        raise _NotPerMessage("the first user message does not render as the later ones do")
    head = one[:-len(user_text)]
    with_system = _render(tokenizer, [system, user])
    if not with_system.endswith(user_text):
        raise _NotPerMessage("a system message does not render as a message of its own before the first user "
                             "message")
    first_system = _split(with_system[:-len(user_text)], _SYSTEM, "a system message")
    try:
        mid = _render(tokenizer, [user, assistant, {"role": "system", "content": _SYSTEM2}])
        system_turn = _split(_after(mid, two, "a later system message"), _SYSTEM2, "a later system message")
    except _NotPerMessage:
        # Refused, or moved (DeepSeek's templates gather every system message at the start): Ollama
        # sends one only when a client does, so render it as a first one, less BOS, and say so.
        system_turn = None

    # llama.cpp adds BOS itself where the GGUF says so; the TEMPLATE must not write it a second time.
    bos = tokenizer.bos_token or ""
    if not (bos and _adds_bos(tokenizer) and head.startswith(bos) and first_system.prefix.startswith(bos)):
        bos = ""
    head = head[len(bos):]
    first_system = Turn(first_system.prefix[len(bos):], first_system.suffix)
    guessed = system_turn is None
    if guessed:
        prefix = first_system.prefix
        if tokenizer.bos_token and prefix.startswith(tokenizer.bos_token):
            prefix = prefix[len(tokenizer.bos_token):]
        system_turn = Turn(prefix, first_system.suffix)
    default = None
    around = len(first_system.prefix) + len(first_system.suffix)
    if head and len(head) >= around and head.startswith(first_system.prefix) and head.endswith(first_system.suffix):
        default = head[len(first_system.prefix):len(head) - len(first_system.suffix)]
    padded = _render(tokenizer, [{"role": "user", "content": f" {_USER} "}])
    trims = f" {_USER} " not in padded
    return ChatFormat(bos, head, first_system, system_turn, user_turn, assistant_turn, generation, default, trims,
                      guessed)


def _adds_bos(tokenizer) -> bool:
    """Whether encoding adds BOS, the rule export.gguf writes as tokenizer.ggml.add_bos_token."""
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def go_template(fmt: ChatFormat) -> str:
    """Ollama's TEMPLATE for ``fmt``: one range over .Messages, each role wrapped in its strings.

    Every line starts with ``{{-`` right after an action, so the trim removes only the line break
    between lines, never whitespace that belongs to a prefix or suffix.
    """
    content = "{{ .Content }}"
    if fmt.first_system == fmt.system:
        system = f"{fmt.system.prefix}{content}{fmt.system.suffix}"
    else:
        system = (f"{{{{ if eq $i 0 }}}}{fmt.first_system.prefix}{content}{fmt.first_system.suffix}"
                  f"{{{{ else }}}}{fmt.system.prefix}{content}{fmt.system.suffix}{{{{ end }}}}")
    assistant_suffix = f"{{{{ if not $last }}}}{fmt.assistant.suffix}{{{{ end }}}}" if fmt.assistant.suffix else ""
    lines = ["{{- range $i, $_ := .Messages }}",
             "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    if fmt.head:
        lines.append(f'{{{{- if and (eq $i 0) (ne .Role "system") }}}}{fmt.head}{{{{ end }}}}')
    lines += [f'{{{{- if eq .Role "system" }}}}{system}{{{{ end }}}}',
              f'{{{{- if eq .Role "user" }}}}{fmt.user.prefix}{content}{fmt.user.suffix}{{{{ end }}}}',
              f'{{{{- if eq .Role "assistant" }}}}{fmt.assistant.prefix}{content}{assistant_suffix}{{{{ end }}}}']
    if fmt.generation:
        lines.append(f'{{{{- if and $last (ne .Role "assistant") }}}}{fmt.generation}{{{{ end }}}}')
    lines.append("{{- end }}")
    return "\n".join(lines)


def _unwritable(fmt: ChatFormat) -> str | None:
    """Why a string of ``fmt`` cannot go into a TEMPLATE as text, or None."""
    turns = (fmt.first_system, fmt.system, fmt.user, fmt.assistant)
    for text in (fmt.head, fmt.generation, *(s for turn in turns for s in (turn.prefix, turn.suffix))):
        if "{{" in text:
            return f"it writes {text!r}, where '{{{{' would start a Go template action"
        # Ollama's Modelfile parser ends the value at triple quotes and drops unprintable characters (parser.go).
        if '"""' in text or any(not (c.isprintable() or c in "\t\n\r") for c in text):
            return f"it writes {text!r}; a TEMPLATE in triple quotes cannot hold triple quotes or control characters"
    return None


def check_template(tokenizer, template: str, fmt: ChatFormat) -> None:
    """Render ``template`` on CHECK_CONVERSATIONS and require transformers' strings (less ``fmt.bos``).

    Raises:
        UserError: a conversation renders differently, naming it.
    """
    checks = CHECK_CONVERSATIONS + ([] if fmt.later_system_guessed else [MID_SYSTEM_CONVERSATION])
    for messages, mode in checks:
        try:
            expected = _render(tokenizer, messages, mode)
        except _NotPerMessage as error:
            raise _refusal(tokenizer, str(error)) from None
        rendered = fmt.bos + render_ollama_template(template, messages)
        if rendered != expected:
            roles = ", ".join(m["role"] for m in messages)
            raise _refusal(tokenizer, f"[{roles}] ({mode}) renders as {rendered!r}, transformers gives {expected!r}")


def stop_tokens(tokenizer, fmt: ChatFormat, sampling: dict | None = None) -> list[str]:
    """Stop strings: the end-of-turn tokens, EOS, and the token that opens a turn.

    The special tokens in the assistant's suffix end a turn; the generation_config's eos_token_id
    may name more. The token that opens a user turn is added as Ollama's own templates do
    (template/chatml.json stops at <|im_start|>), for a model that skips its end-of-turn token.
    """
    specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    specials.discard("")
    found = sorted((fmt.assistant.suffix.find(t), -len(t), t) for t in specials if t in fmt.assistant.suffix)
    opener = [t for t in specials if fmt.user.prefix.startswith(t)]
    return _unique([t for _, _, t in found] + [tokenizer.eos_token, *_generation_eos(tokenizer, sampling)]
                   + sorted(opener, key=len, reverse=True)[:1])


def _generation_eos(tokenizer, sampling: dict | None) -> list[str]:
    ids = (sampling or {}).get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def sampling_parameters(sampling: dict | None) -> tuple[str, list[tuple[str, str]]]:
    """Ollama sampling parameters from a generation_config dict, or greedy-ish defaults.

    Returns:
        (a comment saying where they come from, [(parameter, value), ...]).
    """
    if sampling is None:
        return ("Sampling: no generation_config given; greedy-ish defaults (low temperature).",
                [(name, _number(value)) for name, value in GREEDY_ISH.items()])
    config = {**_HF_SAMPLING_DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}}
    repeat = ("repeat_penalty", _number(config["repetition_penalty"]))
    if not config.get("do_sample"):
        return ("Sampling: the model's generation_config has do_sample off: greedy, as transformers' generate.",
                [("temperature", "0"), repeat])
    parameters = [("temperature", _number(config["temperature"])), ("top_p", _number(config["top_p"])),
                  ("top_k", str(int(config["top_k"] or 0)))]
    if config["min_p"] is not None:
        parameters.append(("min_p", _number(config["min_p"])))
    return "Sampling: from the model's generation_config.", parameters + [repeat]


def _number(value: float) -> str:
    return f"{float(value):g}"

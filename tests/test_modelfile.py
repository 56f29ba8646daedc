"""The Ollama Modelfile: its TEMPLATE renders exactly what the tokenizer's Jinja chat template renders.

Ollama is not installable here, so the Modelfile's content is checked, not Ollama: the TEMPLATE is
rendered by the module's evaluator of the Go template subset it writes, on conversations the
module's own self-check does not use, and compared with transformers' rendering of the Jinja
template, string for string and token for token.
"""

from __future__ import annotations

import re

import pytest
from conftest import build_tokenizer

from qlorapipe.errors import UserError
from qlorapipe.export.modelfile import (
    modelfile_text,
    render_ollama_template,
    write_modelfile,
)

# The offline default's (SmolLM2-135M-Instruct) template, as its GGUF carries it: ChatML with a
# default system prompt, injected inside the loop when the first message is not a system message.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2 style: the default system prompt comes before the loop, decided on messages[0].
QWEN2 = ("{%- if messages[0]['role'] == 'system' %}"
         "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
         "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
         "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
         "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Plain ChatML, no default system prompt.
CHATML = ("{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3 style: BOS before the first message, a header per role, content trimmed, <|eot_id|>.
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 2 style: the system prompt is folded into the first user message, BOS opens every turn.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# Gemma 1 style: a system message is an error.
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
             "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# name: (template, special tokens, whether encoding adds BOS as Llama 3's tokenizer does, generation prompt)
FAMILIES = {
    "smollm2": (SMOLLM2, CHATML_TOKENS, False, "<|im_start|>assistant\n"),
    "qwen2": (QWEN2, CHATML_TOKENS, False, "<|im_start|>assistant\n"),
    "chatml": (CHATML, CHATML_TOKENS, False, "<|im_start|>assistant\n"),
    "llama3": (LLAMA3, LLAMA3_TOKENS, True, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama3-bos-in-template": (LLAMA3, LLAMA3_TOKENS, False, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}

SYSTEM = {"role": "system", "content": "You answer questions about Python."}
# (messages, mode): "generate" is a prompt for the next assistant message, "continue" continues the
# last one (Ollama's prefill; transformers' continue_final_message).
CONVERSATIONS = [
    ([{"role": "user", "content": "What is a decorator?"}], "generate"),
    ([SYSTEM, {"role": "user", "content": "What is a decorator?"}], "generate"),
    ([SYSTEM,
      {"role": "user", "content": "What is a decorator?"},
      {"role": "assistant", "content": "A function that wraps another.\nIt returns the wrapper."},
      {"role": "user", "content": "Show one — with ünïcode."},
      {"role": "assistant", "content": "@functools.cache"},
      {"role": "user", "content": "Thanks."}], "generate"),
    ([{"role": "user", "content": "Complete: for i in"},
      {"role": "assistant", "content": "range(10):"},
      {"role": "user", "content": "And then?"}], "generate"),
    ([SYSTEM,
      {"role": "user", "content": "Write a loop."},
      {"role": "assistant", "content": "for x in"}], "continue"),
    ([{"role": "user", "content": "Hi."},
      {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Count to three."},
      {"role": "assistant", "content": "One, two"}], "continue"),
    ([{"role": "user", "content": "Hi."},
      {"role": "assistant", "content": "Hello!"},
      {"role": "system", "content": "Now answer in French."},
      {"role": "user", "content": "How are you?"}], "generate"),
]


def chat_tokenizer(template: str | None, specials: list[str], adds_bos: bool = False):
    """The tiny test tokenizer with a chat template and its special tokens (and BOS added on encode)."""
    from tokenizers import processors

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if adds_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = template
    return tokenizer


def family_tokenizer(name: str):
    template, specials, adds_bos, _ = FAMILIES[name]
    return chat_tokenizer(template, specials, adds_bos)


def template_of(modelfile: str) -> str:
    """The TEMPLATE value, as Ollama's Modelfile parser reads it (between the triple quotes)."""
    (template,) = re.findall(r'^TEMPLATE """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)
    return template


def stops_of(modelfile: str) -> list[str]:
    return re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.MULTILINE)


def jinja(tokenizer, messages, mode=None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=mode == "generate",
                                         continue_final_message=mode == "continue")


@pytest.mark.parametrize("family", FAMILIES)
def test_template_renders_what_transformers_renders(family):
    tokenizer = family_tokenizer(family)
    generation = FAMILIES[family][3]
    modelfile = modelfile_text("model-q8_0.gguf", tokenizer)
    template = template_of(modelfile)
    bos_left_out = "<s> is left out: llama.cpp adds it" in modelfile
    assert bos_left_out == (family == "llama3")
    for messages, mode in CONVERSATIONS:
        expected = jinja(tokenizer, messages, mode)
        rendered = render_ollama_template(template, messages)
        assert ("<s>" if bos_left_out else "") + rendered == expected, (family, messages, mode)
        # Token for token what llama.cpp is given (it adds BOS where encoding does) is what transformers renders.
        assert tokenizer(rendered)["input_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
        if mode == "generate":  # without the generation prompt, the rest is transformers' rendering without it
            assert expected == jinja(tokenizer, messages) + generation


def test_a_template_that_refuses_a_later_system_message_is_kept_and_says_so():
    template = CHATML.replace("{% for message in messages %}", "{% for message in messages %}"
                              "{% if message.role == 'system' and not loop.first %}"
                              "{{ raise_exception('System message must be first') }}{% endif %}")
    tokenizer = chat_tokenizer(template, CHATML_TOKENS)
    modelfile = modelfile_text("model.gguf", tokenizer)
    assert "# A system message after the first message renders here as a first one" in modelfile
    template = template_of(modelfile)
    later_system = [(m, mode) for m, mode in CONVERSATIONS if any(x["role"] == "system" for x in m[1:])]
    assert len(later_system) == 1
    for messages, mode in CONVERSATIONS:
        if (messages, mode) not in later_system:
            assert render_ollama_template(template, messages) == jinja(tokenizer, messages, mode)
    assert "after the first message" not in modelfile_text("model.gguf", family_tokenizer("chatml"))


def test_default_system_prompt_only_without_a_system_message():
    for family, default in (("smollm2", "You are a helpful AI assistant named SmolLM"),
                            ("qwen2", "You are a helpful assistant.")):
        tokenizer = family_tokenizer(family)
        modelfile = modelfile_text("model.gguf", tokenizer)
        assert f"# Without a system message, the chat template's default one is used: '{default}" in modelfile
        template = template_of(modelfile)
        alone = render_ollama_template(template, [{"role": "user", "content": "Hi."}])
        assert alone.startswith(f"<|im_start|>system\n{default}")
        with_system = render_ollama_template(template, [SYSTEM, {"role": "user", "content": "Hi."}])
        assert default not in with_system and with_system.startswith(f"<|im_start|>system\n{SYSTEM['content']}")
    assert "default one is used" not in modelfile_text("model.gguf", family_tokenizer("chatml"))


def test_chatml_modelfile_in_full():
    modelfile = modelfile_text("model-q8_0.gguf", family_tokenizer("chatml"))
    assert modelfile == '''\
# Ollama Modelfile for model-q8_0.gguf: ollama create NAME -f model-q8_0.Modelfile (in this directory)
FROM ./model-q8_0.gguf
# TEMPLATE: the tokenizer's chat template as a Go template, checked to render what transformers renders.
TEMPLATE """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|im_start|>system
{{ .Content }}<|im_end|>
{{ end }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ end }}
{{- if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "</s>"
PARAMETER stop "<|im_start|>"
# Sampling: no generation_config given; greedy-ish defaults (low temperature).
PARAMETER temperature 0.2
PARAMETER top_p 0.9
PARAMETER repeat_penalty 1
'''


@pytest.mark.parametrize("family, end_of_turn", [("smollm2", "<|im_end|>"), ("qwen2", "<|im_end|>"),
                                                 ("llama3", "<|eot_id|>")])
def test_stops_at_the_end_of_turn_and_eos(family, end_of_turn):
    stops = stops_of(modelfile_text("model.gguf", family_tokenizer(family)))
    assert stops[0] == end_of_turn
    assert "</s>" in stops  # EOS
    assert len(stops) == len(set(stops))


def test_from_names_the_gguf_file_beside_the_modelfile():
    modelfile = modelfile_text("model-f16.gguf", family_tokenizer("llama3"))
    instructions = [line for line in modelfile.splitlines() if line.split(" ", 1)[0].isupper()]
    assert instructions[0] == "FROM ./model-f16.gguf"
    assert sum(line.startswith("FROM ") for line in modelfile.splitlines()) == 1
    with pytest.raises(ValueError, match="file name"):
        modelfile_text("gguf/model-f16.gguf", family_tokenizer("llama3"))


def test_no_chat_template_passes_the_prompt_as_written():
    tokenizer = chat_tokenizer(None, [])
    modelfile = modelfile_text("model-q8_0.gguf", tokenizer)
    assert "# The tokenizer has no chat template: prompts reach the model as they are written." in modelfile
    assert template_of(modelfile) == "{{ .Prompt }}"
    assert stops_of(modelfile) == ["</s>"]
    assert render_ollama_template("{{ .Prompt }}", [{"role": "user", "content": "The with statement"}]) == \
        "The with statement"
    # Ollama's legacy path: one rendering per user turn, each followed by its response.
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    assert render_ollama_template("{{ .Prompt }}", turns) == "abc"


@pytest.mark.parametrize("template, reason", [
    (LLAMA2, "a system message does not render as a message of its own"),
    (NO_SYSTEM, "System role not supported"),
])
def test_refuses_a_template_that_is_not_per_message(template, reason):
    tokenizer = chat_tokenizer(template, [])
    with pytest.raises(UserError) as error:
        modelfile_text("model.gguf", tokenizer)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("Ollama Modelfile: the chat template of ")
    assert reason in message
    assert repr(template[:30])[1:-1] in message  # names the template
    assert "write the TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)" in message


def test_refuses_a_template_whose_last_assistant_message_renders_differently():
    # e.g. a reasoning template that writes an empty thinking block only in the last assistant message
    template = CHATML.replace("{{ message.content }}", "{% if loop.last and message.role == 'assistant' %}"
                                                       "<think></think>{% endif %}{{ message.content }}")
    with pytest.raises(UserError, match="a second user message changes how the earlier messages render"):
        modelfile_text("model.gguf", chat_tokenizer(template, CHATML_TOKENS))


def test_sampling_from_the_generation_config_or_greedy_ish_defaults():
    from transformers import GenerationConfig

    tokenizer = family_tokenizer("chatml")
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                               eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), 2])
    modelfile = modelfile_text("model.gguf", tokenizer, sampled.to_dict())
    assert "# Sampling: from the model's generation_config." in modelfile
    for line in ("temperature 0.7", "top_p 0.8", "top_k 20", "repeat_penalty 1.05"):
        assert f"\nPARAMETER {line}\n" in modelfile
    assert stops_of(modelfile) == ["<|im_end|>", "</s>", "<|im_start|>"]

    greedy = modelfile_text("model.gguf", tokenizer, GenerationConfig(do_sample=False).to_diff_dict())
    assert "do_sample off: greedy, as transformers' generate" in greedy
    assert "\nPARAMETER temperature 0\n" in greedy and "top_p" not in greedy

    defaults = modelfile_text("model.gguf", tokenizer)
    assert "# Sampling: no generation_config given; greedy-ish defaults (low temperature)." in defaults
    assert "\nPARAMETER temperature 0.2\nPARAMETER top_p 0.9\n" in defaults


def test_write_modelfile_is_atomic(tmp_path):
    path = tmp_path / "gguf" / "Modelfile"
    tokenizer = family_tokenizer("llama3")
    write_modelfile(path, "model-q8_0.gguf", tokenizer)
    assert path.read_text() == modelfile_text("model-q8_0.gguf", tokenizer)
    with pytest.raises(UserError):
        write_modelfile(path, "model-q8_0.gguf", chat_tokenizer(LLAMA2, []))
    assert path.read_text() == modelfile_text("model-q8_0.gguf", tokenizer)  # a refusal leaves the old one
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile"]


@pytest.mark.parametrize("template, messages, expected", [
    # trim markers remove whitespace up to the action, on their side only
    ("a \n {{- .System -}} \n b {{ .System }}", [SYSTEM], f"a{SYSTEM['content']}b {SYSTEM['content']}"),
    # consecutive messages of one role are merged; .System joins every system message
    ("{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ $.System }}",
     [{"role": "system", "content": "s1"}, {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
      {"role": "system", "content": "s2"}],
     "[system:s1][user:u1\n\nu2][system:s2]|s1\n\ns2"),
    # if / else if / else, eq with several values, and / or / not, len, slice, $last
    ('{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
     '{{ if eq .Role "system" }}S{{ else if eq .Role "user" "tool" }}U{{ else }}A{{ end }}'
     '{{ if and $last (not (eq $i 0)) }}!{{ len $.Messages }}{{ end }}{{ or "" $m.Content }}'
     '{{- end }}',
     [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "tool", "content": "z"}],
     "UxAyU!3z"),
])
def test_go_template_evaluator(template, messages, expected):
    assert render_ollama_template(template, messages) == expected

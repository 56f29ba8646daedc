"""Rendering Ollama's Go templates: the subset the Modelfile's TEMPLATE uses, to check it renders
what transformers renders from the chat template (``modelfile.check_template``).

Exactly the subset go_template writes (and Ollama's simple templates): text, {{ .Field }},
{{ $.Field }}, variables, if / else if / else, range (with $i, $x :=), := declarations, the
functions eq, ne, not, and, or, len, slice, string and integer literals, parentheses, and
the {{- / -}} trim markers. Values as Ollama's template.Execute passes them (template/template.go).
"""

from __future__ import annotations

import json
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*")                     # "a string"
  | (?P<num>-?\d+)                                # 0
  | (?P<op>[(),]|:=)
  | (?P<word>\$?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*    # eq, $i, $m.Content
           | \$(?:\.[A-Za-z_]\w*)*                  # $, $.Messages
           | \.(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?)  # ., .Role
)""", re.VERBOSE)
_GO_SPACE = " \t\r\n"


def ollama_values(messages: list[dict]) -> dict[str, Any]:
    """What Ollama passes a template that uses .Messages: consecutive messages of one role merged
    with a blank line between them, .System all system messages joined (template.go's collate)."""
    collated: list[dict] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if collated and collated[-1]["Role"] == role and role != "tool":
            collated[-1]["Content"] += "\n\n" + content
        else:
            collated.append({"Role": role, "Content": content})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated, "Response": "", "Prompt": "", "Tools": None}


def render_ollama_template(template: str, messages: list[dict]) -> str:
    """The prompt Ollama renders from ``template`` for ``messages`` (the Go subset above).

    A template that uses .Messages sees the whole conversation; one that does not is run once per
    user turn with .System, .Prompt and .Response, Ollama's legacy path (its template.Execute).
    """
    nodes = _parse(template)
    if not re.search(r"\.Messages\b", template):
        return _render_legacy(nodes, messages)
    out: list[str] = []
    values = ollama_values(messages)
    _execute(nodes, values, [{"$": values}], out)
    return "".join(out)


def _render_legacy(nodes: list, messages: list[dict]) -> str:
    # Ollama appends {{ .Response }} to a template that has none (template.Parse), and renders the
    # last turn only up to it (the nodes after it are cut; top-level ones here).
    cut = next((i for i, n in enumerate(nodes) if n[0] == "action" and ".Response" in n[1]), None)
    if cut is None and not any(n[0] == "action" and ".Response" in n[1] for n in _walk(nodes)):
        nodes, cut = nodes + [("action", ".Response")], len(nodes)
    last_nodes = nodes if cut is None else nodes[:cut + 1]
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def execute(nodes=nodes):
        _execute(nodes, turn, [{"$": turn}], out)
        turn.update(System="", Prompt="", Response="")

    for message in ollama_values(messages)["Messages"]:
        role, content = message["Role"], message["Content"]
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                execute()
            turn["System"] = content
        elif role == "user":
            if turn["Response"]:
                execute()
            turn["Prompt"] = content
        elif role == "assistant":
            turn["Response"] = content
    execute(last_nodes)
    return "".join(out)


def _walk(nodes):
    for node in nodes:
        yield node
        if node[0] == "if":
            for _, body in node[1]:
                yield from _walk(body)
            yield from _walk(node[2])
        elif node[0] == "range":
            yield from _walk(node[3])


def _parse(template: str) -> list:
    """Go template text into nodes: ("text", s), ("action", expr), ("declare", var, expr),
    ("if", [(cond, body), ...], else_body), ("range", index_var, item_var, expr... body)."""
    pieces: list = []
    position = 0
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip(_GO_SPACE)
        if pieces and pieces[-1][0] == "trim-next":
            pieces.pop()
            text = text.lstrip(_GO_SPACE)
        if text:
            pieces.append(("text", text))
        pieces.append(("tag", match.group(2).strip()))
        if match.group(3):
            pieces.append(("trim-next",))
        position = match.end()
    text = template[position:]
    if pieces and pieces[-1][0] == "trim-next":
        pieces.pop()
        text = text.lstrip(_GO_SPACE)
    if text:
        pieces.append(("text", text))
    nodes, stop = _parse_block(pieces, 0)
    if stop is not None:
        raise ValueError(f"unexpected {{{{ {pieces[stop][1]} }}}}")
    return nodes


def _parse_block(pieces: list, i: int) -> tuple[list, int | None]:
    """Nodes until an else / end tag; returns them and that tag's index (None at the end)."""
    nodes: list = []
    while i < len(pieces):
        kind, *rest = pieces[i]
        if kind == "text":
            nodes.append(("text", rest[0]))
            i += 1
            continue
        tag = rest[0]
        word = tag.split(None, 1)[0] if tag else ""
        if word in ("end", "else"):
            return nodes, i
        if word == "if":
            branches, else_body = [], []
            cond = tag[2:].strip()
            while True:
                body, i = _parse_block(pieces, i + 1)
                if i is None:
                    raise ValueError("{{ if }} without {{ end }}")
                branches.append((cond, body))
                closing = pieces[i][1]
                if closing.startswith("else if "):
                    cond = closing[len("else if "):].strip()
                    continue
                if closing == "else":
                    else_body, i = _parse_block(pieces, i + 1)
                    if i is None or pieces[i][1] != "end":
                        raise ValueError("{{ else }} without {{ end }}")
                break
            nodes.append(("if", branches, else_body))
            i += 1
        elif word == "range":
            spec = tag[len("range"):].strip()
            index_var = item_var = None
            if ":=" in spec:
                names, spec = (s.strip() for s in spec.split(":=", 1))
                parts = [p.strip() for p in names.split(",")]
                index_var, item_var = (parts if len(parts) == 2 else [None, parts[0]])
            body, i = _parse_block(pieces, i + 1)
            if i is None or pieces[i][1] != "end":
                raise ValueError("{{ range }} without {{ end }} (range else is not supported)")
            nodes.append(("range", index_var, item_var, spec, body))
            i += 1
        elif re.match(r"^\$\w+\s*:=", tag):
            name, expr = (s.strip() for s in tag.split(":=", 1))
            nodes.append(("declare", name, expr))
            i += 1
        else:
            nodes.append(("action", tag))
            i += 1
    return nodes, None


def _execute(nodes: list, dot: Any, scopes: list[dict], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            out.append(_text(_evaluate(node[1], dot, scopes)))
        elif kind == "declare":
            scopes[-1][node[1]] = _evaluate(node[2], dot, scopes)
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(_evaluate(cond, dot, scopes)):
                    _execute(body, dot, scopes + [{}], out)
                    break
            else:
                _execute(node[2], dot, scopes + [{}], out)
        elif kind == "range":
            _, index_var, item_var, spec, body = node
            for index, item in enumerate(_evaluate(spec, dot, scopes) or []):
                scope = {}
                if index_var:
                    scope[index_var] = index
                if item_var:
                    scope[item_var] = item
                _execute(body, item, scopes + [scope], out)


def _text(value: Any) -> str:
    if value is None:
        return ""  # Ollama parses templates with missingkey=zero
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _truth(value: Any) -> bool:
    return bool(value)  # Go: false, 0, nil, and empty strings, slices and maps are false


def _evaluate(expr: str, dot: Any, scopes: list[dict]) -> Any:
    tokens = _tokenize(expr)
    value, rest = _command(tokens, dot, scopes)
    if rest:
        raise ValueError(f"cannot evaluate {expr!r}")
    return value


def _tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    expr = expr.strip()
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot read {expr[position:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
        while position < len(expr) and expr[position] in _GO_SPACE:
            position += 1
    return tokens


_FUNCTIONS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "slice": lambda a, i=None, j=None: a[i:j],
}


def _command(tokens: list, dot: Any, scopes: list[dict]) -> tuple[Any, list]:
    """A command: a function and its arguments, or one operand; stops at ')' or the end."""
    if tokens and tokens[0][0] == "word" and tokens[0][1] in ("and", "or", *_FUNCTIONS):
        name, args, tokens = tokens[0][1], [], tokens[1:]
        while tokens and tokens[0] != ("op", ")"):
            arg, tokens = _operand(tokens, dot, scopes)
            args.append(arg)
        if name == "and":  # Go returns the first false argument, or the last
            return next((a for a in args if not _truth(a)), args[-1]), tokens
        if name == "or":
            return next((a for a in args if _truth(a)), args[-1]), tokens
        return _FUNCTIONS[name](*args), tokens
    value, tokens = _operand(tokens, dot, scopes)
    return value, tokens


def _operand(tokens: list, dot: Any, scopes: list[dict]) -> tuple[Any, list]:
    kind, text = tokens[0]
    if (kind, text) == ("op", "("):
        value, rest = _command(tokens[1:], dot, scopes)
        if not rest or rest[0] != ("op", ")"):
            raise ValueError("missing ')'")
        return value, rest[1:]
    if kind == "str":
        return json.loads(text), tokens[1:]
    if kind == "num":
        return int(text), tokens[1:]
    if kind == "word":
        if text in ("true", "false"):
            return text == "true", tokens[1:]
        if text.startswith("$"):
            name, _, fields = text.partition(".")
            value = next((s[name] for s in reversed(scopes) if name in s), None)
            if value is None and not any(name in s for s in scopes):
                raise ValueError(f"undefined variable {name}")
            return _fields(value, fields), tokens[1:]
        if text.startswith("."):
            return _fields(dot, text[1:]), tokens[1:]
    raise ValueError(f"unexpected {text!r}")


def _fields(value: Any, path: str) -> Any:
    for field in filter(None, path.split(".")):
        value = value.get(field) if isinstance(value, dict) else None
    return value

"""Reading params.yaml into its section dataclasses, every problem reported in one message.

One pass collects, for every section asked for: unknown keys (with the nearest valid key
suggested, so a typo never silently falls back to a default), values of the wrong type, the
section's own ``check()`` run on its well-typed values, and the rules between sections
(rules.py). A problem that only follows from an ill-typed value (which the check sees as its
default) is left out, so each mistake is named once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from qlorapipe.errors import UserError
from qlorapipe.params.rules import cross_section_problems
from qlorapipe.params.sections import SECTIONS

PREFIX = "invalid params: "


def read_params_file(path: Path) -> dict[str, Any]:
    """Read params.yaml as a mapping of section name to mapping.

    Raises:
        UserError: the file is missing, is not YAML, or has an unknown section.
    """
    raw, problems = _read(path)
    if problems:
        raise UserError("; ".join(problems))
    return raw


def load_section(path: Path, name: str) -> Any:
    """Load and validate one section of a params file.

    Args:
        path: the params file (params.yaml).
        name: the section, one of SECTIONS.

    Returns:
        The section's frozen dataclass.

    Raises:
        UserError: naming every unknown section and key, wrong type and failed check at once.
    """
    return load_sections(path, name)[name]


def load_sections(path: Path, *names: str) -> dict[str, Any]:
    """Load and validate several sections, reporting the problems of all of them at once.

    The rules between sections (rules.cross_section_problems) apply to the sections loaded
    together, e.g. training with distributed.

    Returns:
        Each section's frozen dataclass, by name.

    Raises:
        UserError: naming every problem in every section asked for, and between them.
    """
    raw, problems = _read(path)
    sections, ill_typed = {}, set()
    for name in names:
        section, section_problems, bad_keys = _build(name, raw.get(name) or {})
        problems += section_problems
        ill_typed |= bad_keys
        if section is not None:
            sections[name] = section
    problems += [p for p in cross_section_problems(sections) if not _mentions_any(p, ill_typed)]
    if problems:
        raise UserError(PREFIX + "; ".join(problems))
    return sections


def parse_section(name: str, raw: dict[str, Any]) -> Any:
    """Build the dataclass for section ``name`` from a mapping, collecting every problem.

    Raises:
        UserError: naming every unknown key, wrong type and failed check at once.
    """
    section, problems, _ = _build(name, raw)
    if problems:
        raise UserError(PREFIX + "; ".join(problems))
    return section


def _read(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The file's known sections, and a problem for each unknown one.

    Raises:
        UserError: the file is missing, is not YAML or is not a mapping (nothing else can be read).
    """
    if not path.is_file():
        raise UserError(f"{path}: params file not found (run from the project root, where params.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    problems = [_unknown_key_message(f"{path}: section", k, SECTIONS) for k in raw if k not in SECTIONS]
    return raw, problems


def _build(name: str, raw: Any) -> tuple[Any, list[str], set[str]]:
    """Section ``name`` built from the well-typed values of ``raw`` (None when ``raw`` is no
    mapping), every problem found, and the ``section.key`` names whose value had the wrong type."""
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        return None, [f"params section '{name}' must be a mapping of keys to values"], set()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = [_unknown_key_message(f"{name}: key", key, fields) for key in raw if key not in fields]
    values, ill_typed = {}, set()
    for key, value in raw.items():
        if key not in fields:
            continue
        error = _type_error(hints[key], value)
        if error:
            problems.append(f"{name}.{key}: {error}, got {value!r}")
            ill_typed.add(f"{name}.{key}")
        else:
            values[key] = _coerce(hints[key], value)
    section = cls(**values)
    problems += [p for p in section.check() if not _mentions_any(p, ill_typed)]
    return section, problems, ill_typed


def _mentions_any(problem: str, names: set[str]) -> bool:
    """Whether ``problem`` names any of ``names`` (``section.key``, as a whole word)."""
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", problem) for n in names)


def _unknown_key_message(what: str, key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(valid))}"
    return f"{what} '{key}' is unknown ({hint})"


def _type_error(hint, value) -> str | None:
    """Return why ``value`` does not fit ``hint``, or None when it does."""
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if _is_literal_value(hint, value):
            return None
        return f"must be {allowed[0]!r}" if len(allowed) == 1 else "must be one of " + ", ".join(map(repr, allowed))
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(option, value) for option in get_args(hint)]
        if any(e is None for e in errors):
            return None
        if all(e.startswith("must be ") for e in errors):  # one phrase: "must be an integer or 'auto'"
            return "must be " + " or ".join(e.removeprefix("must be ") for e in errors)
        return " or ".join(errors)
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is dict:
        key_type, value_type = get_args(hint)
        if not isinstance(value, dict):
            return "must be a mapping"
        bad = [k for k, v in value.items() if _type_error(key_type, k) or _type_error(value_type, v)]
        return f"must map {key_type.__name__} to {value_type.__name__}" if bad else None
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            return "must be a list"
        bad = [v for v in value if _type_error(item, v)]
        return f"list items must be {item.__name__}" if bad else None
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        # YAML 1.1 reads 2e-4 as a string; accept numeric strings for floats.
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or _is_float_string(value)):
            return "must be a number"
        return None if math.isfinite(float(value)) else "must be a finite number"  # .nan, .inf, "nan"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def _is_float_string(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _is_literal_value(hint, value) -> bool:
    """Whether ``value`` is one of the values of the Literal ``hint`` (True is not 1 here)."""
    return any(value == a and type(value) is type(a) for a in get_args(hint))


def _coerce(hint, value):
    union = get_origin(hint) in (typing.Union, types.UnionType)
    if union and any(get_origin(o) is Literal and _is_literal_value(o, value) for o in get_args(hint)):
        return value  # a named value such as 'auto' stays itself, whatever else the union allows
    if hint is float or (union and float in get_args(hint)):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
    return value

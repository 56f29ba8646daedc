"""The options onnxruntime-genai's model builder documents, read from its source without importing it.

The check stage asks here before DVC deletes any output, and the export stage again before it builds:
the builder ignores an option name it does not know without a word.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path


def known_options() -> set[str] | None:
    """The option names under the builder's --extra_options help (and their older ``int4_`` spellings, still
    accepted); None when onnxruntime-genai or its builder source is not installed."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    source = Path(spec.origin).parent / "models" / "builder.py" if spec and spec.origin else None
    if source is None or not source.is_file():
        return None
    known = set(re.findall(r"^ {16}([a-z][a-z0-9_]*) = ", source.read_text(), re.MULTILINE))
    return known | {f"int4_{name}" for name in known}


def unknown_options_problem(options: dict[str, dict], precisions: list[str]) -> str | None:
    """Why the options of ``precisions`` (those exported) hold a name the builder does not document, or None."""
    known = known_options()
    if known is None:
        return None
    unknown = [f"export.onnx_builder_options.{p}.{k}" + (f" (did you mean {near[0]}?)" if near else "")
               for p in precisions for k in options.get(p, {}) if k not in known
               for near in [difflib.get_close_matches(k, known, n=1)]]
    if not unknown:
        return None
    return (f"{'; '.join(unknown)}: not an option of onnxruntime-genai's model builder, which would ignore it; "
            "the options it knows are listed under --extra_options in onnxruntime_genai/models/builder.py")


def unused_options_warning(options: dict[str, dict], formats: list[str], defaults: dict[str, dict]) -> str | None:
    """A warning when options other than the defaults are set for a precision ``formats`` does not export."""
    unused = [p for p, values in options.items() if values != defaults.get(p, {}) and f"onnx-{p}" not in formats]
    if not unused:
        return None
    return (f"export.onnx_builder_options {', '.join(unused)} set, but export.formats has no "
            f"{', '.join(f'onnx-{p}' for p in unused)}: nothing is built with them (add the format to "
            "export.formats to build it)")

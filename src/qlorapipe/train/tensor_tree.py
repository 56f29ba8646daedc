"""Nested states (optimizer, RNGs) on disk without pickle: tensors in safetensors, the structure in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def host_copy(tensor):
    """A copy of ``tensor`` in CPU memory of its own, contiguous (from a GPU: ``memory.to_host``)."""
    from qlorapipe.memory import to_host

    tensor = tensor.detach()
    return tensor.clone().contiguous() if tensor.device.type == "cpu" else to_host(tensor)


def _split(obj: Any, tensors: dict, key: str) -> Any:
    """Replace tensors in a nested structure by references; dicts keep their key types."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = host_copy(obj)
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"dict": [[k, _split(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_split(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key}")


def _join(obj: Any, tensors: dict) -> Any:
    import numpy as np

    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        if "ndarray" in obj:
            return np.array(obj["ndarray"], dtype=obj["dtype"])
        if "tuple" in obj:
            return tuple(_join(v, tensors) for v in obj["tuple"])
        return {k: _join(v, tensors) for k, v in obj["dict"]}
    return obj


def save_tree(directory: Path, name: str, obj: Any) -> None:
    """Write a nested structure of tensors and plain values as ``name``.safetensors + ``name``.json."""
    write_tree(directory, name, *split_tree(name, obj))


def split_tree(name: str, obj: Any) -> tuple[Any, dict]:
    """``obj``'s structure (JSON-serialisable) and host copies of its tensors, taken now (``write_tree``
    writes them later, while ``obj`` changes)."""
    tensors: dict = {}
    return _split(obj, tensors, name), tensors


def write_tree(directory: Path, name: str, structure: Any, tensors: dict) -> None:
    """Write what ``split_tree`` took as ``name``.safetensors + ``name``.json."""
    from safetensors.torch import save_file

    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure) + "\n")


def load_tree(directory: Path, name: str) -> Any:
    """Read back what :func:`save_tree` wrote; tensors come from safetensors, never from a pickle."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _join(json.loads((directory / f"{name}.json").read_text()), tensors)


# ---- RNG and trainable tensors -------------------------------------------------------------

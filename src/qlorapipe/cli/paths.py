"""Default paths of the command-line tools, read from dvc.yaml, where every pipeline path is named once."""

from __future__ import annotations

from pathlib import Path

import yaml

from qlorapipe.errors import UserError


def pipeline_path(name: str, dvc_yaml: Path = Path("dvc.yaml")) -> Path:
    """The path dvc.yaml's ``vars: - paths:`` gives ``name`` (for example ``base`` -> models/base).

    Raises:
        UserError: there is no dvc.yaml here, or it names no such path.
    """
    if not dvc_yaml.is_file():
        raise UserError(f"no {dvc_yaml} here to take the default '{name}' path from: run from the project root, "
                        "or give the path as an option")
    for entry in yaml.safe_load(dvc_yaml.read_text()).get("vars") or []:
        if isinstance(entry, dict) and name in (entry.get("paths") or {}):
            return Path(entry["paths"][name])
    raise UserError(f"{dvc_yaml} names no '{name}' path under vars: paths; give the path as an option")

"""Each stage in dvc.yaml depends on exactly the code it runs: its script and the modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qlorapipe"


def _imported_project_modules(path: Path) -> set[str]:
    """Project modules imported by ``path``, directly or through other project modules."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if not name.startswith(PACKAGE + "."):
                    continue
                file = ROOT / "src" / (name.replace(".", "/") + ".py")
                rel = str(file.relative_to(ROOT))
                if file.is_file() and rel not in seen:
                    seen.add(rel)
                    todo.append(file)
    return seen


def _stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_each_stage_depends_on_exactly_the_code_it_imports():
    for name, stage in _stages().items():
        script = f"stages/{name}.py"
        code_deps = {d for d in stage["deps"] if d.startswith(("stages/", "src/"))}
        expected = {script} | _imported_project_modules(ROOT / script)
        assert code_deps == expected, f"stage {name}: extra {code_deps - expected}, missing {expected - code_deps}"


def test_stages_never_import_each_other():
    for name in _stages():
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("stages"), f"stages/{name}.py imports {node.module}"


def test_each_stage_reads_only_the_params_sections_it_declares():
    for name, stage in _stages().items():
        source = (ROOT / "stages" / f"{name}.py").read_text()
        read = {node.args[1].value for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_section"}
        assert read == set(stage["params"]), f"stage {name} reads {read}, declares {stage['params']}"


def test_train_does_not_depend_on_evaluation_merge_or_export_code():
    deps = set(_stages()["train"]["deps"])
    for module in ("generation.py", "merging.py", "model_card.py"):
        assert f"src/{PACKAGE}/{module}" not in deps

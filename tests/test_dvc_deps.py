"""Each stage in dvc.yaml depends on exactly the code it runs: its script and the modules it imports."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import yaml

from qlorapipe.params.sections import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "qlorapipe"


def _module_file(name: str) -> Path | None:
    """The file of project module ``name`` (a module, or a package's __init__.py), or None."""
    base = SRC / name.replace(".", "/")
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _with_parents(name: str) -> list[str]:
    """``name`` and every package above it: importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported_project_modules(path: Path) -> set[str]:
    """Project files imported by ``path``, directly or through other project modules."""
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
            elif isinstance(node, (ast.List, ast.Tuple)):  # a module run in a process of its own: [..., "-m", NAME]
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                names = [name for flag, name in zip(values, values[1:]) if flag == "-m" and isinstance(name, str)]
            for name in names:
                if name.split(".")[0] != PACKAGE:
                    continue
                for module in _with_parents(name):
                    file = _module_file(module)
                    if file is None:
                        continue
                    rel = str(file.relative_to(ROOT))
                    if rel not in seen:
                        seen.add(rel)
                        todo.append(file)
    return seen


def _expanded(deps: list[str]) -> set[str]:
    """Code deps as files: a folder under src/ stands for every .py file in it."""
    files = set()
    for dep in deps:
        if not dep.startswith(("stages/", "src/")):
            continue
        path = ROOT / dep
        if path.is_dir():
            files |= {str(f.relative_to(ROOT)) for f in path.rglob("*.py")}
        else:
            files.add(dep)
    return files


def _stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_each_stage_depends_on_exactly_the_code_it_imports():
    for name, stage in _stages().items():
        script = f"stages/{name}.py"
        code_deps = _expanded(stage["deps"])
        expected = {script} | _imported_project_modules(ROOT / script)
        assert code_deps == expected, f"stage {name}: extra {code_deps - expected}, missing {expected - code_deps}"


def test_the_expansion_sees_package_inits_and_folders():
    # The checks above mean something only if imports through packages are followed.
    train = _imported_project_modules(ROOT / "stages/train.py")
    assert {"src/qlorapipe/__init__.py", "src/qlorapipe/train/__init__.py",
            "src/qlorapipe/train/fast/__init__.py", "src/qlorapipe/records.py"} <= train
    assert "src/qlorapipe/train/fast/fused_lora.py" in _expanded(["src/qlorapipe/train"])


def test_stages_never_import_each_other():
    for name in _stages():
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("stages"), f"stages/{name}.py imports {node.module}"


def test_no_step_package_imports_another_step():
    # Steps share code through the core modules at the package's top level, never directly,
    # so editing one step's code never reruns another.
    # A package per stage: download, prepare, ...; the two checking stages and the card (what the model card
    # quotes of the metrics) are scripts over the core.
    steps = [name for name in _stages() if name not in ("check", "compat", "card")]
    assert all((SRC / PACKAGE / step / "__init__.py").is_file() for step in steps)
    for step in steps:
        for file in (SRC / PACKAGE / step).rglob("*.py"):
            imported = _imported_project_modules(file)
            others = {f for f in imported if any(f.startswith(f"src/{PACKAGE}/{s}/") for s in steps if s != step)}
            assert not others, f"{file.relative_to(ROOT)} imports {others}"


def _sections_read(source: str) -> set[str]:
    """Names of the sections a stage loads through load_section(path, name) or load_sections(path, *names)."""
    read = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("load_section", "load_sections"):
            read |= {arg.value for arg in node.args[1:] if isinstance(arg, ast.Constant)}
    return read


def test_each_stage_reads_only_the_params_sections_it_declares():
    for name, stage in _stages().items():
        read = _sections_read((ROOT / "stages" / f"{name}.py").read_text())
        # A whole section, or one key of it (the memory budget every stage reads from acceleration).
        declared = {entry.split(".")[0] for entry in stage.get("params", [])}
        assert read == declared, f"stage {name} reads {read}, declares {stage.get('params')}"
        for entry in stage.get("params", []):
            if "." in entry:
                section, key = entry.split(".", 1)
                assert key in {f.name for f in fields(SECTIONS[section])}, f"stage {name} declares unknown {entry}"


def test_train_does_not_depend_on_evaluation_merge_or_export_code():
    deps = _expanded(_stages()["train"]["deps"])
    for room in ("evaluate/", "merge/", "export/", "download/", "fidelity.py"):
        assert not any(d.startswith(f"src/{PACKAGE}/{room}") for d in deps), room


def test_reading_the_base_record_does_not_make_the_downloader_a_dependency():
    for name in ("train", "evaluate", "merge", "export"):
        deps = _expanded(_stages()[name]["deps"])
        assert not any(d.startswith(f"src/{PACKAGE}/download/") for d in deps), name

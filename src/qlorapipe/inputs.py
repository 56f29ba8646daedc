"""The local files and folders params name, looked at where a stage reads them and, before any stage
runs, by the check stage (``local_input_problems``), so that a missing one stops `dvc repro` before DVC
deletes the outputs of the stage that reads it. Nothing heavy is imported here."""

from __future__ import annotations

from pathlib import Path

from qlorapipe.errors import UserError

PYTHON_DOCS = "builtin:python-docs"
CHATTERBOT = "builtin:chatterbot"
BUILTIN_CORPORA = (PYTHON_DOCS, CHATTERBOT)

# The data file formats the prepare stage reads (data.source: local).
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def model_path_is_gguf(local: Path) -> bool:
    """Whether ``local`` (model.local_path) is a GGUF file (True) or a Hugging Face model directory (False).

    Raises:
        UserError: it does not exist, is neither, or is a directory without config.json.
    """
    if not local.exists():
        raise UserError(f"model.local_path '{local}' does not exist: point it at a Hugging Face model directory "
                        "or a .gguf file")
    if local.is_file() and local.suffix == ".gguf":
        return True
    if not local.is_dir():
        raise UserError(f"model.local_path '{local}' must be a Hugging Face model directory or a .gguf file")
    if not (local / "config.json").is_file():
        raise UserError(f"{local}: not a Hugging Face model directory (no config.json); point model.local_path at one")
    return False


def data_files(path: Path) -> list[Path]:
    """The data files data.path names: itself, or the data files in it and its subfolders.

    Raises:
        UserError: it does not exist, or holds no file of a format prepare reads.
    """
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist: point it at a data file "
                        f"({', '.join(DATA_SUFFIXES)}) or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in DATA_SUFFIXES]
    if not files:
        raise UserError(f"data.path '{path}': no {', '.join(DATA_SUFFIXES)} files found")
    return files


def corpus_files(source: str, param: str) -> list[Path]:
    """The .txt files of a corpus given as a path (``param``: the params key that names it, for messages).

    Raises:
        UserError: the path does not exist, or is not a .txt file or a folder holding .txt files.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{param} '{source}' does not exist: name a local .txt file or folder, "
                        f"or one of {', '.join(BUILTIN_CORPORA)}")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".txt" for f in files):
        raise UserError(f"{param} '{source}' is not a .txt file or a folder holding .txt files")
    return files


def local_input_problems(sections: dict) -> list[str]:
    """What is wrong with each local input the ``model``, ``data`` and ``evaluate`` sections name: what the
    stage that reads it would say."""
    model, data, general = sections["model"], sections["data"], sections["evaluate"].general_corpus
    checks = []
    if model.source == "local":
        checks.append(lambda: model_path_is_gguf(Path(model.local_path).expanduser()))
    if data.source == "local":
        checks.append(lambda: data_files(Path(data.path).expanduser()))
    if general is not None and general not in BUILTIN_CORPORA:
        checks.append(lambda: corpus_files(general, "evaluate.general_corpus"))
    problems = []
    for check in checks:
        try:
            check()
        except UserError as problem:
            problems.append(str(problem))
    return problems

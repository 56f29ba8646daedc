"""The local files and folders params name, looked at where a stage reads them and, before any stage
runs, by the check stage (``local_input_problems``), so that a missing one stops `dvc repro` before DVC
deletes the outputs of the stage that reads it. Nothing heavy is imported here (pyarrow only to read a
parquet file's footer, when data.path holds one)."""

from __future__ import annotations

from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.local_data import first_record, too_few_records
from qlorapipe.params import CHAT_ROLES

PYTHON_DOCS = "builtin:python-docs"
CHATTERBOT = "builtin:chatterbot"
BUILTIN_CORPORA = (PYTHON_DOCS, CHATTERBOT)

# The data file formats the prepare stage reads (data.source: local).
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# lm-eval task files (evaluate.lm_eval_tasks entries that are paths, not task names).
TASK_FILE_SUFFIXES = (".yaml", ".yml")
# ShareGPT's speaker names (``from``) -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


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


def required_columns(data) -> list[tuple[str, str]]:
    """The (column, data.* param naming it) every record must have in ``data``'s format."""
    if data.format == "completion":
        return [(data.prompt_column, "prompt_column"), (data.completion_column, "completion_column")]
    if data.format == "instruction" and data.template != "guanaco":
        return [(data.instruction_column, "instruction_column"), (data.output_column, "output_column")]
    if data.format == "chat":
        return [(data.messages_column, "messages_column")]
    return [(data.text_column, "text_column")]


def missing_columns_message(where: str, columns, needed: list[tuple[str, str]]) -> str | None:
    """The one-line problem of a record at ``where`` with ``columns`` that lacks some of ``needed``, or None."""
    missing = [(column, param) for column, param in needed if column not in columns]
    if not missing:
        return None
    have = ", ".join(sorted(map(str, columns))) or "none"
    names = " or ".join(f"'{column}'" for column, _ in missing)
    return f"{where}: no {names} column (has: {have}); set {' and '.join(f'data.{p}' for _, p in missing)}"


def unknown_role_message(where: str, number: int, role: str, turn: int) -> str:
    """The one-line problem of message ``number`` at ``where`` whose role (after data.roles) chat templates do
    not know; ``turn``: how many messages other than system ones come before it (even: a user's turn)."""
    guess = "user" if turn % 2 == 0 else "assistant"
    return (f"{where}: message {number} has role {role!r}, which chat templates do not know "
            f"({', '.join(CHAT_ROLES)}); map it with data.roles, e.g. data.roles: {{{role}: {guess}}}")


def message_parts(message) -> tuple | None:
    """(role, content) of an OpenAI ({role, content}) or ShareGPT ({from, value}, from mapped to a role)
    message, as the data has them; None for anything else."""
    if isinstance(message, dict) and "role" in message and "content" in message:
        return message["role"], message["content"]
    if isinstance(message, dict) and "from" in message and "value" in message:
        return SHAREGPT_ROLES.get(message["from"], message["from"]), message["value"]
    return None


def _role_problem(where: str, messages, roles: dict) -> str | None:
    """The first message of a chat record whose role, mapped by data.roles, chat templates do not know."""
    if not isinstance(messages, list):
        return None
    turn = 0
    for number, message in enumerate(messages, start=1):
        parts = message_parts(message)
        if parts is None or not isinstance(parts[0], str):
            return None  # prepare names the malformed message
        role = parts[0]
        role = roles.get(role, role)
        if role not in CHAT_ROLES:
            return unknown_role_message(where, number, role, turn)
        turn += role != "system"
    return None


def data_column_problems(data, most: int = 3) -> list[str]:
    """What prepare would say of each local data file's first record (data.source: local): a file that does
    not read as its format, or a first record that lacks a column ``data``'s format needs, or (chat) has a
    message whose role chat templates do not know; or that no file holds a record. Past ``most`` files, one
    more line counts the rest."""
    problems, found = [], 0
    for file in data_files(Path(data.path).expanduser()):
        try:
            record = first_record(file)
        except UserError as problem:
            problems.append(str(problem))
            continue
        if record is None:
            continue
        found += 1
        problem = missing_columns_message(record.where, list(record.columns), required_columns(data))
        if problem is None and data.format == "chat":
            problem = _role_problem(record.where, record.columns[data.messages_column], data.roles)
        if problem:
            problems.append(problem)
    if not found and not problems:
        problems.append(too_few_records(data.path, 0))
    if len(problems) > most:
        problems[most:] = [f"and {len(problems) - most} more files like these"]
    return problems


def local_input_problems(sections: dict) -> list[str]:
    """What is wrong with each local input the ``model``, ``data`` and ``evaluate`` sections name: what the
    stage that reads it would say."""
    model, data, general = sections["model"], sections["data"], sections["evaluate"].general_corpus
    checks = []
    if model.source == "local":
        checks.append(lambda: model_path_is_gguf(Path(model.local_path).expanduser()))
    if data.source == "local":
        def data_problems():
            problems = data_column_problems(data)  # raises as data_files does: no such path, no data files
            if problems:
                raise UserError("; ".join(problems))

        checks.append(data_problems)
    if general is not None and general not in BUILTIN_CORPORA:
        checks.append(lambda: corpus_files(general, "evaluate.general_corpus"))
    problems = []
    for check in checks:
        try:
            check()
        except UserError as problem:
            problems.append(str(problem))
    return problems


def untracked_inputs(sections: dict, pipeline: Path = Path("dvc.yaml")) -> list[str]:
    """A line for each local input params name that is not among the deps of the stage reading it in
    ``pipeline`` (nor inside a folder that is): DVC would not re-run that stage when the file changes.
    Empty when there is no ``pipeline`` file."""
    if not pipeline.is_file():
        return []
    import yaml

    stages = (yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}).get("stages") or {}
    root = pipeline.resolve().parent
    model, data, evaluate = sections["model"], sections["data"], sections["evaluate"]
    named = []  # (param, path, stage reading it)
    if model.source == "local" and model.local_path:
        named.append(("model.local_path", model.local_path, "download"))
    if data.source == "local" and data.path:
        named.append(("data.path", data.path, "prepare"))
    if evaluate.general_corpus is not None and evaluate.general_corpus not in BUILTIN_CORPORA:
        named.append(("evaluate.general_corpus", evaluate.general_corpus, "evaluate"))
    named += [("evaluate.lm_eval_tasks", task, "evaluate") for task in evaluate.lm_eval_tasks
              if task.lower().endswith(TASK_FILE_SUFFIXES)]
    lines = []
    for param, value, stage in named:
        deps = [(root / dep).resolve() for dep in (stages.get(stage) or {}).get("deps") or []
                if isinstance(dep, str) and "${" not in dep]
        path = (root / Path(value).expanduser()).resolve()
        if not any(path == dep or dep in path.parents for dep in deps):
            lines.append(f"{param} '{value}' is not among the {stage} stage's deps in dvc.yaml: DVC will not re-run "
                         f"{stage} when it changes; add it there (deps: - {value})")
    return lines


def inert_gate_problem(data, evaluate) -> str | None:
    """A line when evaluate.min_stop_share is set but can never act: no held-out answers to score."""
    if evaluate.min_stop_share is None:
        return None
    if data.format == "text":
        return ("evaluate.min_stop_share has no effect with data.format text: only instruction, chat and completion "
                "data have held-out answers to score")
    if evaluate.max_examples == 0:
        return "evaluate.min_stop_share has no effect with evaluate.max_examples 0: no held-out answers are scored"
    return None

"""lm-evaluation-harness benchmarks run on the model the evaluate step has already loaded.

``evaluate.lm_eval_tasks`` lists what to run. Each entry is either

- the name of a task, group or tag lm-eval knows (``arc_easy``, ``hellaswag``, ``mmlu``; the
  list: ``lm-eval ls tasks``). Its dataset comes from the Hugging Face Hub, or from the local
  datasets cache when offline; or
- the path of a local task YAML file (ending ``.yaml`` or ``.yml``), relative to the project
  root, where ``dvc repro`` runs. It is an lm-eval task config, one task per file, that names
  its task with ``task:``. A task over a local file reads it through ``dataset_path: json``
  (or ``csv``, ``parquet``) and ``dataset_kwargs: {data_files: ...}``; relative ``data_files``
  are relative to the YAML file's directory, so a task and its data move together. (lm-eval's
  own ``lm-eval run --tasks file.yaml`` reads them relative to the working directory instead;
  absolute paths mean the same to both.) Such a task needs no network.
  tests/data/lm_eval/general_knowledge.yaml is a complete example.

``check_tasks`` checks every entry before any weights load and indexes lm-eval's tasks once
(about 10 s: it parses some 14,000 YAML files); ``run_tasks`` then evaluates a loaded model,
once per row (base, fine-tuned), with that index.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorapipe.errors import UserError
from qlorapipe.inputs import TASK_FILE_SUFFIXES

logger = logging.getLogger(__name__)

PARAM = "evaluate.lm_eval_tasks"
# lm-eval's defaults (evaluator.simple_evaluate), so results match its command line.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
# Standard errors of metrics without a closed form (BLEU, F1, ...) are bootstrapped; lm-eval's
# default of 100,000 resamples takes minutes, and 1,000 estimate the same error to a few percent.
BOOTSTRAP_ITERS = 1000
# Keys a task YAML may hold besides TaskConfig's fields: structure lm-eval removes before building.
STRUCTURAL_KEYS = {"tag", "group", "task_list", "class"}


@dataclass(frozen=True)
class HarnessTasks:
    """What check_tasks found, ready for run_tasks.

    Attributes:
        specs: what lm-eval loads, in the order of ``evaluate.lm_eval_tasks``: a name, or the
            config of a local YAML file with its ``data_files`` made absolute.
        names: the name of each entry (a local task's ``task:``).
        local_files: the local task YAML files and the data files they read.
        task_manager: lm-eval's TaskManager, built once (None when there is nothing to run).
    """

    specs: tuple[str | dict, ...]
    names: tuple[str, ...]
    local_files: tuple[Path, ...]
    task_manager: Any = None


def check_tasks(tasks: list[str]) -> HarnessTasks:
    """Check ``evaluate.lm_eval_tasks`` before any model loads, and index lm-eval's tasks once.

    Args:
        tasks: task, group or tag names, and paths of local task YAML files.

    Returns:
        The tasks to give run_tasks.

    Raises:
        UserError: an unknown name (with the closest known names), or a task file that is
            missing, does not parse, defines no ``task:``, has unknown keys or names missing data
            files; every problem in one line.
    """
    if not tasks:
        return HarnessTasks(specs=(), names=(), local_files=())
    from lm_eval.tasks import TaskManager

    problems, specs, names, files = [], [], [], []
    for entry in tasks:
        if entry.lower().endswith(TASK_FILE_SUFFIXES):
            config, entry_files, problem = _local_task(Path(entry).expanduser())
            if problem:
                problems.append(f"{entry}: {problem}")
                continue
            specs.append(config)
            names.append(config["task"])
            files += entry_files
        else:
            specs.append(entry)
            names.append(entry)

    wanted = [spec for spec in specs if isinstance(spec, str)]
    # Indexing lm-eval's own tasks takes seconds; a list of local files does not need it.
    started = time.perf_counter()
    task_manager = TaskManager(include_defaults=bool(wanted))
    if wanted:
        logger.info("indexed %d lm-eval tasks, groups and tags (%.1f s)", len(task_manager.all_tasks),
                    time.perf_counter() - started)
    known = set(task_manager.all_tasks)
    for name in wanted:
        if name not in known:
            problems.append(_unknown_name(name, task_manager.all_tasks))
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"{', '.join(duplicates)} listed more than once (results are keyed by task name)")
    if problems:
        raise UserError(f"{PARAM}: " + "; ".join(problems))
    return HarnessTasks(specs=tuple(specs), names=tuple(names), local_files=tuple(dict.fromkeys(files)),
                        task_manager=task_manager)


def run_tasks(model, tokenizer, spec: HarnessTasks, limit: int | None, batch_size: int, device) -> dict:
    """Evaluate an already loaded model on the checked tasks with lm-eval.

    The model may be a transformers model or a peft PeftModel (4-bit base included); the base
    row is the same PeftModel inside ``with model.disable_adapter():``. The model and tokenizer
    are left as they were (lm-eval switches the model to eval mode and may set a pad token).

    Args:
        model: the loaded causal LM.
        tokenizer: its tokenizer.
        spec: what check_tasks returned.
        limit: at most this many examples per task (None: all).
        batch_size: sequences per forward pass.
        device: the device the model is on (lm-eval puts inputs on the model's own device).

    Returns:
        ``{task: {metric: value}}`` for every task and group lm-eval reports (a group's
        subtasks included), ``task`` being lm-eval's name or a local YAML's ``task:``. Metric
        names drop lm-eval's filter suffix (``acc,none`` -> ``acc``; another filter is appended,
        ``exact_match,strict-match`` -> ``exact_match_strict_match``); each standard error is
        ``<metric>_stderr``; ``samples`` is the number of examples scored. Values are floats to
        6 significant digits (``samples`` an int); non-finite and unavailable values are left out.

    Raises:
        UserError: a Hub task's dataset is neither reachable nor in the datasets cache.
    """
    if not spec.specs:
        return {}
    import copy

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    if torch.device(device).type != model.device.type:
        raise ValueError(f"the model is on {model.device}, not on {device}")
    was_training = model.training
    with _quiet_lm_eval(), _no_download_count():
        # HFLM may give the tokenizer a pad token: a copy keeps the step's own unchanged.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, device=str(device))
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(spec.specs), task_manager=spec.task_manager, limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, write_out=False, **SEEDS)
        except ConnectionError as exc:  # datasets' error for a Hub it cannot reach, after its retries
            raise UserError(f"{PARAM}: a task's dataset could not be loaded ({_one_line(exc)}); run once online so "
                            "the datasets cache holds it (then HF_HUB_OFFLINE=1 reads the cache), or use a "
                            "local task YAML") from exc
        finally:
            model.train(was_training)
    return {task: scores for task, values in results["results"].items() if (scores := _clean_scores(values))}


def _local_task(path: Path) -> tuple[dict | None, list[Path], str | None]:
    """A local task YAML's config with its data files made absolute, the files it reads, or the problem."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        return None, [], "no such file (relative paths start at the project root, where dvc repro runs)"
    try:
        # lm-eval's own loader: it follows `include:` and imports `!function` references.
        config = load_yaml(path, resolve_func=True)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, [], f"does not parse as YAML{where} ({exc.problem})"
    except yaml.YAMLError as exc:
        return None, [], f"does not parse as YAML ({_one_line(exc)})"
    except ValueError as exc:  # not a mapping, or an include cycle
        return None, [], f"is not a task config, a mapping with a `task:` name ({_one_line(exc)})"
    except (OSError, ImportError, AttributeError) as exc:  # a missing include or !function target
        return None, [], f"cannot be loaded ({_one_line(exc)})"
    if "group" in config:
        return None, [], "is a group config: list the YAML files of its tasks instead"
    if not isinstance(config.get("task"), str) or not config["task"]:
        return None, [], "defines no `task:` (add `task: <name>`, the name its results are reported under)"
    problem = _config_problem(config)
    if problem:
        return None, [], problem
    files, problem = _resolve_data_files(config, path.resolve().parent)
    return (None, [], problem) if problem else (config, [path.resolve(), *files], None)


def _config_problem(config: dict) -> str | None:
    """Keys TaskConfig does not have (with the nearest one) and an unknown output_type."""
    from dataclasses import fields

    from lm_eval.api.task import ALL_OUTPUT_TYPES
    from lm_eval.config.task import TaskConfig

    valid = {f.name for f in fields(TaskConfig)} | STRUCTURAL_KEYS
    problems = [_unknown(key, sorted(valid), "key") for key in config if key not in valid]
    output_type = config.get("output_type", "generate_until")
    if output_type not in ALL_OUTPUT_TYPES:
        problems.append(f"output_type {output_type!r} is not one of {', '.join(ALL_OUTPUT_TYPES)}")
    return ", ".join(problems) or None


def _resolve_data_files(config: dict, yaml_dir: Path) -> tuple[list[Path], str | None]:
    """Make ``dataset_kwargs.data_files`` absolute (relative to the YAML's directory) and check they exist.

    data_files is a path, a list of paths, or a mapping of split name to either (datasets'
    load_dataset); a path may be a glob pattern or a URL (left as it is).
    """
    kwargs = config.get("dataset_kwargs") or {}
    data_files = kwargs.get("data_files")
    if data_files is None:
        return [], None
    found, missing = [], []

    def resolve(pattern: str) -> str:
        if "://" in pattern:  # a URL (hf://, https://): datasets fetches it
            return pattern
        absolute = yaml_dir / Path(pattern).expanduser()
        matches = sorted(absolute.parent.glob(absolute.name)) if any(c in pattern for c in "*?[") else [absolute]
        existing = [m for m in matches if m.is_file()]
        if existing:
            found.extend(existing)
        else:
            missing.append(pattern)
        return str(absolute)

    def resolve_all(value):
        return [resolve(str(p)) for p in value] if isinstance(value, list) else resolve(str(value))

    if isinstance(data_files, dict):
        resolved = {split: resolve_all(value) for split, value in data_files.items()}
    else:
        resolved = resolve_all(data_files)
    if missing:
        return [], (f"data_files {', '.join(missing)} not found in {yaml_dir} "
                    "(relative data_files start at the YAML file's directory)")
    config["dataset_kwargs"] = {**kwargs, "data_files": resolved}
    return found, None


def _unknown_name(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return f"{name!r} is not an lm-eval task, group or tag: did you mean {', '.join(close)}?"
    return (f"{name!r} is not an lm-eval task, group or tag (`lm-eval ls tasks` lists them; "
            "a local task file must end in .yaml or .yml)")


def _unknown(key: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"unknown {what} {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _clean_scores(values: dict) -> dict:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    scores = {}
    if isinstance(values.get("sample_len"), int):
        scores["samples"] = values["sample_len"]
    for key, value in values.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            continue  # alias, name, sample_len; "N/A" standard errors; NaN
        if filter_name != "none":
            suffix = filter_name.replace("-", "_")
            metric = (f"{metric.removesuffix('_stderr')}_{suffix}_stderr" if metric.endswith("_stderr")
                      else f"{metric}_{suffix}")
        scores[metric] = float(f"{float(value):.6g}")
    return scores


class _DropLoadedModelWarnings(logging.Filter):
    """HFLM warns on every call that a loaded model (not a name) was passed: that is the design here."""

    WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.WARNINGS)


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs each step at INFO: keep its warnings only, for the duration of a run."""
    lm_eval_logger = logging.getLogger("lm_eval")
    hflm_logger = logging.getLogger("lm_eval.models.huggingface")
    level, drop = lm_eval_logger.level, _DropLoadedModelWarnings()
    lm_eval_logger.setLevel(logging.WARNING)
    hflm_logger.addFilter(drop)
    try:
        yield
    finally:
        hflm_logger.removeFilter(drop)
        lm_eval_logger.setLevel(level)


@contextmanager
def _no_download_count():
    """datasets pings S3 to count every load of its json/csv builders, local files included
    (datasets/load.py, increase_load_count). Offline that waits up to 3 s per task and row; its
    opt-out, HF_UPDATE_DOWNLOAD_COUNTS=0, is read when datasets is imported, so set it here."""
    from datasets import config

    counts = config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = counts

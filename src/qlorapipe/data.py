"""The prepared data on disk: the schema the prepare stage writes and the train, evaluate
and merge stages read.

Each split is an Arrow dataset (``datasets.save_to_disk``) of equal-length rows with three
int32 columns: ``input_ids``, ``labels`` (-100 where no loss is taken: prompts, padding,
the first token of each packed example) and ``position_ids`` (restarting at 0 for each
example packed into a row). Feeding ``position_ids`` without an attention mask is what
makes transformers keep packed examples apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlorapipe.errors import UserError

IGNORE_INDEX = -100  # the label of tokens no loss is taken on (torch cross_entropy's default)
TRAIN_SPLIT = "train"
EVAL_SPLIT = "eval"
COLUMNS = ("input_ids", "labels", "position_ids")
# The held-out examples as questions and answers (instruction, chat and completion data): one
# JSON object per line, {"where", "prompt_ids", "reference_ids"}: the tokens the model is given,
# exactly as in training, and the completion it was trained to produce (its closing EOS left out).
TASKS_FILE = "eval_tasks.jsonl"


def save_rows(input_ids: list[list[int]], labels: list[list[int]], position_ids: list[list[int]],
              out_dir: Path) -> None:
    """Write rows as an Arrow dataset that ``load_split`` reads back.

    The dataset's fingerprint is derived from the content (the default is random), so
    identical data gives byte-identical files and the same DVC hash.
    """
    import datasets

    features = datasets.Features({name: datasets.Sequence(datasets.Value("int32")) for name in COLUMNS})
    columns = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    dataset = datasets.Dataset.from_dict(columns, features=features)
    digest = hashlib.sha256()
    for name in COLUMNS:
        for row in columns[name]:
            digest.update(json.dumps(row).encode())
    dataset._fingerprint = digest.hexdigest()[:16]
    dataset.save_to_disk(str(out_dir))


def save_chunks(chunks: list[list[int]], out_dir: Path) -> None:
    """Write causal-LM chunks: labels are the inputs, positions run 0..len-1."""
    save_rows(chunks, chunks, [list(range(len(c))) for c in chunks], out_dir)


def save_tasks(tasks: list[dict], out_dir: Path) -> None:
    """Write the held-out prompts and references (``TASKS_FILE``) that ``load_tasks`` reads."""
    lines = [json.dumps({"where": t["where"], "prompt_ids": t["prompt_ids"], "reference_ids": t["reference_ids"]})
             for t in tasks]
    (Path(out_dir) / TASKS_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def load_tasks(data_dir: Path) -> list[dict]:
    """The held-out prompts and references; empty for text data (it has none).

    Raises:
        UserError: the prepared data predates this file (run the prepare stage again).
    """
    path = Path(data_dir) / TASKS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; the prepared data was written by an older version: run `dvc repro -f "
                        "prepare`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (and encoding without special tokens does not): then
    every prepared example starts with one BOS, and so must every prompt given to the trained model."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials[:1] == [bos] and without[:1] != [bos]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A rendered chat prompt's token ids as prepare begins a training example: the text's tokens after one BOS
    where the tokenizer adds one and the template did not write it (``apply_chat_template`` adds none)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


class Split:
    """Rows in memory, each column an int64 tensor of rows x length, indexed as a torch-formatted
    ``datasets.Dataset`` is: ``split[i]``, ``split[[i, j]]`` and ``split[a:b]`` give {column: tensor}."""

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key) -> dict:
        return {name: values[key] for name, values in self.columns.items()}


def rows_split(columns: dict[str, list[list[int]]]) -> Split:
    """Equal-length rows given as lists, as a ``Split``."""
    import torch

    return Split({name: torch.tensor(rows, dtype=torch.long) for name, rows in columns.items()})


def load_split(data_dir: Path, split: str) -> Split:
    """Load one prepared split (read with pyarrow: the ``datasets`` package takes seconds to import).

    Raises:
        UserError: the split is missing or incomplete (run the prepare stage).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc
    import torch

    path = Path(data_dir) / split
    if not path.is_dir():
        raise UserError(f"{path}: prepared data not found; run `dvc repro prepare`")
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
        table = pa.concat_tables([pyarrow.ipc.open_stream(str(f)).read_all() for f in files])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        raise UserError(f"{path}: prepared data is incomplete or unreadable ({error}); run `dvc repro -f prepare`") \
            from None
    columns = {}
    for name in COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        lengths = pc.unique(pc.list_value_length(column)).to_pylist() if len(column) else [0]
        if len(lengths) != 1:
            raise UserError(f"{path}: rows of different lengths in {name}; run `dvc repro -f prepare`")
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        columns[name] = torch.from_numpy(values.reshape(len(column), lengths[0]))
    return Split(columns)


def model_inputs(batch, device) -> dict:
    """The keyword arguments a causal LM gets for a batch of prepared rows.

    ``position_ids`` without an attention mask makes transformers build a block-diagonal
    mask for packed rows, but only when no KV cache exists, hence ``use_cache=False``
    (masking_utils._preprocess_mask_arguments; with a cache, packed examples would
    attend to each other).
    """
    inputs = {"input_ids": batch["input_ids"].to(device).long(), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device).long()
    return inputs

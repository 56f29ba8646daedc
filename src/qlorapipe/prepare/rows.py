"""Cutting tokenized examples into the equal-length rows the train loop reads, and the train/eval split."""

from __future__ import annotations

import random
from dataclasses import dataclass

from qlorapipe.data import IGNORE_INDEX
from qlorapipe.errors import UserError
from qlorapipe.prepare.examples import Example


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Split items into disjoint train and eval lists, reproducibly from ``seed``.

    Raises:
        UserError: ``eval_fraction`` of so few items would leave nothing to train on.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise UserError(f"data.eval_fraction={eval_fraction} of {len(items)} examples holds out {n_eval}, leaving none "
                        f"to train on: lower data.eval_fraction or add data")
    eval_ids, train_ids = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [items[i] for i in train_ids], [items[i] for i in eval_ids]


def split_stream(example: Example, eval_fraction: float, max_length: int) -> tuple[Example, Example]:
    """Split one document's token stream (text concat mode) into a train part and a held-out tail.

    A corpus that is one document (a single .txt file) cannot be split by documents; its stream
    is cut instead: the last ``eval_fraction`` of its tokens, at least one row of ``max_length``,
    is held out.

    Raises:
        UserError: the stream is shorter than one train row plus one eval row.
    """
    n = len(example.input_ids)
    n_eval = max(max_length, round(n * eval_fraction))
    if n - n_eval < max_length:
        raise UserError(f"{example.where} is one document of {n} tokens: too few for a train row and an eval row of "
                        f"data.max_length={max_length}; lower data.max_length or add data")
    cut = n - n_eval
    train = Example(example.input_ids[:cut], example.labels[:cut], f"{example.where} (first {cut} tokens)", cut)
    held = Example(example.input_ids[cut:], example.labels[cut:], f"{example.where} (last {n_eval} tokens)", n_eval)
    return train, held


@dataclass(frozen=True)
class Rows:
    """Equal-length rows ready for the train loop."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    padding_tokens: int


def chunk_stream(examples: list[Example], max_length: int) -> tuple[Rows, int]:
    """The reference task's shape: join examples and cut the stream into full chunks.

    Returns:
        The rows and the number of tokens in the tail that fills no whole chunk.
    """
    stream = [t for example in examples for t in example.input_ids]
    n = len(stream) // max_length
    chunks = [stream[i * max_length : (i + 1) * max_length] for i in range(n)]
    positions = [list(range(max_length))] * n
    return Rows(chunks, chunks, positions, 0), len(stream) - n * max_length


def pad_rows(examples: list[Example], pad_id: int) -> Rows:
    """One example per row, right-padded to the longest. Padding is never a target; a
    causal model never attends forward, so right padding needs no attention mask."""
    width = max(len(e.input_ids) for e in examples)
    pads = [width - len(e.input_ids) for e in examples]
    return Rows(input_ids=[e.input_ids + [pad_id] * pad for e, pad in zip(examples, pads)],
                labels=[e.labels + [IGNORE_INDEX] * pad for e, pad in zip(examples, pads)],
                position_ids=[list(range(width)) for _ in examples],
                padding_tokens=sum(pads))


def pack_rows(examples: list[Example], max_length: int, pad_id: int) -> Rows:
    """Pack examples into rows of ``max_length`` (first-fit decreasing, deterministic).

    Position ids restart at 0 for each example; the first token of each example gets
    label -100; the row's tail is padding with label -100.
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted: best fit by bisect
    for i in order:
        size = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            if space - size > 0:
                bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            if max_length - size > 0:
                bisect.insort(free, (max_length - size, len(bins) - 1))
    ids_rows, label_rows, position_rows, padding = [], [], [], 0
    for members in bins:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += list(range(len(e.input_ids)))
        pad = max_length - len(ids)
        padding += pad
        # Padding continues the last example's positions: restarting at 0 would make it a
        # segment of its own, and nothing attends to it either way (causal, label -100).
        positions += list(range(positions[-1] + 1, positions[-1] + 1 + pad))
        ids_rows.append(ids + [pad_id] * pad)
        label_rows.append(labels + [IGNORE_INDEX] * pad)
        position_rows.append(positions)
    return Rows(ids_rows, label_rows, position_rows, padding)

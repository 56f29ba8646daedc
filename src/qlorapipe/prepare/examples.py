"""Turning records into training rows: formats, templates, prompt masking, EOS, packing.

Each format renders a record into *segments*: pieces of text, each marked as prompt
(label -100 when ``completion_only_loss`` is on) or completion (trained on). Segments are
tokenized separately, in one batched fast-tokenizer call, and concatenated, so the
boundary between prompt and completion is exact: the prompt's tokens are what the model
is given at inference, the completion's tokens are what it must produce. (Tokenizing
prompt+completion jointly and masking "the first len(prompt) tokens" goes wrong when a
merge crosses the boundary; trl#1191, LLaMA-Factory#2509.)

Rules every example obeys:
- at most one BOS, and only where the tokenizer itself would put one;
- exactly one EOS at the end, carrying a label: the model learns to stop. Padding has
  label -100 even when the pad token *is* the EOS token, so "stop" is learned from the
  real end of each example and never from padding (trl#1820, llm-course#33);
- with packing, several examples share a row: position ids restart at 0 for each, the
  first token of each example has label -100 (it would be predicted from the previous
  example's EOS), and transformers turns restarting position ids into a block-diagonal
  attention mask (masking_utils.find_packed_sequence_indices), so no token attends
  across an example boundary.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from qlorapipe.data import IGNORE_INDEX, adds_bos
from qlorapipe.errors import UserError
from qlorapipe.inputs import message_parts, missing_columns_message, required_columns, unknown_role_message
from qlorapipe.params import CHAT_ROLES, DataParams
from qlorapipe.prepare.sources import Record

logger = logging.getLogger(__name__)


# The seeds' instruction template ("### Instruction / ### Answer"), alpaca-style with an
# optional input block.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Answer:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Answer:\n"
# guanaco (openassistant-guanaco, the seeds' Llama-2 example): one text column of turns.
GUANACO_TURN = re.compile(r"(### Human:|### Assistant:)")



@dataclass(frozen=True)
class Example:
    """One tokenized example before rows are built."""

    input_ids: list[int]
    labels: list[int]
    where: str
    length_before_truncation: int
    # Where the last completion lies in input_ids (instruction, chat and completion formats,
    # when nothing of it was truncated): the evaluate step asks for it from what precedes it.
    completion: tuple[int, int] | None = None


@dataclass
class Counts:
    """What happened to the records, for the data report (nothing is dropped silently)."""

    records: int = 0
    empty_skipped: int = 0
    duplicates: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_all_masked: int = 0
    examples: int = 0
    lengths: list[int] = field(default_factory=list)  # before truncation, for the histogram
    first_too_long: str | None = None
    first_all_masked: str | None = None


# --- rendering records into segments -----------------------------------------------------


def _text(record: Record, column: str, param: str, optional: bool = False) -> str:
    columns = record.columns
    if column not in columns:
        if optional:
            return ""
        raise UserError(missing_columns_message(record.where, columns, [(column, param)]))
    value = columns[column]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{record.where}: '{column}' is {type(value).__name__}, not text; "
                        f"fix the row or set data.{param}")
    return value


def _messages(record: Record, params: DataParams) -> list[dict]:
    """Read OpenAI ({role, content}) or ShareGPT ({from, value}) messages."""
    column = params.messages_column  # present: render_segments checked the columns
    raw = record.columns[column]
    if not isinstance(raw, list):
        raise UserError(f"{record.where}: '{column}' is {type(raw).__name__}, not a list of messages; "
                        "set data.messages_column")
    messages = []
    for number, message in enumerate(raw, start=1):
        parts = message_parts(message)
        if parts is None:
            have = ", ".join(sorted(message)) if isinstance(message, dict) else type(message).__name__
            raise UserError(f"{record.where}: message {number} has no role/content or from/value keys "
                            f"(has: {have}); fix the row or set data.messages_column")
        role, content = parts
        if not isinstance(content, str):
            raise UserError(f"{record.where}: message {number} content is {type(content).__name__}, not text")
        role = params.roles.get(role, role)
        if role not in CHAT_ROLES:
            turn = sum(m["role"] != "system" for m in messages)
            raise UserError(unknown_role_message(record.where, number, role, turn))
        messages.append({"role": role, "content": content})
    return messages


def _chat_segments(messages: list[dict], render, where: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt and assistant segments.

    The template is rendered for growing prefixes of the conversation: the text an
    assistant turn adds to "conversation so far + generation prompt" is what the model
    must produce. This works with any template whose renderings extend one another.
    """
    import jinja2

    def render_here(part, add_generation_prompt):
        try:
            return render(part, add_generation_prompt)
        except jinja2.TemplateError as error:  # the template's own raise_exception, e.g. roles must alternate
            message = " ".join(str(error).split())
            raise UserError(f"{where}: the chat template refused this conversation ({message}); fix the row, map "
                            "its roles with data.roles or set data.chat_template") from None

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_here(messages[:i], True)
        full = render_here(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(f"{where}: the chat template does not render this conversation as growing "
                            "prefixes, so the assistant tokens cannot be found; set data.chat_template")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render_here(messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def _guanaco_segments(text: str, where: str) -> list[tuple[str, bool]]:
    parts = GUANACO_TURN.split(text)
    if "### Assistant:" not in parts:
        raise UserError(f"{where}: no '### Assistant:' turn in the text; use data.template: alpaca "
                        "or fix data.text_column")
    segments, prompt, trained = [], parts[0], False
    for i in range(1, len(parts), 2):
        marker, body = parts[i], parts[i + 1]
        if marker == "### Assistant:":
            segments += [(prompt + marker, False), (body, True)]
            prompt, trained = "", True
        else:
            prompt += marker + body
    if prompt and trained:
        segments.append((prompt, False))
    return segments


def render_segments(record: Record, params: DataParams, chat_render=None) -> list[tuple[str, bool]]:
    """The (text, is_completion) segments of one record in the params' format.

    Raises:
        UserError: a missing or misnamed column (listing those that exist), non-text values.
    """
    fmt = params.format
    problem = missing_columns_message(record.where, record.columns, required_columns(params))
    if problem:  # every column the format needs, named at once
        raise UserError(problem)
    if fmt == "text":
        return [(_text(record, params.text_column, "text_column"), True)]
    if fmt == "completion":
        return [(_text(record, params.prompt_column, "prompt_column"), False),
                (_text(record, params.completion_column, "completion_column"), True)]
    if fmt == "instruction" and params.template == "guanaco":
        return _guanaco_segments(_text(record, params.text_column, "text_column"), record.where)
    if fmt == "instruction":
        instruction = _text(record, params.instruction_column, "instruction_column")
        extra = _text(record, params.input_column, "input_column", optional=True)
        output = _text(record, params.output_column, "output_column")
        template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
        return [(template.format(instruction=instruction, input=extra), False), (output, True)]
    return _chat_segments(_messages(record, params), chat_render, record.where)


def chat_renderer(tokenizer, template: str | None):
    """A function (messages, add_generation_prompt) -> text using the chat template.

    Raises:
        UserError: the tokenizer has no chat template and data.chat_template is not set.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format is chat but the tokenizer has no chat template; set data.chat_template "
                        "to a Jinja template, or use data.format: instruction")

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render


# --- tokenizing -------------------------------------------------------------------------


def build_examples(records: list[Record], tokenizer, params: DataParams) -> tuple[list[Example], Counts]:
    """Render, tokenize, mask and length-check every record.

    Blank records and exact duplicates are skipped and counted; examples longer than
    ``max_length`` are truncated or dropped (``too_long``); examples with no trained
    token are dropped and counted.

    Raises:
        UserError: bad columns or values (naming the row and param), or more examples with
            every label masked than ``max_masked_share`` allows.
    """
    counts = Counts(records=len(records))
    render = chat_renderer(tokenizer, params.chat_template) if params.format == "chat" else None
    rendered, seen = [], set()
    for record in records:
        segments = render_segments(record, params, render)
        if not any(text.strip() for text, trained in segments if trained):
            counts.empty_skipped += 1
            continue
        key = tuple(segments)
        if key in seen:
            counts.duplicates += 1
            continue
        seen.add(key)
        rendered.append((record.where, segments))
    if params.max_documents is not None:
        rendered = rendered[: params.max_documents]

    tokenized = _tokenize_segments([segments for _, segments in rendered], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = adds_bos(tokenizer)
    mask_prompt = params.completion_only_loss and params.format != "text"
    examples = []
    for (where, _), (ids, trained_mask, last_trained_start, last_trained_end) in zip(rendered, tokenized):
        labels = [token if (trained or not mask_prompt) else IGNORE_INDEX for token, trained in zip(ids, trained_mask)]
        ids, labels = _end_with_one_eos(ids, labels, last_trained_start, last_trained_end, eos, mask_prompt)
        shift = 0
        if add_bos and ids[:1] != [bos]:
            ids, labels, shift = [bos] + ids, [IGNORE_INDEX] + labels, 1
        while len(ids) > 1 and ids[0] == ids[1] == bos:  # a template that writes BOS itself
            ids, labels, shift = ids[1:], labels[1:], shift - 1
        completion = (last_trained_start + shift, min(last_trained_end + shift, len(ids)))
        counts.lengths.append(len(ids))
        length = len(ids)
        if length > params.max_length:
            if params.too_long == "drop":
                counts.dropped_too_long += 1
                counts.first_too_long = counts.first_too_long or where
                continue
            counts.truncated += 1
            counts.first_too_long = counts.first_too_long or where
            ids, labels = ids[: params.max_length], labels[: params.max_length]
            completion = None
        # labels[0] is never a target (nothing precedes it): it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            counts.dropped_all_masked += 1
            counts.first_all_masked = counts.first_all_masked or where
            continue
        examples.append(Example(ids, labels, where, length, completion if params.format != "text" else None))
    _check_counts(counts, len(rendered), params)
    counts.examples = len(examples)
    return examples, counts


def _tokenize_segments(conversations: list[list[tuple[str, bool]]], tokenizer):
    """Each example's token ids, which of them are trained, and the token span of its last trained segment.

    The whole text is tokenized at once, as it will be read at inference, and each token goes with the segment
    its characters are in (its offsets). Tokenizing the segments one by one would differ for tokenizers that
    mark the start of every text they are given (SentencePiece's "▁": an answer "Paris" after "Answer:\n" would
    become "▁", "Paris", tokens the model never reads there). Where a token spans two segments (a merge across
    the prompt's end), the prompt the model is given at inference does not end on a token boundary of the
    whole text: that example's segments are tokenized one by one, as other fine-tuning tools do for all. So is an
    example with a token that has no characters to place, and every example of a tokenizer without offsets.

    Returns:
        per example: (ids, trained per id, last trained segment's first token index, its end index).
    """
    texts = ["".join(text for text, _ in segments) for segments in conversations]
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_tokenize_one_by_one(segments, tokenizer) for segments in conversations]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for segments, ids, offsets in zip(conversations, batch["input_ids"], batch["offset_mapping"]):
        spans, boundaries, position = [], [], 0  # the character span of each trained segment; segment ends
        for text, trained in segments:
            if trained:
                spans.append((position, position + len(text)))
            position += len(text)
            boundaries.append(position)
        # a token spanning two segments, or one with no characters to place (offsets (0, 0)): part by part
        if any(start < boundary < end or start == end for start, end in offsets for boundary in boundaries[:-1]):
            out.append(_tokenize_one_by_one(segments, tokenizer))
            continue
        trained_mask = [any(start < high and end > low for low, high in spans) for start, end in offsets]
        last_start = last_end = 0
        if spans:
            low, high = spans[-1]
            inside = [i for i, (start, end) in enumerate(offsets) if start < high and end > low]
            last_start, last_end = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
        out.append((list(ids), trained_mask, last_start, last_end))
    return out


def _tokenize_one_by_one(segments: list[tuple[str, bool]], tokenizer):
    ids, trained_mask, last_start, last_end = [], [], 0, 0
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            last_start, last_end = len(ids), len(ids) + len(piece)
        ids += piece
        trained_mask += [trained] * len(piece)
    return ids, trained_mask, last_start, last_end


def _end_with_one_eos(ids: list[int], labels: list[int], last_trained_start: int, last_trained_end: int, eos: int,
                      mask_prompt: bool):
    """Cut after the last EOS of the final completion (chat templates close turns with it),
    or append one EOS that the model is trained to produce.

    With the prompt masked, what follows the final completion (a conversation ending with a user
    turn) is left out: none of it is trained, and the EOS closing it is no answer's end to learn.
    Trained whole (``completion_only_loss: false``), the text ends where it ends."""
    end = last_trained_end if mask_prompt else len(ids)
    tail = ids[last_trained_start:end]
    if eos in tail:
        end = last_trained_start + len(tail) - tail[::-1].index(eos)
        ids, labels = ids[:end], labels[:end]
        labels[-1] = eos
        return ids, labels
    return ids[:end] + [eos], labels[:end] + [eos]


def _check_counts(counts: Counts, n_rendered: int, params: DataParams) -> None:
    if n_rendered and counts.dropped_all_masked / n_rendered > params.max_masked_share:
        share = counts.dropped_all_masked / n_rendered
        raise UserError(
            f"{counts.dropped_all_masked} of {n_rendered} examples ({share:.1%}) have every label masked "
            f"(first: {counts.first_all_masked}): the prompt fills data.max_length={params.max_length} or the "
            f"completion is empty; raise data.max_length, or data.max_masked_share={params.max_masked_share} "
            "to drop them"
        )


def text_documents(records: list[Record], tokenizer, params: DataParams) -> tuple[list[Example], Counts]:
    """Raw text for concatenation: each document's tokens followed by one EOS, no BOS."""
    counts = Counts(records=len(records))
    texts, wheres, seen = [], [], set()
    for record in records:
        text = _text(record, params.text_column, "text_column")
        if not text.strip():
            counts.empty_skipped += 1
            continue
        if text in seen:
            counts.duplicates += 1
            continue
        seen.add(text)
        texts.append(text)
        wheres.append(record.where)
    if params.max_documents is not None:
        texts, wheres = texts[: params.max_documents], wheres[: params.max_documents]
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    examples = [Example(ids + [eos], ids + [eos], where, len(ids) + 1) for ids, where in zip(encoded, wheres)]
    counts.lengths = [len(e.input_ids) for e in examples]
    counts.examples = len(examples)
    return examples, counts

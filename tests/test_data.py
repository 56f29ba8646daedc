"""Data preparation: every format's exact labels, EOS/BOS/padding rules, packing, sources, validation."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import build_tokenizer, tiny_config

from qlorapipe import corpora, data, prepare
from qlorapipe.errors import UserError
from qlorapipe.params import DataParams
from qlorapipe.prepare import examples, sources
from qlorapipe.prepare import rows as row_layout
from qlorapipe.prepare.sources import Record

IGNORE = -100
EOS, BOS, PAD = 2, 1, 3  # build_tokenizer's specials: <unk> <s> </s> <pad>
# A minimal chat template in the ChatML spirit: every turn is closed by the EOS token.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def records(*rows: dict) -> list[Record]:
    return [Record(row, f"rows.jsonl:{i}") for i, row in enumerate(rows, start=1)]


def build(rows, tokenizer, **params):
    built, counts = examples.build_examples(records(*rows), tokenizer, DataParams(**params))
    return built, counts


# --- formats: exact label positions --------------------------------------------------


def test_text_concat_joins_documents_with_one_eos_and_cuts_full_chunks(tok):
    texts = ["Python is a programming language.", "The with statement is used to wrap a block."]
    docs, counts = examples.text_documents(records(*({"text": t} for t in texts)), tok, DataParams())
    stream = [t for text in texts for t in enc(tok, text) + [EOS]]
    rows, tail = row_layout.chunk_stream(docs, 8)
    assert [t for row in rows.input_ids for t in row] == stream[: 8 * (len(stream) // 8)]
    assert rows.labels == rows.input_ids and tail == len(stream) % 8
    assert rows.position_ids == [list(range(8))] * len(rows.input_ids)
    assert BOS not in stream and counts.examples == 2


def test_text_document_mode_is_one_example_per_document_trained_everywhere(tok):
    (example,), _ = build([{"text": "Python is a programming language."}], tok, format="text", text_mode="document")
    ids = enc(tok, "Python is a programming language.") + [EOS]
    assert example.input_ids == ids and example.labels == ids


def test_max_documents_keeps_the_first_distinct_documents_after_blanks_and_duplicates(tok):
    texts = ["First document.", "  ", "First document.", "Second one.", "Third one.", "Fourth one."]
    docs, counts = examples.text_documents(records(*({"text": t} for t in texts)), tok, DataParams(max_documents=2))
    assert [d.input_ids for d in docs] == [enc(tok, t) + [EOS] for t in ("First document.", "Second one.")]
    assert (counts.records, counts.empty_skipped, counts.duplicates, counts.examples) == (6, 1, 1, 2)
    rows = [{"instruction": f"Q{i}.", "output": f"A{i}."} for i in (1, 1, 2, 3)]
    built, counts = build(rows, tok, format="instruction", max_documents=2)
    assert [b.where for b in built] == ["rows.jsonl:1", "rows.jsonl:3"] and counts.duplicates == 1


def test_alpaca_instruction_masks_the_prompt_and_trains_answer_and_eos(tok):
    (example,), _ = build([{"instruction": "Define a list.", "output": "A sequence."}], tok, format="instruction")
    prompt = enc(tok, "### Instruction:\nDefine a list.\n\n### Answer:\n")
    answer = enc(tok, "A sequence.")
    assert example.input_ids == prompt + answer + [EOS]
    assert example.labels == [IGNORE] * len(prompt) + answer + [EOS]


def test_a_sentencepiece_style_tokenizer_trains_on_the_tokens_inference_reads():
    """Llama 2's and Mistral's tokenizers mark the start of every text they are given ("▁"): segments tokenized
    one by one would teach "▁", "P", "aris" after "### Answer:\n", which the whole text never holds there. Where
    a token spans the prompt's end, the segments are tokenized one by one (the prompt then ends on a token)."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sentencepiece_style(extra: list[str]):
        spm = Tokenizer(models.BPE(unk_token="<unk>"))
        spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        spm.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        spm.train_from_iterator(CORPUS.splitlines() + extra,
                                trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
        return PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    prompt, answer = "### Instruction:\nName the capital.\n\n### Answer:\n", "Paris"
    row = records({"instruction": "Name the capital.", "output": answer})
    for extra, merged in (([], False), (["### Answer:\nParis"] * 50, True)):  # the second merges ":\nParis"
        tokenizer = sentencepiece_style(extra)

        def ids(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        eos = tokenizer.eos_token_id
        whole, one_by_one = ids(prompt + answer), ids(prompt) + ids(answer)
        assert whole != one_by_one
        (example,), _ = examples.build_examples(row, tokenizer, DataParams(format="instruction"))
        assert example.input_ids == (one_by_one if merged else whole) + [eos]
        n_prompt = len(ids(prompt))
        assert example.input_ids[:n_prompt] == ids(prompt)  # what the model is given at inference
        assert example.labels == [IGNORE] * n_prompt + example.input_ids[n_prompt:]
        assert tokenizer.decode(example.input_ids[n_prompt:-1]).strip() == "Paris"
        assert example.completion == (n_prompt, len(example.input_ids) - 1)  # the answer, before the EOS


def test_alpaca_input_block_and_full_loss_option(tok):
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    (masked,), _ = build([row], tok, format="instruction")
    prompt = enc(tok, "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Answer:\n")
    assert masked.input_ids == prompt + enc(tok, "5") + [EOS]
    assert masked.labels[: len(prompt)] == [IGNORE] * len(prompt)
    (full,), _ = build([row], tok, format="instruction", completion_only_loss=False)
    assert full.labels == full.input_ids


def test_guanaco_text_trains_only_the_assistant_turns(tok):
    text = "### Human: Hi there### Assistant: Hello.### Human: Bye### Assistant: Goodbye."
    (example,), _ = build([{"text": text}], tok, format="instruction", template="guanaco")
    pieces = [("### Human: Hi there### Assistant:", False), (" Hello.", True),
              ("### Human: Bye### Assistant:", False), (" Goodbye.", True)]
    ids, labels = [], []
    for text_piece, trained in pieces:
        ids += enc(tok, text_piece)
        labels += enc(tok, text_piece) if trained else [IGNORE] * len(enc(tok, text_piece))
    assert example.input_ids == ids + [EOS] and example.labels == labels + [EOS]
    with pytest.raises(UserError, match=r"rows.jsonl:1: no '### Assistant:' turn"):
        build([{"text": "### Human: only a question"}], tok, format="instruction", template="guanaco")


def test_prompt_completion_pairs(tok):
    (example,), _ = build([{"q": "Python is", "a": " a language."}], tok, format="completion",
                          prompt_column="q", completion_column="a")
    prompt, completion = enc(tok, "Python is"), enc(tok, " a language.")
    assert example.input_ids == prompt + completion + [EOS]
    assert example.labels == [IGNORE] * len(prompt) + completion + [EOS]


def _chat_expected(tok, turns):
    ids, labels = [], []
    for text_piece, trained in turns:
        piece = enc(tok, text_piece)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


@pytest.mark.parametrize("spelling", ["openai", "sharegpt"])
def test_chat_uses_the_template_and_trains_each_assistant_turn_with_its_eos(tok, spelling):
    turns = [("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Goodbye.")]
    if spelling == "openai":
        messages = [{"role": r, "content": c} for r, c in turns]
    else:
        messages = [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in turns]
    (example,), _ = build([{"messages": messages}], tok, format="chat", chat_template=CHAT_TEMPLATE)
    ids, labels = _chat_expected(tok, [("<|user|>Hi</s><|assistant|>", False), ("Hello.</s>", True),
                                       ("<|user|>Bye</s><|assistant|>", False), ("Goodbye.</s>", True)])
    assert example.input_ids == ids and example.labels == labels
    assert example.input_ids[-1] == EOS and example.input_ids[-2] != EOS  # exactly one EOS at the end


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_a_conversation_ending_with_a_user_turn_is_not_taught_to_stop_after_it(tok, completion_only_loss):
    """The final answer's EOS is the trained end; the user turn after it is left out when prompts are masked
    (its closing EOS carried a label before), and kept whole, ending with its own EOS, when the text is trained
    whole."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    (example,), _ = build([{"messages": messages}], tok, format="chat", chat_template=CHAT_TEMPLATE,
                          completion_only_loss=completion_only_loss)
    if completion_only_loss:
        ids, labels = _chat_expected(tok, [("<|user|>Hi</s><|assistant|>", False), ("Hello.</s>", True)])
    else:
        ids, labels = _chat_expected(tok, [("<|user|>Hi</s><|assistant|>Hello.</s><|user|>Bye</s>", True)])
    assert example.input_ids == ids and example.labels == labels
    assert example.input_ids[-1] == EOS and example.labels[-1] == EOS


def test_chat_roles_templates_do_not_know_are_named_with_their_row_or_mapped_by_params(tok):
    rows = [{"messages": [{"role": "customer", "content": "Hi"}, {"role": "bot", "content": "Hello."}]},
            {"messages": [{"role": "customer", "content": "Bye"}, {"role": "robot", "content": "Goodbye."}]}]
    # the hint maps each role to its turn's: the first message is the user's
    with pytest.raises(UserError, match=r"rows.jsonl:1: message 1 has role 'customer', which chat templates do not "
                                        r"know .*; map it with data.roles, e.g. data.roles: \{customer: user\}"):
        build(rows, tok, format="chat", chat_template=CHAT_TEMPLATE)
    with pytest.raises(UserError, match=r"rows.jsonl:2: message 2 has role 'robot'.*\{robot: assistant\}"):
        build(rows, tok, format="chat", chat_template=CHAT_TEMPLATE, roles={"customer": "user", "bot": "assistant"})
    mapped, counts = build(rows, tok, format="chat", chat_template=CHAT_TEMPLATE,
                           roles={"customer": "user", "bot": "assistant", "robot": "assistant"})
    assert counts.examples == 2 and counts.empty_skipped == 0
    ids, labels = _chat_expected(tok, [("<|user|>Hi</s><|assistant|>", False), ("Hello.</s>", True)])
    assert mapped[0].input_ids == ids and mapped[0].labels == labels


def test_a_conversation_the_chat_template_refuses_is_named_with_its_row(tok):
    """Templates such as Llama 2's and Mistral's raise_exception when user and assistant turns do not alternate."""
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fine = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    twice = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "There?"},
                          {"role": "assistant", "content": "Hello"}]}
    assert len(build([fine], tok, format="chat", chat_template=alternating)[0]) == 1
    with pytest.raises(UserError, match=r"^rows.jsonl:2: the chat template refused this conversation \(Conversation "
                                        r"roles must alternate user/assistant/user/assistant/...\); fix the row"):
        build([fine, twice], tok, format="chat", chat_template=alternating)


def test_chat_without_any_template_is_refused(tok):
    with pytest.raises(UserError, match="tokenizer has no chat template; set data.chat_template"):
        build([{"messages": [{"role": "user", "content": "Hi"}]}], tok, format="chat")


def test_no_double_bos_when_the_tokenizer_and_the_template_both_add_one():
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert tok("Hi")["input_ids"][0] == BOS  # this tokenizer adds BOS itself
    (plain,), _ = build([{"prompt": "Hi", "completion": " there"}], tok, format="completion")
    assert plain.input_ids[0] == BOS and plain.input_ids[1] != BOS and plain.labels[0] == IGNORE
    (templated,), _ = build([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
                            tok, format="chat", chat_template="<s>" + CHAT_TEMPLATE)
    assert templated.input_ids[0] == BOS and templated.input_ids[1] != BOS


# --- padding, EOS and packing --------------------------------------------------------


def test_pad_equal_to_eos_never_hides_the_real_eos(tok):
    built, _ = build([{"prompt": "Hi", "completion": " there"}, {"prompt": "Python is", "completion": " a long answer."}],
                     tok, format="completion")
    rows = row_layout.pad_rows(built, pad_id=EOS)  # as with tokenizers whose pad token is the EOS token
    short = min(range(2), key=lambda i: len(built[i].input_ids))
    n = len(built[short].input_ids)
    assert rows.input_ids[short][n - 1] == EOS and rows.labels[short][n - 1] == EOS  # the stop is learned
    assert rows.input_ids[short][n:] == [EOS] * (len(rows.input_ids[short]) - n)
    assert rows.labels[short][n:] == [IGNORE] * (len(rows.labels[short]) - n)  # padding is not


def test_packing_restarts_positions_and_masks_each_examples_first_token(tok):
    a = examples.Example([10, 11, 12, EOS], [IGNORE, 11, 12, EOS], "a", 4)
    b = examples.Example([20, 21, EOS], [20, 21, EOS], "b", 3)
    c = examples.Example([30, 31, 32, 33, 34, EOS], [IGNORE, IGNORE, 32, 33, 34, EOS], "c", 6)
    rows = row_layout.pack_rows([a, b, c], max_length=8, pad_id=PAD)
    assert rows.input_ids == [[30, 31, 32, 33, 34, EOS, PAD, PAD], [10, 11, 12, EOS, 20, 21, EOS, PAD]]
    assert rows.labels == [[IGNORE, IGNORE, 32, 33, 34, EOS, IGNORE, IGNORE],
                           [IGNORE, 11, 12, EOS, IGNORE, 21, EOS, IGNORE]]
    assert rows.position_ids == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert rows.padding_tokens == 3


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_row_gives_each_example_the_logits_it_has_alone(tok, attention):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", len(tok))
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).eval()
    built, _ = build([{"prompt": "Python is", "completion": " a language."},
                      {"prompt": "The with statement", "completion": " wraps a block."}], tok, format="completion")
    rows = row_layout.pack_rows(built, max_length=64, pad_id=PAD)
    assert len(rows.input_ids) == 1
    batch = {name: torch.tensor(getattr(rows, name)) for name in ("input_ids", "position_ids")}
    with torch.no_grad():
        packed = model(**data.model_inputs(batch, "cpu")).logits[0]
        start = 0
        for example in sorted(built, key=lambda e: e.where):
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            n = len(example.input_ids)
            assert torch.allclose(packed[start : start + n], alone, atol=1e-5)
            start += n
        # Without the position ids, or with a KV cache (the default, also in train mode), the
        # second example would see the first one.
        second = slice(len(built[0].input_ids), start)
        unpacked = model(input_ids=batch["input_ids"]).logits[0]
        assert not torch.allclose(unpacked[second], packed[second], atol=1e-3)
        model.train()
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert not torch.allclose(cached[second], packed[second], atol=1e-3)


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("row, fmt, message", [
    ({"answer": "a", "output": "b"}, "instruction",
     "no 'instruction' column (has: answer, output); set data.instruction_column"),
    ({"question": "q", "answer": "a"}, "instruction",
     "no 'instruction' or 'output' column (has: answer, question); set data.instruction_column and data.output_column"),
    ({"prompt": "q", "reply": "a"}, "completion",
     "no 'completion' column (has: prompt, reply); set data.completion_column"),
])
def test_every_missing_column_is_named_at_once_with_the_columns_that_exist(tok, row, fmt, message):
    with pytest.raises(UserError) as found:
        build([row], tok, format=fmt)
    assert str(found.value).endswith("rows.jsonl:1: " + message)


def test_non_text_values_name_the_row_and_param(tok):
    with pytest.raises(UserError, match=r"rows.jsonl:2: 'output' is int, not text; fix the row or set "
                                        r"data.output_column"):
        build([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 7}], tok, format="instruction")


def test_too_long_examples_are_truncated_or_dropped_and_counted(tok):
    rows = [{"prompt": "Hi", "completion": " " + "Python is a programming language. " * 4},
            {"prompt": "Hi", "completion": " there"}]
    kept, counts = build(rows, tok, format="completion", max_length=12)
    assert counts.truncated == 1 and len(kept) == 2
    assert len(kept[0].input_ids) == 12 and kept[0].input_ids[-1] != EOS  # a cut example must not learn to stop
    kept, counts = build(rows, tok, format="completion", max_length=12, too_long="drop")
    assert counts.dropped_too_long == 1 and len(kept) == 1
    assert counts.lengths[0] > 12  # the histogram sees lengths before truncation


def test_all_masked_examples_stop_the_stage_past_the_threshold(tok):
    long_prompt = "Python is a programming language. " * 4
    rows = [{"prompt": long_prompt, "completion": " yes"}] + [{"prompt": "Hi", "completion": f" {w}"}
                                                              for w in ("a", "b", "c")]
    with pytest.raises(UserError, match=r"1 of 4 examples \(25.0%\) have every label masked \(first: rows.jsonl:1\)"
                                        r".*data.max_masked_share=0.05"):
        build(rows, tok, format="completion", max_length=12)
    kept, counts = build(rows, tok, format="completion", max_length=12, max_masked_share=0.5)
    assert counts.dropped_all_masked == 1 and len(kept) == 3


def test_duplicates_and_blank_records_are_counted_not_silently_dropped(tok):
    rows = [{"prompt": "Hi", "completion": " there"}, {"prompt": "Hi", "completion": " there"},
            {"prompt": "Hi", "completion": "  "}]
    kept, counts = build(rows, tok, format="completion")
    assert (len(kept), counts.duplicates, counts.empty_skipped, counts.records) == (1, 1, 1, 3)


def test_split_is_seeded_disjoint_and_complete():
    items = [f"example {i}" for i in range(50)]
    train, held_out = row_layout.split(items, 0.2, seed=7)
    assert (len(train), len(held_out)) == (40, 10)
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(items)
    assert row_layout.split(items, 0.2, seed=7) == (train, held_out)
    assert row_layout.split(items, 0.2, seed=8)[1] != held_out
    assert [len(part) for part in row_layout.split(items[:3], 0.5, seed=7)] == [1, 2]  # at least one of each
    with pytest.raises(UserError, match=r"^data.eval_fraction=0.75 of 2 examples holds out 2, leaving none to train "
                                        r"on: lower data.eval_fraction or add data$"):
        row_layout.split(items[:2], 0.75, seed=7)


# --- sources -------------------------------------------------------------------------


def _local(path: Path, **kwargs) -> list[Record]:
    return sources.load_records(DataParams(source="local", path=str(path), **kwargs))[0]


def test_files_with_a_byte_order_mark_and_long_csv_cells_read_as_written(tmp_path):
    """Excel's "CSV UTF-8" and Notepad start a file with a BOM; a CSV cell may hold a whole chapter."""
    from qlorapipe.inputs import data_column_problems

    bom = "\ufeff".encode()
    long_answer = "word " * 40_000  # 200,000 characters: past csv's default field limit
    (tmp_path / "a.csv").write_bytes(bom + f'instruction,output\nq,"{long_answer}"\n'.encode())
    (tmp_path / "b.jsonl").write_bytes(bom + json.dumps({"instruction": "q2", "output": "a2"}).encode() + b"\n")
    (tmp_path / "c.json").write_bytes(bom + json.dumps([{"instruction": "q3", "output": "a3"}]).encode())
    records = _local(tmp_path, format="instruction")
    assert [r.columns["instruction"] for r in records] == ["q", "q2", "q3"]
    assert records[0].columns["output"] == long_answer
    assert data_column_problems(DataParams(source="local", path=str(tmp_path), format="instruction")) == []
    (tmp_path / "notes.txt").write_bytes(bom + b"Plain text.")
    assert _local(tmp_path / "notes.txt")[0].columns["text"] == "Plain text."
    (tmp_path / "a.csv").write_bytes(b'instruction,output\nq,"a\n')  # a quoted field never closed
    with pytest.raises(UserError, match=rf"^{tmp_path / 'a.csv'}:2: not valid CSV"):
        _local(tmp_path / "a.csv", format="instruction")


def test_the_check_stage_reads_each_local_files_first_record_for_the_columns_the_format_needs(tmp_path):
    """What prepare would refuse at its first record, refused before DVC deletes prepare's outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qlorapipe.inputs import data_column_problems

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    (folder / "b.csv").write_text("prompt,reply\np,r\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}]), folder / "c.parquet")
    (folder / "d.json").write_text(json.dumps([{"question": "q"}]))  # read through
    (folder / "f.csv").write_text("question,answer\n")  # a header alone: no record, as for prepare
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]).slice(0, 0), folder / "g.parquet")  # no rows
    completion = DataParams(source="local", path=str(folder), format="completion")
    assert data_column_problems(completion, most=9) == [
        (f"{folder / 'a.jsonl'}:2: no 'prompt' or 'completion' column (has: answer, question); "
         "set data.prompt_column and data.completion_column"),
        f"{folder / 'b.csv'}:2: no 'completion' column (has: prompt, reply); set data.completion_column",
        (f"{folder / 'd.json'}:1: no 'prompt' or 'completion' column (has: question); "
         "set data.prompt_column and data.completion_column")]
    assert data_column_problems(replace(completion, completion_column="reply"), most=9) == [
        (f"{folder / 'a.jsonl'}:2: no 'prompt' or 'reply' column (has: answer, question); "
         "set data.prompt_column and data.completion_column"),
        f"{folder / 'c.parquet'}:1: no 'reply' column (has: completion, prompt); set data.completion_column",
        (f"{folder / 'd.json'}:1: no 'prompt' or 'reply' column (has: question); "
         "set data.prompt_column and data.completion_column")]
    # many files with the same problem: the first few, and a count of the rest
    many = tmp_path / "many"
    many.mkdir()
    for i in range(6):
        (many / f"{i}.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    found = data_column_problems(replace(completion, path=str(many)))
    assert len(found) == 4 and found[-1] == "and 3 more files like these"
    text = tmp_path / "notes.txt"
    text.write_text("plain text")
    assert data_column_problems(DataParams(source="local", path=str(text))) == []
    assert data_column_problems(DataParams(source="local", path=str(text), format="instruction")) == [
        (f"{text}: no 'instruction' or 'output' column (has: text); set data.instruction_column and "
         "data.output_column")]


def test_the_check_stage_refuses_a_first_record_prepare_would_refuse_with_prepares_words(tmp_path):
    """A file that does not read as its format, or a source with no record at all, stops `dvc repro` in the
    check stage, before DVC deletes prepare's outputs, with the message prepare would give."""
    from qlorapipe.inputs import data_column_problems

    def problems_and_prepares(path):
        data = DataParams(source="local", path=str(path), format="instruction")
        found = data_column_problems(data)
        with pytest.raises(UserError) as refused:
            _local(path, format="instruction")
        return found, str(refused.value)

    bad = {"a.jsonl": b"\n{not json\n", "b.jsonl": b'["a list"]\n', "c.csv": b'instruction,output\nq,"a\n',
           "d.parquet": b"PAR1 not parquet", "e.jsonl": b"\xff\xfe{}\n", "f.json": b"{"}
    for name, content in bad.items():
        file = tmp_path / name
        file.write_bytes(content)
        found, prepares = problems_and_prepares(file)
        if file.suffix == ".parquet":  # pyarrow words a footer read and a whole read differently
            found, prepares = [found[0].split(" (")[0]], prepares.split(" (")[0]
        assert found == [prepares], name
        file.unlink()
    assert found[0].startswith(f"{tmp_path / 'f.json'}: not valid JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_text("\n\n")
    (empty / "b.csv").write_text("instruction,output\n")
    assert data_column_problems(DataParams(source="local", path=str(empty), format="instruction")) == [
        f"{empty}: 0 record(s); need at least 2, one for training and one for evaluation: add data, or for raw "
        "text use data.format: text with data.text_mode: concat"]
    with pytest.raises(UserError, match=rf"^{empty}: 0 record\(s\); need at least 2"):  # before any tokenizer
        prepare.run(DataParams(source="local", path=str(empty), format="instruction"), tmp_path / "no-model", None)


def test_the_check_stage_reads_a_chat_records_roles_and_suggests_the_turns_role(tmp_path):
    """A role prepare would refuse at the first record, refused before DVC deletes prepare's outputs, with the
    role its turn has (system messages do not count as turns)."""
    from qlorapipe.inputs import data_column_problems
    from qlorapipe.params import CHAT_ROLES

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "customer", "content": "Hi"},
                                              {"role": "bot", "content": "Hello."}]}) + "\n")
    chat = DataParams(source="local", path=str(chats), format="chat")
    known = ", ".join(CHAT_ROLES)
    assert data_column_problems(chat) == [
        f"{chats}:1: message 2 has role 'customer', which chat templates do not know ({known}); "
        "map it with data.roles, e.g. data.roles: {customer: user}"]
    assert data_column_problems(replace(chat, roles={"customer": "user"})) == [
        f"{chats}:1: message 3 has role 'bot', which chat templates do not know ({known}); "
        "map it with data.roles, e.g. data.roles: {bot: assistant}"]
    assert data_column_problems(replace(chat, roles={"customer": "user", "bot": "assistant"})) == []
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                      {"from": "gpt", "value": "Hello."}]}) + "\n")
    assert data_column_problems(replace(chat, path=str(sharegpt), messages_column="conversations")) == []


def test_every_local_file_type_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"prompt": "p1", "completion": "c1"}) + "\n\n")
    (folder / "b.json").write_text(json.dumps({"data": [{"prompt": "p2", "completion": "c2"}]}))
    (folder / "c.csv").write_text("prompt,completion\np3,\"c3, with a comma\"\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p4", "completion": "c4"}]), folder / "d.parquet")
    (folder / "notes.md").write_text("ignored")
    found = _local(folder)
    assert [r.columns["completion"] for r in found] == ["c1", "c2", "c3, with a comma", "c4"]
    assert [Path(r.where).name for r in found] == ["a.jsonl:1", "b.json:1", "c.csv:2", "d.parquet:1"]


def test_invalid_json_and_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: not valid JSON"):
        _local(path)
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: not UTF-8 text"):
        _local(path)


def test_hub_loader_reads_a_pinned_split_offline(tmp_path, monkeypatch, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "org-dataset"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": f"document {i}"} for i in range(5)]),
                   repo / "data" / "train-00000-of-00001.parquet")
    params = DataParams(source="hub", path=str(repo), revision="main", split="train")
    found, origin = sources.load_records(params)
    assert [r.columns["text"] for r in found] == [f"document {i}" for i in range(5)]
    assert origin.startswith("hub:") and found[0].where.endswith("[train]:1")


def _fake_chatterbot_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(corpora.CHATTERBOT_ENGLISH_DIR + "computers.yml",
                         "categories:\n- computers\nconversations:\n- - What is a computer?\n"
                         "  - An electronic device.\n  - The thing you are using.\n- - Count?\n  - 42\n")
        archive.writestr("chatterbot_corpus/data/french/x.yml", "conversations:\n- - Bonjour\n  - Salut\n")
    return path


def test_chatterbot_pairs_every_answer_with_its_question(tmp_path, monkeypatch):
    wheel = _fake_chatterbot_wheel(tmp_path / "c.whl")
    monkeypatch.setattr(corpora, "fetch_chatterbot_wheel", lambda fallback: wheel)
    found = sources.chatterbot_records()
    assert [(r.columns["instruction"], r.columns["output"]) for r in found] == [
        ("What is a computer?", "An electronic device."), ("What is a computer?", "The thing you are using."),
        ("Count?", "42")]
    assert found[0].columns["messages"][1] == {"role": "assistant", "content": "An electronic device."}
    assert found[2].where == "chatterbot:computers.yml:2"
    assert corpora.general_texts(corpora.CHATTERBOT, "evaluate.general_corpus") == [
        "What is a computer?\nAn electronic device.", "What is a computer?\nThe thing you are using.", "Count?\n42"]


def test_chatterbot_wheel_is_fetched_from_the_index_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAPIPE_CACHE", str(tmp_path))
    try:
        wheel = corpora.fetch_chatterbot_wheel("offline")
    except UserError as exc:
        pytest.skip(f"package index unreachable: {exc}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert digest == corpora.CHATTERBOT_WHEEL_SHA256
    pairs = corpora.chatterbot_pairs(wheel)
    assert 1500 < len(pairs) < 4000
    wheel.write_bytes(b"tampered")  # a cached file with the wrong hash is not trusted
    assert corpora.fetch_chatterbot_wheel("offline").read_bytes() != b"tampered"


def test_general_corpus_from_local_text_and_its_errors(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n")
    (tmp_path / "b.txt").write_text("First document.\n")  # repeated: kept once
    (tmp_path / "c.txt").write_text("   \n")  # blank: skipped
    assert corpora.general_texts(str(tmp_path), "evaluate.general_corpus") == ["First document.\n"]
    assert corpora.general_texts(corpora.PYTHON_DOCS, "k")[0].strip()
    with pytest.raises(UserError, match="evaluate.general_corpus '.*missing' does not exist"):
        corpora.general_texts(str(tmp_path / "missing"), "evaluate.general_corpus")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(UserError, match="is not a .txt file"):
        corpora.general_texts(str(tmp_path / "d.json"), "evaluate.general_corpus")
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="e.txt: not UTF-8 text"):
        corpora.general_texts(str(tmp_path), "evaluate.general_corpus")


# --- storage -------------------------------------------------------------------------


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_rows_give_byte_identical_datasets(tmp_path):
    data.save_chunks([[1, 2, 3, 4], [5, 6, 7, 8]], tmp_path / "a")
    data.save_chunks([[1, 2, 3, 4], [5, 6, 7, 8]], tmp_path / "b")
    data.save_chunks([[1, 2, 3, 4], [5, 6, 7, 9]], tmp_path / "c")
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    loaded = data.load_split(tmp_path, "a")
    assert loaded[1]["input_ids"].tolist() == [5, 6, 7, 8] == loaded[1]["labels"].tolist()
    assert loaded[1]["position_ids"].tolist() == [0, 1, 2, 3]


def test_a_split_reads_as_datasets_reads_it_and_bad_splits_are_named(tmp_path):
    """load_split (pyarrow, no datasets import) gives what a torch-formatted datasets.Dataset gives, for
    every way the stages index it; a split written half or with ragged rows is one line naming it."""
    import datasets
    import torch

    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    data.save_rows(rows, [[-100, 2, 3, 4]] * 3, [[0, 1, 0, 1]] * 3, tmp_path / "a")
    loaded = data.load_split(tmp_path, "a")
    reference = datasets.load_from_disk(str(tmp_path / "a"))
    reference.set_format("torch", columns=list(data.COLUMNS))
    assert len(loaded) == len(reference) == 3
    for key in (1, [2, 0], slice(1, 3), slice(2, 9)):
        for name in data.COLUMNS:
            assert torch.equal(loaded[key][name], reference[key][name])
            assert loaded[key][name].dtype == reference[key][name].dtype == torch.int64

    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [3]]})
    ragged.save_to_disk(str(tmp_path / "ragged"))
    with pytest.raises(UserError, match=r"ragged: rows of different lengths in input_ids; run `dvc repro -f prepare`"):
        data.load_split(tmp_path, "ragged")
    (tmp_path / "a" / "state.json").unlink()
    with pytest.raises(UserError, match=r"a: prepared data is incomplete or unreadable .*; run `dvc repro -f prepare`$"):
        data.load_split(tmp_path, "a")


def test_builtin_corpus_is_real_prose_that_needs_no_download():
    found, _ = sources.load_records(DataParams())
    assert len(found) > 50
    assert sum(len(r.columns["text"]) for r in found) > 300_000  # characters of reference-manual prose


def test_packing_holds_through_the_trained_qlora_model_in_training_mode(tok, tiny_llama_dir):
    """The real path: 4-bit base, LoRA, gradient checkpointing, train mode (where a KV cache
    would otherwise be created and examples would see each other)."""
    import torch

    from qlorapipe import modeling
    from qlorapipe.params import LoraParams, QuantizationParams

    torch.manual_seed(0)
    model, _ = modeling.load_base_model(tiny_llama_dir, QuantizationParams(compute_dtype="float32"), torch.device("cpu"))
    model = modeling.add_lora(model, LoraParams(rank=4, alpha=8, dropout=0.0), True, True)
    model.train()
    built, _ = build([{"prompt": "Python is", "completion": " a language."},
                      {"prompt": "Classes bundle data", "completion": " and behaviour."}], tok, format="completion")
    rows = row_layout.pack_rows(built, max_length=64, pad_id=PAD)
    batch = {name: torch.tensor(getattr(rows, name)) for name in ("input_ids", "position_ids")}
    with torch.no_grad():
        packed = model(**data.model_inputs(batch, "cpu")).logits[0]
        start = 0
        for example in sorted(built, key=lambda e: e.where):
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
            n = len(example.input_ids)
            assert torch.allclose(packed[start : start + n], alone, atol=1e-4)
            start += n


# --- held-out prompts and references (the evaluate step's task scores) ---------------


def test_held_out_tasks_are_the_training_prompt_and_the_last_answer(tok):
    from qlorapipe.prepare import held_out_tasks

    messages = [{"role": "user", "content": "Python is"}, {"role": "assistant", "content": "a language."},
                {"role": "user", "content": "The with statement"}, {"role": "assistant", "content": "wraps a block."}]
    (chat,), _ = build([{"messages": messages}], tok, format="chat", chat_template=CHAT_TEMPLATE)
    (instruction,), _ = build([{"instruction": "Define a list", "output": "A sequence."}], tok, format="instruction")
    (text,), _ = build([{"text": "Python is a programming language."}], tok, format="text", text_mode="document")
    tasks = held_out_tasks([chat, instruction, text], EOS)
    assert len(tasks) == 2  # text data has no prompt to answer
    # The chat prompt is everything before the last answer, earlier answers included, as trained.
    assert tok.decode(tasks[0]["prompt_ids"]) == (
        "<|user|>Python is</s><|assistant|>a language.</s><|user|>The with statement</s><|assistant|>")
    assert tasks[0]["prompt_ids"] + tasks[0]["reference_ids"] + [EOS] == chat.input_ids  # EOS closes, not answers
    assert tok.decode(tasks[0]["reference_ids"]) == "wraps a block."
    assert tok.decode(tasks[1]["prompt_ids"]) == "### Instruction:\nDefine a list\n\n### Answer:\n"
    assert tok.decode(tasks[1]["reference_ids"]) == "A sequence."


def test_truncated_answers_are_not_held_out_tasks(tok):
    from qlorapipe.prepare import held_out_tasks

    long = {"prompt": "Python is", "completion": " a programming language that lets you work quickly " * 3}
    (cut,), counts = build([long], tok, format="completion", max_length=12)
    assert counts.truncated == 1 and held_out_tasks([cut], EOS) == []


def test_a_generic_tokenizer_loads_without_torch_and_as_auto_tokenizer_loads_it(tmp_path, tok, monkeypatch):
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from qlorapipe.prepare import load_tokenizer

    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    loaded, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.init_kwargs == auto.init_kwargs and loaded.chat_template == auto.chat_template
    text = "Tokens, whitespace  and ünïcode: the with statement.\n"
    assert loaded(text)["input_ids"] == auto(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)
    code = (f"import sys; from qlorapipe.prepare import load_tokenizer; load_tokenizer(__import__('pathlib').Path("
            f"{str(tmp_path)!r})); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

    # A model's own tokenizer class, or custom code, goes through AutoTokenizer.
    calls = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kwargs: calls.append(kwargs) or auto)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for changed in ({"tokenizer_class": "LlamaTokenizer"}, {"auto_map": {"AutoTokenizer": ["t.T", None]}}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **changed}))
        assert load_tokenizer(tmp_path, trust_remote_code=True) is auto
    assert calls == [{"trust_remote_code": True}] * 2


def test_a_chat_prompt_begins_as_the_training_examples_began(tok):
    """A tokenizer that adds BOS beside a template that does not write it (TinyLlama's, zephyr's): the examples
    start with BOS, so the evaluate stage's samples and the chat tool's prompts must too."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from qlorapipe.data import adds_bos, chat_prompt_ids
    from qlorapipe.inference import encode_prompt

    with_bos = copy.deepcopy(tok)
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    with_bos.chat_template = CHAT_TEMPLATE
    assert adds_bos(with_bos) and not adds_bos(tok)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (example,), _ = build([{"messages": messages}], with_bos, format="chat", chat_template=CHAT_TEMPLATE)
    prompt = with_bos.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert chat_prompt_ids(with_bos, prompt) == example.input_ids[: example.completion[0]]
    assert encode_prompt(with_bos, "Hi", True)["input_ids"][0].tolist() == example.input_ids[: example.completion[0]]
    assert chat_prompt_ids(tok, prompt) == tok(prompt, add_special_tokens=False)["input_ids"]  # no BOS to add

"""lm-eval on a tiny 4-bit Llama with LoRA: its scores equal the ones computed here from the model's own
log-likelihoods, with and without the adapter; bad task lists fail before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_lora_model

from qlorapipe.errors import UserError
from qlorapipe import harness

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
TASK_YAML = TASK_DIR / "general_knowledge.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _questions() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "general_knowledge.jsonl").read_text().splitlines()]


def _choice_logprobs(model, tokenizer, docs: list[dict]) -> torch.Tensor:
    """[question, choice]: the summed log-probability of the choice's tokens given the question.

    The prompt is the task's doc_to_text and the continuation " <choice>" (lm-eval's default target
    delimiter); the choice's tokens are those of prompt + continuation after the prompt's own.
    """
    rows, starts = [], []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        prompt = tokenizer(context)["input_ids"]
        for choice in doc["choices"]:
            whole = tokenizer(f"{context} {choice}")["input_ids"]
            assert whole[: len(prompt)] == prompt
            rows.append(whole)
            starts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)  # the choice's tokens
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        scored[i, start : len(row)] = True
    logprobs = model(input_ids=ids, attention_mask=attention).logits.float().log_softmax(-1)
    # Position t predicts token t + 1.
    token_logprobs = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logprobs * scored[:, 1:]).sum(1).view(len(docs), -1)


def _expected_scores(model, tokenizer, docs: list[dict]) -> dict:
    """acc (the most likely choice is the answer), acc_norm (the most likely per character) and the Brier
    score (squared distance of the choices' softmax from the one-hot answer), from _choice_logprobs."""
    with torch.no_grad():
        logprobs = _choice_logprobs(model, tokenizer, docs)
    top2 = logprobs.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "two choices too close to call; the comparison would be luck"
    answers = torch.tensor([doc["answer"] for doc in docs])
    lengths = torch.tensor([[len(choice) for choice in doc["choices"]] for doc in docs])
    one_hot = torch.nn.functional.one_hot(answers, logprobs.shape[1])
    return {"acc": (logprobs.argmax(1) == answers).float().mean().item(),
            "acc_norm": ((logprobs / lengths).argmax(1) == answers).float().mean().item(),
            "brier_score": ((logprobs.softmax(1) - one_hot) ** 2).sum(1).mean().item()}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    """A PeftModel on a 4-bit base, as the evaluate step loads it, with an adapter strong enough to
    move every log-likelihood."""
    model, _ = tiny_lora_model(tiny_llama_dir, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(10)
    return model.eval()


@pytest.fixture
def brier_task(tmp_path) -> Path:
    """The example task with the Brier score added: a number that moves with every log-likelihood.

    It includes the example (lm-eval's `include:`); its data_files are absolute, since relative ones
    start at the directory of the YAML listed, this one.
    """
    data = (TASK_DIR / "general_knowledge.jsonl").resolve()
    return _write(tmp_path / "brier.yaml", f"""\
include: {TASK_YAML}
task: general_knowledge_brier
dataset_kwargs:
  data_files:
    test: {data}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
""")


def test_scores_are_the_models_own_choices_with_and_without_the_adapter(model, tokenizer, brier_task):
    docs = _questions()
    spec = harness.check_tasks([str(brier_task)])

    model.train()  # left as it was found
    finetuned = harness.run_tasks(model, tokenizer, spec, limit=None, batch_size=16, device=torch.device("cpu"))
    assert model.training
    model.eval()
    expected_finetuned = _expected_scores(model, tokenizer, docs)
    with model.disable_adapter():
        base = harness.run_tasks(model, tokenizer, spec, limit=None, batch_size=16, device=torch.device("cpu"))
        expected_base = _expected_scores(model, tokenizer, docs)

    for row, expected in ((finetuned, expected_finetuned), (base, expected_base)):
        assert list(row) == ["general_knowledge_brier"]
        scores = row["general_knowledge_brier"]
        assert set(scores) == {"samples", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "brier_score"}
        assert scores["samples"] == 10
        for metric in ("acc", "acc_norm", "brier_score"):
            assert scores[metric] == pytest.approx(expected[metric], rel=1e-5, abs=1e-6), metric
        # lm-eval's closed-form standard error of a mean of n 0/1 scores: sqrt(p (1 - p) / (n - 1)).
        assert scores["acc_stderr"] == pytest.approx((scores["acc"] * (1 - scores["acc"]) / 9) ** 0.5, rel=1e-5)
        json.dumps(row, allow_nan=False)
    # The adapter matters: the rows differ as the model's own log-likelihoods do.
    assert expected_base["brier_score"] != pytest.approx(expected_finetuned["brier_score"], rel=1e-3)
    assert base["general_knowledge_brier"]["brier_score"] != finetuned["general_knowledge_brier"]["brier_score"]


def test_the_example_task_reads_its_data_beside_it_from_any_directory_and_limit_caps_it(model, tokenizer, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the YAML's directory, where its relative data_files start
    spec = harness.check_tasks([str(TASK_YAML)])
    data = (TASK_DIR / "general_knowledge.jsonl").resolve()
    assert spec.names == ("general_knowledge",)
    assert spec.specs[0]["dataset_kwargs"]["data_files"] == {"test": str(data)}
    assert spec.local_files == (TASK_YAML.resolve(), data)
    assert spec.task_manager.all_tasks == []  # local files only: lm-eval's own tasks were not indexed

    scores = harness.run_tasks(model, tokenizer, spec, limit=4, batch_size=16, device="cpu")["general_knowledge"]
    expected = _expected_scores(model, tokenizer, _questions()[:4])
    assert scores["samples"] == 4
    assert scores["acc"] == pytest.approx(expected["acc"]) and scores["acc_norm"] == pytest.approx(expected["acc_norm"])


def test_a_hub_dataset_out_of_reach_fails_naming_the_setting_and_the_fixes(model, tokenizer, tmp_path, monkeypatch):
    import datasets

    hub_task = _write(tmp_path / "hub.yaml", "task: hub_quiz\ndataset_path: example-org/not-in-any-cache\n"
                                             "test_split: test\noutput_type: multiple_choice\n"
                                             "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                                             "doc_to_target: answer\n")
    spec = harness.check_tasks([str(hub_task)])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what an unreachable Hub looks like, at once
    with pytest.raises(UserError) as caught:
        harness.run_tasks(model, tokenizer, spec, limit=1, batch_size=1, device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("evaluate.lm_eval_tasks: a task's dataset could not be loaded (Couldn't reach "
                              "'example-org/not-in-any-cache' on the Hub")
    assert "HF_HUB_OFFLINE=1" in message and "local task YAML" in message


def test_bad_task_files_fail_in_one_line_naming_each_file_and_what_to_change(tmp_path):
    yaml = TASK_YAML.read_text()
    unparsable = _write(tmp_path / "unparsable.yaml", "task: quiz\ndoc_to_text: [unclosed\n")
    no_task = _write(tmp_path / "no_task.yaml", yaml.replace("task: general_knowledge\n", ""))
    typo = _write(tmp_path / "typo.yml", yaml.replace("doc_to_text:", "doc_to_txt:"))
    no_data = _write(tmp_path / "no_data.yaml", yaml)  # its jsonl is not beside it
    missing = tmp_path / "missing.yaml"

    with pytest.raises(UserError) as caught:
        harness.check_tasks([str(p) for p in (unparsable, no_task, typo, no_data, missing)])
    message = str(caught.value)
    assert "\n" not in message and message.startswith("evaluate.lm_eval_tasks: ")
    assert f"{unparsable}: does not parse as YAML at line 3, column 1" in message
    assert f"{no_task}: defines no `task:`" in message
    assert f"{typo}: unknown key 'doc_to_txt' (did you mean 'doc_to_text'?)" in message
    assert f"{no_data}: data_files general_knowledge.jsonl not found in {tmp_path}" in message
    assert f"{missing}: no such file" in message


def test_an_unknown_task_name_fails_naming_the_closest_known_ones():
    with pytest.raises(UserError) as caught:
        harness.check_tasks(["arc_easy", "arc_eazy", str(TASK_YAML)])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("evaluate.lm_eval_tasks: 'arc_eazy' is not an lm-eval task, group or tag: "
                              "did you mean arc_easy")
    assert message.count("is not an lm-eval task") == 1  # arc_easy and the YAML file are fine


def test_scores_drop_the_filter_suffix_and_keep_standard_errors_beside_their_metric():
    scores = harness._clean_scores({
        "alias": "gsm8k", "sample_len": 5, "exact_match,strict-match": 0.4, "exact_match_stderr,strict-match": 0.2449,
        "acc,none": 0.123456789, "acc_stderr,none": "N/A", "f1,none": float("nan")})
    assert scores == {"samples": 5, "exact_match_strict_match": 0.4, "exact_match_strict_match_stderr": 0.2449,
                      "acc": 0.123457}

"""The evaluate step on question/answer data: task scores, stopping, forgetting, and its gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CORPUS, load_stage, tiny_params, train_args, write_params

from qlorapipe import data, greedy
from qlorapipe.errors import UserError
from qlorapipe.evaluate import gate_problems, tasks
from qlorapipe.params import EvaluateParams, load_sections


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir):
    """A tiny model trained on completion data: each corpus sentence's opening words answered by the rest."""
    work = tmp_path_factory.mktemp("qa")
    rows = []
    for i in range(4):
        for line in filter(str.strip, CORPUS.splitlines()):
            words = line.split()
            rows.append({"prompt": f"({i}) " + " ".join(words[:4]), "completion": " " + " ".join(words[4:])})
    corpus = work / "qa.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = tiny_params(tiny_llama_dir, corpus, **{"data.format": "completion", "data.max_length": 128,
                                                      "training.max_steps": 80, "training.learning_rate": 0.01,
                                                      "evaluate.max_new_tokens": 24})
    write_params(work / "params.yaml", params)
    p = {"work": work, "params": params, "base": work / "base", "prepared": work / "prepared", "out": work / "train"}
    common = ["--params", str(work / "params.yaml")]
    load_stage("download").main(common + ["--out", str(p["base"])])
    load_stage("prepare").main(common + ["--base", str(p["base"]), "--out", str(p["prepared"]),
                                         "--report", str(work / "data.json"), "--lengths", str(work / "l.csv"),
                                         "--lengths-plot", str(work / "l.png")])
    load_stage("train").main(train_args(work / "params.yaml", p["base"], p["prepared"], p["out"]))
    return p


def evaluate(project, name: str, **overrides) -> tuple[Path, dict | None]:
    """Run the evaluate stage with params overrides; returns (its output folder, metrics or None)."""
    out = project["work"] / name
    params = write_params(project["work"] / f"{name}.yaml", {
        **project["params"], "evaluate": {**project["params"]["evaluate"], **overrides}})
    load_stage("evaluate").main(["--params", str(params), "--base", str(project["base"]),
                                 "--adapter", str(project["out"] / "adapter"), "--data", str(project["prepared"]),
                                 "--metrics", str(out / "eval.json"), "--samples", str(out / "samples.json"),
                                 "--scores-plot", str(out / "scores.png")])
    return out, json.loads((out / "eval.json").read_text())


def test_held_out_answers_are_scored_against_their_references(project):
    out, metrics = evaluate(project, "scores")
    held_out = data.load_tasks(project["prepared"])
    assert metrics["task_examples"] == len(held_out) == 8  # 40 records, eval_fraction 0.2
    samples = json.loads((out / "samples.json").read_text())["tasks"]
    assert [s["where"] for s in samples] == [t["where"] for t in held_out]
    for name in ("base", "finetuned"):
        row = metrics[name]["task"]
        # The figures are those of the answers written beside them, scored again here.
        rescored = tasks.scores([s[name] for s in samples], [s["reference"] for s in samples])
        assert {k: row[k] for k in rescored} == rescored
        assert row["stop_share"] == sum(s[f"{name}_stopped"] for s in samples) / 8
        assert 0 <= row["exact_match"] <= row["rouge_l"] <= 1
    # Each prompt is the record's prompt as trained, each reference its completion.
    source = [json.loads(line) for line in (project["work"] / "qa.jsonl").read_text().splitlines()]
    for sample in samples:
        record = source[int(sample["where"].rsplit(":", 1)[1]) - 1]
        assert (sample["prompt"], sample["reference"]) == (record["prompt"], record["completion"].strip())
    assert metrics["reference_mean_tokens"] == sum(len(t["reference_ids"]) for t in held_out) / 8
    # 80 steps on 32 examples teach this tiny model the answers (each is in the train split under another prefix): closer to the references than the base.
    assert metrics["finetuned"]["task"]["chrf"] > metrics["base"]["task"]["chrf"]
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # max_examples bounds the work: the first held-out prompts only. An lm-eval task over a local
    # file (the README's example) runs on both rows and lands in the same metrics.
    task_file = Path(__file__).parent / "data" / "lm_eval" / "general_knowledge.yaml"
    _, fewer = evaluate(project, "fewer", max_examples=3, lm_eval_tasks=[str(task_file)], lm_eval_limit=4)
    assert fewer["task_examples"] == 3
    for name in ("base", "finetuned"):
        scores = fewer[name]["lm_eval"]["general_knowledge"]
        assert scores["samples"] == 4 and 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1
    _, none = evaluate(project, "none", max_examples=0, general_corpus=None)
    assert "task" not in none["finetuned"] and "general" not in none["finetuned"]


def test_batched_answers_are_the_answers_one_prompt_at_a_time(project):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(project["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(project["base"])
    prompts = [t["prompt_ids"] for t in data.load_tasks(project["prepared"])]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    stops = greedy.stop_token_ids(model, tokenizer)
    batched = tasks.generate_answers(model, tokenizer, prompts, 12, 4, "cpu", stops)
    single = tasks.generate_answers(model, tokenizer, prompts, 12, 1, "cpu", stops)
    assert batched == single
    assert all(a.stopped or len(a.ids) == 12 for a in batched)
    assert not any(token in stops for a in batched for token in a.ids)


def test_samples_of_both_models_in_one_batch_are_each_models_own(project):
    """generation.generate runs base and fine-tuned rows in one peft mixed-adapter batch: each row's
    tokens are those of its model generating alone (the base with the adapter disabled)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qlorapipe import modeling
    from qlorapipe.evaluate import generation
    from qlorapipe.params import QuantizationParams

    quant = QuantizationParams(**project["params"]["quantization"])
    base, _ = modeling.load_base_model(project["base"], quant, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, project["out"] / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(project["base"])
    prompts = ["(0) The with statement", "(2) A list", "(3) Python is a programming language that"]
    stops = greedy.stop_token_ids(model, tokenizer)
    both = generation.generate(model, tokenizer, prompts, 16, "cpu", False, stops)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    with model.disable_adapter():
        base_alone = tasks.generate_answers(model, tokenizer, encoded, 16, 1, "cpu", stops)
    tuned_alone = tasks.generate_answers(model, tokenizer, encoded, 16, 1, "cpu", stops)
    decode = [tokenizer.decode(a.ids, skip_special_tokens=True) for a in base_alone], \
        [tokenizer.decode(a.ids, skip_special_tokens=True) for a in tuned_alone]
    assert (both["base"], both["finetuned"]) == decode
    assert both["base"] != both["finetuned"]  # the adapter changed what the model says


def test_scores_by_hand():
    s = tasks.scores(["the cat sat", "a  dog"], ["the cat sat", "the dog ran"])
    assert s["exact_match"] == 0.5  # whitespace runs do not count
    assert s["rouge_l"] == pytest.approx((1 + 2 * (1 / 2 * 1 / 3) / (1 / 2 + 1 / 3)) / 2, abs=1e-5)
    same = tasks.scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert (same["exact_match"], same["rouge_l"], same["bleu"], same["chrf"]) == (1, 1, 100, 100)
    near = tasks.scores(["the cat sat on the red mat"], ["the cat sat on the mat"])
    assert near["exact_match"] == 0
    # BLEU: clipped 1- to 4-gram precisions 6/7, 4/6, 3/5, 2/4, no brevity penalty (7 words against 6)
    assert near["bleu"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, abs=1e-3)
    assert near["chrf"] == pytest.approx(_chrf("the cat sat on the red mat", "the cat sat on the mat"), abs=1e-3)


def _chrf(answer: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF by its definition (Popovic 2015): character 1- to 6-gram precision and recall, spaces removed,
    each averaged over the orders, then their F-beta score with recall weighted beta times."""
    from collections import Counter

    answer, reference = answer.replace(" ", ""), reference.replace(" ", "")
    precision = recall = 0.0
    for n in range(1, order + 1):
        got = Counter(answer[i:i + n] for i in range(len(answer) - n + 1))
        want = Counter(reference[i:i + n] for i in range(len(reference) - n + 1))
        matched = sum((got & want).values())
        precision += matched / sum(got.values()) / order
        recall += matched / sum(want.values()) / order
    return 100 * (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)


def test_gates_fail_the_stage_and_write_nothing(project):
    with pytest.raises(UserError, match=r"evaluate.min_stop_share=1.0"):
        evaluate(project, "stop_gate", min_stop_share=1.0, max_new_tokens=1)
    assert not (project["work"] / "stop_gate").exists()
    metrics = {"finetuned": {"task": {"stop_share": 0.9}}, "general_perplexity_increase": 0.25}
    params = EvaluateParams(min_stop_share=0.8, max_general_perplexity_increase=0.3)
    assert gate_problems(params, metrics) == []
    [problem] = gate_problems(EvaluateParams(max_general_perplexity_increase=0.2), metrics)
    assert "rose +25.0%" in problem and "evaluate.max_general_perplexity_increase=0.2" in problem


def test_a_missing_general_corpus_stops_before_any_model_loads(project, monkeypatch):
    from qlorapipe import modeling

    monkeypatch.setattr(modeling, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="evaluate.general_corpus '/nowhere.txt' does not exist"):
        evaluate(project, "no_corpus", general_corpus="/nowhere.txt")
    assert not (project["work"] / "no_corpus").exists()


def test_the_training_data_is_no_general_corpus(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"data": {"source": "builtin:chatterbot", "format": "chat"},
                                                   "evaluate": {"general_corpus": "builtin:chatterbot"}})
    with pytest.raises(UserError, match="evaluate.general_corpus is the training data .* set it to builtin:python-docs"):
        load_sections(path, "data", "evaluate")


def test_an_empty_sample_prompt_is_refused_when_params_load(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"evaluate": {"prompts": ["Python is", "  "]}})
    with pytest.raises(UserError, match=r"evaluate.prompts \[1\] \(0-based\) are empty"):
        load_sections(path, "evaluate")

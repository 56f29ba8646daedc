"""Task scores: held-out prompts answered greedily, scored against the references, and whether answers stop.

The prompts are the held-out examples' own tokens up to their last completion (prepare writes
them, ``data.TASKS_FILE``), so each model is asked exactly what it was trained to answer. An
answer ends at the first end-of-sequence or end-of-turn token the model's generation config
names; one that runs to ``evaluate.max_new_tokens`` without it did not stop by itself, the most
common silent failure of instruction tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlorapipe import greedy


@dataclass(frozen=True)
class Answer:
    """One generated answer: its tokens (the stop token left out) and whether the model stopped."""

    ids: list[int]
    stopped: bool


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device,
                     stop_ids: set[int], advance=None, adapter_names: list[str] | None = None) -> list[Answer]:
    """Greedy answers to token-id prompts, in batches of similar length (left-padded).

    Args:
        advance: called with the number of prompts done after each batch (progress).
        adapter_names: the adapter of each prompt (``greedy.generate``).
    """
    answers = []
    for new in greedy.generate(model, prompts, max_new_tokens, batch_size, device, stop_ids, tokenizer.pad_token_id,
                               advance, adapter_names):
        end = next((k for k, token in enumerate(new) if token in stop_ids), None)
        answers.append(Answer(new if end is None else new[:end], end is not None))
    return answers


def _normalise(text: str) -> str:
    return " ".join(text.split())


def scores(answers: list[str], references: list[str]) -> dict:
    """Exact match and ROUGE-L F1 (shares, 0-1), corpus BLEU and chrF (0-100, sacrebleu's scale).

    Texts are compared with runs of whitespace collapsed; ROUGE-L uses rouge-score's default
    tokenizer (lower case, letters and digits), BLEU and chrF sacrebleu's defaults, so the
    figures are comparable with papers that use those libraries.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    answers, references = [_normalise(a) for a in answers], [_normalise(r) for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    n = len(answers)
    return {
        "exact_match": round(sum(a == r for a, r in zip(answers, references)) / n, 5),
        "rouge_l": round(sum(rouge) / n, 5),
        "bleu": round(sacrebleu.corpus_bleu(answers, [references]).score, 3),
        "chrf": round(sacrebleu.corpus_chrf(answers, [references]).score, 3),
    }


def task_metrics(answers: list[Answer], answer_texts: list[str], references: list[str]) -> dict:
    """One model's row: the scores, the share of answers that stopped, and their mean length in tokens."""
    n = len(answers)
    return {
        **scores(answer_texts, references),
        "stop_share": round(sum(a.stopped for a in answers) / n, 5),
        "mean_answer_tokens": round(sum(len(a.ids) for a in answers) / n, 2),
    }

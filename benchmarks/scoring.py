"""Scorers, as the original benchmarks score: exact number, substring, answer among the words."""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans(string.punctuation, " " * len(string.punctuation))


def first_number(prediction: str, answers: Sequence[str]) -> float:
    """Pass-key (∞-Bench): 1 if the first integer in the prediction equals the answer."""
    match = re.search(r"\d+", prediction)
    return float(match is not None and match.group() in answers)


def contains_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER NIAH / ∞-Bench Retr.KV: fraction of the answers found, case-insensitively, in the prediction."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (lower case, no punctuation, no articles, single spaces), except that punctuation becomes
    a space rather than nothing: a possessive "Eliot's" still names "Eliot" ("eliot s", not "eliots")."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def contains_any(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD in a haystack (RULER QA): 1 if any normalised answer occurs in the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(norm and f" {norm} " in pred for norm in map(normalize_answer, answers)))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def answer_among_words(prediction: str, answer: str, labels: Collection[str], question: str) -> float:
    """BABILong: 1 if, of the task's answer labels named in the prediction (not counting those named in
    the question), the right answer is the only one."""
    labels = {label.lower() for label in labels}
    named = (_words(prediction) & labels) - _words(question)
    return float(named == {answer.lower()})

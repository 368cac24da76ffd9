"""Benchmark tasks: seeded, offline generators of (context, questions) at an exact token length.

Every task takes the tokenizer's `TokenCounter`, a target length in tokens, a `random.Random` and a
depth in [0, 1] (where the evidence goes; tasks with several facts spread them and ignore it), and
returns the context and its queries. `generate` seeds one generator per sample, so a sample depends only
on (task, length, seed, index).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks import data, scoring


@dataclass(frozen=True)
class Query:
    """One question about a context, its gold answers and where its evidence lies (character spans)."""

    question: str
    answers: tuple[str, ...]
    subject: str
    evidence: tuple[tuple[int, int], ...]
    depth: float


@dataclass(frozen=True)
class Sample:
    """A context with its queries; `length` is the target, `context_tokens` the measured count."""

    task: str
    length: int
    seed: int
    index: int
    context: str
    context_tokens: int
    queries: tuple[Query, ...]


Maker = Callable[[data.TokenCounter, int, random.Random, float, int], tuple[data.Haystack, list[Query]]]


@dataclass(frozen=True)
class Task:
    """A generator, a scorer and the tokens an answer needs. `depth_grid`: run every requested depth."""

    name: str
    make: Maker
    score: Callable[[str, Query], float]
    max_new_tokens: int
    depth_grid: bool = False


PASSKEY_PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


def make_passkey(
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int
) -> tuple[data.Haystack, list[Query]]:
    """Pass-key retrieval in the classic repeated filler: a 5-digit key, asked back."""
    key = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = data.build_haystack(counter, data.Filler(data.CLASSIC_FILLER), length, [(depth, needle)], rng,
                              PASSKEY_PREFIX)
    question = "What is the pass key? Answer with the number only."
    return hay, [Query(question, (key,), "pass key", tuple(hay.spans), depth)]


_ADJECTIVES = (
    "amber", "bitter", "brave", "calm", "clever", "crimson", "curious", "distant", "eager", "fancy",
    "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "misty", "noisy",
    "olive", "polite", "quiet", "rapid", "rusty", "silent", "silver", "sleepy", "smooth", "sturdy",
    "tender", "tidy", "velvet", "vivid", "wandering", "wild", "windy", "wooden", "young", "zesty",
)
_NOUNS = (
    "anchor", "badger", "balloon", "canyon", "castle", "comet", "cottage", "dragon", "falcon", "feather",
    "garden", "glacier", "harbor", "helmet", "island", "journey", "kettle", "lantern", "meadow", "mirror",
    "needle", "orchard", "otter", "pebble", "pepper", "piano", "pirate", "puzzle", "quartz", "raven",
    "river", "saddle", "scarf", "spider", "teapot", "thunder", "tunnel", "violin", "walrus", "willow",
)
NIAH_PREFIX = (
    "Some special magic {kind}s are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the {kind}s afterwards.\n\n"
)


def _adjective_noun(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def make_niah(kind: str) -> Maker:
    """RULER single needle in the Paul Graham essays, keyed by an adjective-noun word; its value is a
    7-digit number (`kind` "number", RULER's niah_single_2) or another adjective-noun word ("word")."""

    def make(
        counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int
    ) -> tuple[data.Haystack, list[Query]]:
        key = _adjective_noun(rng)
        value = str(rng.randrange(1_000_000, 10_000_000)) if kind == "number" else key
        while value == key:
            value = _adjective_noun(rng)
        needle = f"One of the special magic {kind}s for {key} is: {value}."
        hay = data.build_haystack(counter, data.essays(), length, [(depth, needle)], rng,
                                  NIAH_PREFIX.format(kind=kind))
        question = f"What is the special magic {kind} for {key} mentioned in the provided text?"
        return hay, [Query(question, (value,), key, tuple(hay.spans), depth)]

    return make


KV_PREFIX = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_kv(
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int
) -> tuple[data.Haystack, list[Query]]:
    """∞-Bench Retr.KV: a JSON object of UUID pairs up to `length` tokens (within one pair); keys asked."""
    pairs: list[str] = []
    cost: list[int] = []
    fixed = counter.count(KV_PREFIX + "{}")
    while fixed + sum(cost) < length:
        batch = [f'"{_uuid(rng)}": "{_uuid(rng)}"' for _ in range(64)]
        pairs += batch
        cost += counter.counts([", " + p for p in batch])

    def render(n: int) -> str:
        return KV_PREFIX + "{" + ", ".join(pairs[:n]) + "}"

    n, total = 0, fixed
    while n < len(pairs) and total + cost[n] <= length:
        total += cost[n]
        n += 1
    while n > 1 and counter.count(render(n)) > length:
        n -= 1
    if n < n_queries:
        raise ValueError(f"{length} tokens hold only {n} key-value pairs")
    text = render(n)
    queries = []
    for idx in sorted(rng.sample(range(n), n_queries)):
        key, value = (part.strip('"') for part in pairs[idx].split(": "))
        start = text.index(pairs[idx])
        question = f'What is the value of the key "{key}" in the JSON object? Give the value only.'
        queries.append(Query(question, (value,), key, ((start, start + len(pairs[idx])),), idx / n))
    return data.Haystack(text, counter.count(text), []), queries


_BABI_INSTRUCTIONS = {
    1: "Facts about where people moved are hidden in the text. A person is where they moved last.",
    2: "Facts about people moving, picking up and dropping objects are hidden in the text. "
    "An object is where the person who last held it is.",
    3: "Facts about people moving, picking up and dropping objects are hidden in the text. "
    "Follow the object through the facts in the order they appear.",
    4: "Facts about how places are laid out relative to each other are hidden in the text.",
    5: "Facts about people moving and handing objects to each other are hidden in the text.",
}


def make_babilong(task: int, book: str | None = None) -> Maker:
    """BABILong qa`task`: one bAbI story's facts, in order, scattered in book text; its question asked."""

    def make(
        counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int
    ) -> tuple[data.Haystack, list[Query]]:
        filler = data.book(book) if book else data.essays()
        fitting = [q for q in data.babi(task) if sum(map(len, q.facts)) < 2 * length]  # ~chars/4 < half
        if not fitting:
            raise ValueError(f"no bAbI qa{task} story fits in {length} tokens")
        item = rng.choice(fitting)
        depths = sorted(rng.random() for _ in item.facts)
        hay = data.build_haystack(counter, filler, length, list(zip(depths, item.facts, strict=True)), rng)
        question = f"{_BABI_INSTRUCTIONS[task]} Answer with one word. Question: {item.question}"
        return hay, [Query(question, (item.answer,), item.question, tuple(hay.spans), depths[-1])]

    return make


def babi_scorer(task: int) -> Callable[[str, Query], float]:
    """Answer-among-words scoring against the answer labels of bAbI task `task`."""

    def score(prediction: str, query: Query) -> float:
        labels = {q.answer for q in data.babi(task)}
        return scoring.answer_among_words(prediction, query.answers[0], labels, query.subject)

    return score


SQUAD_PREFIX = "Documents, separated by blank lines:\n\n"


def make_squad(
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int
) -> tuple[data.Haystack, list[Query]]:
    """SQuAD in a haystack: gold paragraphs among paragraphs of other articles; their questions asked."""
    paragraphs, articles, items = data.squad()
    if n_queries > len(set(articles)):
        raise ValueError(f"SQuAD has {len(set(articles))} articles; ask at most that many questions")
    gold: list[data.SquadItem] = []
    while len(gold) < n_queries:
        item = rng.choice(items)
        if all(item.article != g.article for g in gold):
            gold.append(item)
    taken = {g.article for g in gold}
    distractors = [p for p, a in zip(paragraphs, articles, strict=True) if a not in taken]
    rng.shuffle(distractors)
    filler = data.Filler("\n\n".join(distractors), sep="\n\n", boundary=data.DOCUMENT_END)
    depths = [depth] if n_queries == 1 else sorted(rng.random() for _ in gold)
    inserts = [(d, g.paragraph) for d, g in zip(depths, gold, strict=True)]
    hay = data.build_haystack(counter, filler, length, inserts, rng, SQUAD_PREFIX)
    return hay, [
        Query(f"Answer in a few words, from the documents. Question: {g.question}", g.answers, g.question,
              (span,), d)
        for g, d, span in zip(gold, depths, hay.spans, strict=True)
    ]


def _score_with(fn: Callable[[str, Sequence[str]], float]) -> Callable[[str, Query], float]:
    return lambda prediction, query: fn(prediction, query.answers)


def registry(book: str | None = None) -> dict[str, Task]:
    """Every task by name; `book` is a text file used as BABILong filler instead of the essays."""
    tasks = [
        Task("passkey", make_passkey, _score_with(scoring.first_number), 16),
        Task("niah", make_niah("number"), _score_with(scoring.contains_all), 32, depth_grid=True),
        Task("niah-word", make_niah("word"), _score_with(scoring.contains_all), 32, depth_grid=True),
        Task("kv", make_kv, _score_with(scoring.contains_all), 48),
        Task("squad", make_squad, _score_with(scoring.contains_any), 32),
    ]
    tasks += [Task(f"babilong-qa{n}", make_babilong(n, book), babi_scorer(n), 16) for n in range(1, 6)]
    return {t.name: t for t in tasks}


def generate(
    task: Task,
    counter: data.TokenCounter,
    length: int,
    seed: int,
    n_samples: int,
    depths: Sequence[float],
    n_queries: int = 1,
) -> list[Sample]:
    """`n_samples` samples (times each depth, for depth-grid tasks), each from its own seeded generator.

    Depths are fractions in [0, 1]; tasks without a depth grid draw theirs at random. `n_queries`
    questions per context where the task has several (kv, squad); one elsewhere.
    """
    grid = list(depths) if task.depth_grid else [None]
    samples = []
    for index in range(n_samples * len(grid)):
        rng = random.Random(f"{task.name}|{length}|{seed}|{index}")
        fixed = grid[index % len(grid)]
        depth = rng.random() if fixed is None else fixed
        hay, queries = task.make(counter, length, rng, depth, n_queries)
        samples.append(Sample(task.name, length, seed, index, hay.text, hay.n_tokens, tuple(queries)))
    return samples

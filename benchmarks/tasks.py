"""Benchmark tasks: seeded, offline generators of (context, questions) at an exact token length.

Every task takes the tokenizer's `TokenCounter`, a target length in tokens, a `random.Random` and a
depth in [0, 1] (where the evidence goes; tasks with several facts spread them and ignore it), and
returns the context and its queries. `generate` seeds one generator per sample, so a sample depends only
on (task, length, seed, index); with `same_questions`, on (task, seed, index) but for the amount of filler,
so every length asks the same questions (makers then draw what they ask before anything whose count depends
on the length). Prose tasks hide facts in essays or books; the structured tasks (json-kv,
table, code) generate their records whole and fall short of the length by less than one record.

Tasks with question templates can ask each question in another style (`QUESTION_STYLES`): reworded, with
typos outside the looked-up key, or wrapped in irrelevant words; the context and the answer stay the same.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from benchmarks import data, scoring


@dataclass(frozen=True)
class Query:
    """One question about a context, its gold answers and where its evidence lies (character spans).

    `slots`: the (name, value) pairs that fill its task's question templates; restyling keeps them verbatim.
    """

    question: str
    answers: tuple[str, ...]
    subject: str
    evidence: tuple[tuple[int, int], ...]
    depth: float
    slots: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Sample:
    """A context with its queries; `length` is the target, `context_tokens` the measured count.

    `task`: the task's name, with the question style in brackets unless exact, e.g. "niah[typos]".
    """

    task: str
    length: int
    seed: int
    index: int
    context: str
    context_tokens: int
    queries: tuple[Query, ...]


# (counter, length, rng, depth, n_queries, same_questions) -> (haystack, queries)
Maker = Callable[[data.TokenCounter, int, random.Random, float, int, bool], tuple[data.Haystack, list[Query]]]


@dataclass(frozen=True)
class Task:
    """A generator, a scorer and the tokens an answer needs. `depth_grid`: run every requested depth.

    `questions`: templates of its question over the query's slots, the exact wording first; a task
    without them is asked in the exact style only.
    """

    name: str
    make: Maker
    score: Callable[[str, Query], float]
    max_new_tokens: int
    depth_grid: bool = False
    questions: tuple[str, ...] = ()


PASSKEY_PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
PASSKEY_QUESTIONS = (
    "What is the {key}? Answer with the number only.",
    "Which number is the {key}? Answer with the number only.",
    "Tell me the {key} hidden in the text. Reply with just the number.",
    "The text mentions a {key}. What is it? Give only the number.",
)


def make_passkey(
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
    same_questions: bool = False,
) -> tuple[data.Haystack, list[Query]]:
    """Pass-key retrieval in the classic repeated filler: a 5-digit key, asked back."""
    key = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = data.build_haystack(counter, data.Filler(data.CLASSIC_FILLER), length, [(depth, needle)], rng,
                              PASSKEY_PREFIX)
    question = PASSKEY_QUESTIONS[0].format(key="pass key")
    return hay, [Query(question, (key,), "pass key", tuple(hay.spans), depth, (("key", "pass key"),))]


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


def niah_questions(kind: str) -> tuple[str, ...]:
    """The NIAH question templates for a needle of `kind`, over the slot `key`."""
    return (
        f"What is the special magic {kind} for {{key}} mentioned in the provided text?",
        f"Which special magic {kind} does the provided text give for {{key}}?",
        f"In the provided text, what special magic {kind} is listed for {{key}}?",
        f"Find the special magic {kind} for {{key}} in the provided text. What is it?",
    )


def make_niah(kind: str) -> Maker:
    """RULER single needle in the Paul Graham essays, keyed by an adjective-noun word; its value is a
    7-digit number (`kind` "number", RULER's niah_single_2) or another adjective-noun word ("word")."""

    def make(
        counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
        same_questions: bool = False,
    ) -> tuple[data.Haystack, list[Query]]:
        key = _adjective_noun(rng)
        value = str(rng.randrange(1_000_000, 10_000_000)) if kind == "number" else key
        while value == key:
            value = _adjective_noun(rng)
        needle = f"One of the special magic {kind}s for {key} is: {value}."
        hay = data.build_haystack(counter, data.essays(), length, [(depth, needle)], rng,
                                  NIAH_PREFIX.format(kind=kind))
        question = niah_questions(kind)[0].format(key=key)
        return hay, [Query(question, (value,), key, tuple(hay.spans), depth, (("key", key),))]

    return make


KV_PREFIX = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
KV_QUESTIONS = (
    'What is the value of the key "{key}" in the JSON object? Give the value only.',
    'In the JSON object, which value belongs to the key "{key}"? Give the value only.',
    'Look up the key "{key}" in the JSON object and give its value, nothing else.',
    'The JSON object maps the key "{key}" to which value? Answer with the value only.',
)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_pair(rng: random.Random) -> str:
    return f'"{_uuid(rng)}": "{_uuid(rng)}"'


def make_kv(
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
    same_questions: bool = False,
) -> tuple[data.Haystack, list[Query]]:
    """∞-Bench Retr.KV: a JSON object of UUID pairs up to `length` tokens; keys asked. Pairs are costed one by one,
    which overcounts the joined text's tokens, so the object falls short of `length` by up to ~2 % (~290 tokens at
    16K); the recorded figures were drawn so, and the draws are kept as they are.

    The asked pairs are drawn among the object's; with `same_questions`, drawn first and put at drawn fractions.
    """
    asked = [_kv_pair(rng) for _ in range(n_queries)] if same_questions else []
    fractions = sorted(rng.random() for _ in asked)
    pairs: list[str] = []
    cost: list[int] = []
    fixed = counter.count(KV_PREFIX + "{}") + sum(counter.counts([", " + p for p in asked]))
    while fixed + sum(cost) < length:
        batch = [_kv_pair(rng) for _ in range(64)]
        pairs += batch
        cost += counter.counts([", " + p for p in batch])

    def listed(n: int) -> list[str]:
        """The first `n` drawn pairs, with the pairs drawn to be asked at their fractions."""
        out = pairs[:n]
        for i, (fraction, pair) in enumerate(zip(fractions, asked, strict=True)):
            out.insert(i + round(fraction * n), pair)
        return out

    def render(n: int) -> str:
        return KV_PREFIX + "{" + ", ".join(listed(n)) + "}"

    n, total = 0, fixed
    while n < len(pairs) and total + cost[n] <= length:
        total += cost[n]
        n += 1
    while n > 1 and counter.count(render(n)) > length:
        n -= 1
    if n < n_queries:
        raise ValueError(f"{length} tokens hold only {n} key-value pairs")
    text, listing = render(n), listed(n)
    queries = []
    for pair in asked or [pairs[idx] for idx in sorted(rng.sample(range(n), n_queries))]:
        key, value = (part.strip('"') for part in pair.split(": "))
        start = text.index(pair)
        evidence = ((start, start + len(pair)),)
        depth = listing.index(pair) / len(listing)
        queries.append(Query(KV_QUESTIONS[0].format(key=key), (value,), key, evidence, depth, (("key", key),)))
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
    """BABILong qa`task`: one bAbI story's facts, in order, scattered in book text; its question asked.

    The story is drawn among those that fit in `length`; with `same_questions`, among all (the same at every
    length), and one that does not fit is refused.
    """

    def make(
        counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
        same_questions: bool = False,
    ) -> tuple[data.Haystack, list[Query]]:
        filler = data.book(book) if book else data.essays()

        def fits(q: data.BabiQuestion) -> bool:
            return sum(map(len, q.facts)) < 2 * length  # ~chars/4 < half

        stories = data.babi(task) if same_questions else [q for q in data.babi(task) if fits(q)]
        if not stories:
            raise ValueError(f"no bAbI qa{task} story fits in {length} tokens")
        item = rng.choice(stories)
        if not fits(item):
            raise ValueError(f"the bAbI qa{task} story drawn to be asked at every length ({sum(map(len, item.facts))} "
                             f"characters of facts) does not fit in {length} tokens; ask at longer lengths")
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
    counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
    same_questions: bool = False,
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


class Entry(NamedTuple):
    """One unit of a structured context: its text, the name a question looks it up by, the answer there and
    the question's slots."""

    text: str
    key: str
    answer: str
    slots: tuple[tuple[str, str], ...]


def _mentions(text: str, entries: Sequence[Entry]) -> bool:
    """Whether `text` holds the key or the answer of one of `entries`."""
    return any(entry.key in text or entry.answer in text for entry in entries)


def make_structured(
    prefix: str, sep: str, entry: Callable[[random.Random], Entry], questions: Sequence[str]
) -> Maker:
    """Structured text: `prefix`, then whole units drawn by `entry`, one per `sep`. The asked units sit at
    their depths; no other unit holds their key or answer. `questions[0]` is the question template."""

    def make(
        counter: data.TokenCounter, length: int, rng: random.Random, depth: float, n_queries: int,
        same_questions: bool = False,
    ) -> tuple[data.Haystack, list[Query]]:
        asked: list[Entry] = []
        while len(asked) < n_queries:
            new = entry(rng)
            if not _mentions(new.text, asked) and not any(_mentions(a.text, [new]) for a in asked):
                asked.append(new)
        # same questions: the other units, as many as the length needs, from a generator of their own, so the
        # depths drawn after them stay the same at every length
        unit_rng = random.Random(rng.getrandbits(64)) if same_questions else rng
        units: list[str] = []
        n_chars = 0
        while n_chars < data.window_chars(length):  # as much as build_haystack reads: no unit repeats
            unit = entry(unit_rng).text
            if not _mentions(unit, asked):
                units.append(unit)
                n_chars += len(unit) + len(sep)
        filler = data.Filler(sep.join(units), sep, re.compile(re.escape(sep)), whole_units=True)
        depths = [depth] if n_queries == 1 else sorted(rng.random() for _ in asked)
        inserts = [(d, a.text) for d, a in zip(depths, asked, strict=True)]
        hay = data.build_haystack(counter, filler, length, inserts, rng, prefix)
        return hay, [
            Query(questions[0].format(**dict(a.slots)), (a.answer,), a.key, (span,), d, a.slots)
            for a, d, span in zip(asked, depths, hay.spans, strict=True)
        ]

    return make


RECORD_COLUMNS = ("id", "name", "city", "age", "account")
_ASKED_COLUMNS = ("name", "account")  # rare values: the few other records that repeat one are left out
_ID_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_CITIES = (
    "Bergen", "Cusco", "Dakar", "Hanoi", "Kyoto", "Lima", "Lisbon", "Nairobi", "Osaka", "Oslo", "Perth",
    "Porto", "Quito", "Tallinn", "Tunis", "Zagreb",
)


def _record(rng: random.Random) -> tuple[dict[str, str | int], str]:
    """A customer record, keyed by its id, and the column a question about it asks."""
    record_id = f"{rng.choice(_ID_LETTERS)}{rng.choice(_ID_LETTERS)}-{rng.randrange(10_000, 100_000)}"
    values = (record_id, _adjective_noun(rng), rng.choice(_CITIES), rng.randrange(18, 90),
              rng.randrange(1_000_000, 10_000_000))
    return dict(zip(RECORD_COLUMNS, values, strict=True)), rng.choice(_ASKED_COLUMNS)


JSON_PREFIX = "Below are customer records in JSON Lines format, one JSON object per line.\n\n"
JSON_QUESTIONS = (
    'What is the "{field}" of the record whose "id" is "{id}"? Give the value only.',
    'In the JSON records, which "{field}" does the record with "id" "{id}" have? Give the value only.',
    'Find the record with "id" "{id}" and give its "{field}" value, nothing else.',
    'The record whose "id" is "{id}" has which "{field}"? Answer with the value only.',
)


def _json_entry(rng: random.Random) -> Entry:
    record, field = _record(rng)
    key = str(record["id"])
    return Entry(json.dumps(record), key, str(record[field]), (("id", key), ("field", field)))


TABLE_PREFIX = (
    "Below is a table of customer records.\n\n"
    f"| {' | '.join(RECORD_COLUMNS)} |\n|{'---|' * len(RECORD_COLUMNS)}\n"
)
TABLE_QUESTIONS = (
    "In the table, what is the {column} in the row whose id is {row}? Give the value only.",
    "Which {column} does the table list for id {row}? Give the value only.",
    "Find the table row with id {row} and give its {column} cell, nothing else.",
    "The row with id {row} has which {column} in the table? Answer with the value only.",
)


def _table_entry(rng: random.Random) -> Entry:
    record, column = _record(rng)
    key = str(record["id"])
    row = f"| {' | '.join(map(str, record.values()))} |"
    return Entry(row, key, str(record[column]), (("row", key), ("column", column)))


CODE_PREFIX = "Below is the source code of a Python module.\n\n"
CODE_QUESTIONS = (
    "In the Python module, what is the value of {name}? Give the value only.",
    "What does {name} evaluate to in the Python module? Give the value only.",
    "If you ran the Python module, what would {name} be? Answer with the value only.",
    "Look up {name} in the Python code and give its value, nothing else.",
)
_CONSTANT_KINDS = ("LIMIT", "TIMEOUT", "SEED", "PORT", "OFFSET", "RETRIES", "BUFFER", "QUOTA")
_VERBS = ("get", "compute", "load", "count", "resolve", "measure")


def _code_entry(rng: random.Random) -> Entry:
    """A module constant (looked up by its name) or a function returning a literal (by its call)."""
    value = str(rng.randrange(1_000_000, 10_000_000))
    adjective, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
    if rng.random() < 0.5:
        name = f"{adjective}_{noun}_{rng.choice(_CONSTANT_KINDS)}".upper()
        return Entry(f"{name} = {value}", name, value, (("name", name),))
    verb = rng.choice(_VERBS)
    call = f"{verb}_{adjective}_{noun}()"
    doc = f"{verb.capitalize()} the {noun} setting of the {adjective} profile."
    return Entry(f'def {call} -> int:\n    """{doc}"""\n    return {value}', call, value, (("name", call),))


QUESTION_STYLES = ("exact", "paraphrase", "typos", "verbose")
TYPO_EDITS = 3
_PREAMBLES = (
    "I have been going through a lot of material today and would like to check one small detail.",
    "Quick question, if you do not mind, while I put my notes in order.",
    "Please take your time with this one; it is part of a routine review.",
    "Here is something I was wondering about after reading everything.",
)
_CODAS = (
    "Thanks a lot for your help with this.",
    "I really appreciate it, and I hope your day is going well.",
    "This is just for my own records, nothing urgent.",
    "Many thanks in advance, it saves me a lot of scrolling.",
)


def typos(text: str, protected: Sequence[str], rng: random.Random, n_edits: int = TYPO_EDITS) -> str:
    """`text` with `n_edits` letters swapped with the next one, dropped or doubled; none inside `protected`."""
    guarded = {i for word in protected for m in re.finditer(re.escape(word), text) for i in range(*m.span())}
    free = [i for i, char in enumerate(text) if char.isalpha() and i not in guarded]
    picked: list[int] = []
    for i in rng.sample(free, len(free)):
        if len(picked) < n_edits and all(abs(i - j) > 2 for j in picked):  # apart: edits never interact
            picked.append(i)
    chars = list(text)
    for i in sorted(picked, reverse=True):  # right to left: an edit leaves the positions before it alone
        edit = rng.choice(("swap", "drop", "double"))
        if edit == "swap" and i + 1 in free and chars[i] != chars[i + 1]:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif edit == "drop":
            del chars[i]
        else:
            chars.insert(i, chars[i])
    return "".join(chars)


def restyle(query: Query, questions: Sequence[str], style: str, rng: random.Random) -> Query:
    """`query` asked in `style` (see `QUESTION_STYLES`); `questions` are its task's templates, exact first."""
    match style:
        case "exact":
            return query
        case "paraphrase":
            question = rng.choice(questions[1:]).format(**dict(query.slots))
        case "typos":
            question = typos(query.question, [value for _, value in query.slots], rng)
        case "verbose":
            question = f"{rng.choice(_PREAMBLES)} {query.question} {rng.choice(_CODAS)}"
        case _:
            raise ValueError(f"unknown question style {style!r}; choose from {', '.join(QUESTION_STYLES)}")
    return replace(query, question=question)


def styled_name(task: str, style: str) -> str:
    """The task name a sample asked in `style` goes by: "niah", "niah[typos]"."""
    return task if style == "exact" else f"{task}[{style}]"


def _score_with(fn: Callable[[str, Sequence[str]], float]) -> Callable[[str, Query], float]:
    return lambda prediction, query: fn(prediction, query.answers)


def registry(book: str | None = None) -> dict[str, Task]:
    """Every task by name; `book` is a text file used as BABILong filler instead of the essays."""
    tasks = [
        Task("passkey", make_passkey, _score_with(scoring.first_number), 16, questions=PASSKEY_QUESTIONS),
        Task("niah", make_niah("number"), _score_with(scoring.contains_all), 32, depth_grid=True,
             questions=niah_questions("number")),
        Task("niah-word", make_niah("word"), _score_with(scoring.contains_all), 32, depth_grid=True,
             questions=niah_questions("word")),
        Task("kv", make_kv, _score_with(scoring.contains_all), 48, questions=KV_QUESTIONS),
        Task("squad", make_squad, _score_with(scoring.contains_any), 32),
        Task("json-kv", make_structured(JSON_PREFIX, "\n", _json_entry, JSON_QUESTIONS),
             _score_with(scoring.contains_all), 32, questions=JSON_QUESTIONS),
        Task("table", make_structured(TABLE_PREFIX, "\n", _table_entry, TABLE_QUESTIONS),
             _score_with(scoring.contains_all), 32, questions=TABLE_QUESTIONS),
        Task("code", make_structured(CODE_PREFIX, "\n\n", _code_entry, CODE_QUESTIONS),
             _score_with(scoring.contains_all), 32, questions=CODE_QUESTIONS),
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
    styles: Sequence[str] = ("exact",),
    same_questions: bool = False,
) -> list[Sample]:
    """`n_samples` contexts (times each depth, for depth-grid tasks), each from its own seeded generator.

    Depths are fractions in [0, 1]; tasks without a depth grid draw theirs at random. `n_queries`
    questions per context where the task has several (kv, squad, json-kv, table, code); one elsewhere.
    Each context is asked in every style of `styles`, one sample per style that differs from the others in
    its questions only (reworded by a generator of its own); tasks without question templates in `exact` only.

    Each generator is seeded with (task, length, seed, index), so every length draws other questions. With
    `same_questions`, with (task, seed, index): sample i of every length hides the same facts at the same depths
    and asks the same questions, only the amount of filler differs (a BABILong story too long for a length
    raises ValueError).
    """
    grid = list(depths) if task.depth_grid else [None]
    samples = []
    for index in range(n_samples * len(grid)):
        key = f"{task.name}|{seed}|{index}" if same_questions else f"{task.name}|{length}|{seed}|{index}"
        rng = random.Random(key)
        fixed = grid[index % len(grid)]
        depth = rng.random() if fixed is None else fixed
        hay, queries = task.make(counter, length, rng, depth, n_queries, same_questions)
        for style in (styles if task.questions else ["exact"]):
            style_rng = random.Random(f"{key}|{style}")
            asked = tuple(restyle(q, task.questions, style, style_rng) for q in queries)
            samples.append(Sample(styled_name(task.name, style), length, seed, index, hay.text, hay.n_tokens, asked))
    return samples

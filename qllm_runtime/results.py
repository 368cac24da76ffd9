"""What a call returns (Answer with Usage, BlockSpan, Timings), the stream that delivers it, and the
settings that shape it (GenerationSettings: the one place the generation defaults live)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

from .errors import InvalidInputError, StreamClosedError


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer. `cached_tokens`: context tokens served from a memory read earlier."""

    context_tokens: int
    question_tokens: int
    generated_tokens: int
    cached_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.context_tokens + self.question_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.generated_tokens


@dataclass(frozen=True)
class BlockSpan:
    """A looked-up passage: characters [start, end) of the context, selected `hits` times (all layers)."""

    start: int
    end: int
    text: str
    hits: int


@dataclass(frozen=True)
class Timings:
    read_s: float
    question_s: float
    generate_s: float


@dataclass(frozen=True)
class Answer:
    text: str
    usage: Usage
    blocks: list[BlockSpan]
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    timings: Timings
    full_attention: bool = False  # the reading fit the model's window and was held with its own full attention


@dataclass(frozen=True)
class GenerationSettings:
    """How an answer is generated; every answering call takes these fields as keywords (`**generation`).

    `temperature` 0 is greedy; above 0, temperature + nucleus (`top_p`) sampling from a private generator
    seeded with `seed` (None: a fresh random seed). `stop`: strings that end the answer (not included).
    """

    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def make(cls, **options: Any) -> GenerationSettings:
        """Validated settings from keyword options; `stop` may be None, a str or a list of str."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InvalidInputError(f"unknown generation option(s) {unknown}: the options are {names}")
        if "stop" in options:
            options["stop"] = _stop_strings(options["stop"])
        return cls(**options)

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive int, got {n!r}")
        check_number("temperature", self.temperature, lambda t: t >= 0, "a finite number >= 0 (0 = greedy)")
        check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "a number in (0, 1]")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise InvalidInputError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidInputError(f"stop must be a tuple of str, got {self.stop!r}")


def check_number(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """InvalidInputError unless `value` is a finite real number (not a bool) for which `ok` holds."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise InvalidInputError(f"{name} must be {expected}, got {value!r}")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, Sequence) and not isinstance(stop, bytes) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidInputError(f"stop must be a str or a list of str, got {stop!r}")


class AnswerStream(Iterator[str]):
    """Text pieces as they are generated; `.answer` holds the full Answer once the stream is exhausted.

    The stream holds the model until it is exhausted or closed: finish it (`result()`) or `close()` it.
    """

    def __init__(self, gen: Generator[str, None, Answer]) -> None:
        self._gen = gen
        self.answer: Answer | None = None
        self._closed = False

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as done:
            self.answer = self.answer or done.value
            raise

    def close(self) -> None:
        """Stop generating and release the model; an unfinished stream then has no Answer."""
        self._gen.close()
        self._closed = True

    def result(self) -> Answer:
        """Consume the rest of the stream (if any) and return the Answer."""
        for _ in self:
            pass
        if self.answer is None:
            why = "was closed before it finished" if self._closed else "failed earlier (see that error)"
            raise StreamClosedError(f"this answer stream {why}, so it has no Answer: start a new call, and read a "
                                    "stream to the end (or call result()) instead of closing it to get its Answer")
        return self.answer

"""Recent: results kept by key while they are asked for again, such as the views a lookup group takes of buffers that
outlive it (each view costs microseconds of host time, and the bounds recur group by group)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Recent(Generic[T]):
    """`make()`'s result by key, made once; forgotten all at once when `limit` keys are held (or on `clear`, when what
    the results refer to is replaced)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[Hashable, T] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= self.limit:
                self._held.clear()
            held = self._held[key] = make()
        return held

    def clear(self) -> None:
        self._held.clear()

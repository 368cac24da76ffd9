"""One call at a time per model object, across engines and threads, with a bounded wait."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from typing import ClassVar

from torch import nn

from .errors import EngineBusyError

DEFAULT_LOCK_TIMEOUT = 600.0
"""Seconds a call waits for another call on the same model before EngineBusyError (None: forever)."""


@dataclass(frozen=True)
class _Holder:
    call: str
    thread: str
    since: float

    def __str__(self) -> str:
        return f"{self.call} (started {monotonic() - self.since:.1f} s ago in thread {self.thread!r})"


class ModelLock:
    """The lock of one model object, shared by every engine over it; same-thread re-entry is an error."""

    _locks: ClassVar[weakref.WeakKeyDictionary[nn.Module, ModelLock]] = weakref.WeakKeyDictionary()
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._holder: _Holder | None = None

    @classmethod
    def of(cls, model: nn.Module) -> ModelLock:
        with cls._guard:
            return cls._locks.setdefault(model, cls())

    @contextmanager
    def hold(self, call: str, timeout: float | None) -> Iterator[None]:
        """Hold the model for `call` (named in other callers' errors); wait at most `timeout` seconds."""
        if self._owner == threading.get_ident():
            raise EngineBusyError(
                f"this model is busy with an unfinished {self._holder} in this same thread: "
                "exhaust or close() that stream before starting another call"
            )
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise EngineBusyError(
                f"the model stayed busy for {timeout} s with an unfinished {self._holder or 'call'}: an answer "
                "stream holds the model until it is exhausted or closed, so finish or close() it; or wait longer "
                "with QLLMEngine(..., lock_timeout=seconds) (None waits forever)"
            )
        self._holder = _Holder(call, threading.current_thread().name, monotonic())
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = self._holder = None
            self._lock.release()

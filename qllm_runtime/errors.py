"""Exception types. Each names what went wrong and how to fix it."""

from __future__ import annotations


class QLLMError(Exception):
    """Base class of every error QuickLLaMA raises on purpose."""


class InvalidInputError(QLLMError, ValueError):
    """A context, question or message list the engine cannot use (empty, not text, ...)."""


class UnsupportedModelError(QLLMError, TypeError):
    """The model has no rotary-embedding attention that QuickLLaMA can drive."""


class ModelNotFoundError(QLLMError, FileNotFoundError):
    """A model path or the embedded default model is not available."""


class InvalidModelFileError(QLLMError, ValueError):
    """A model file that cannot be read: not a GGUF, cut short, or a damaged cached conversion."""


class EngineBusyError(QLLMError, RuntimeError):
    """The model is held by another call (often an unfinished answer stream) for longer than allowed."""


class StreamClosedError(QLLMError, RuntimeError):
    """An answer stream was closed (or failed) before it finished, so it has no Answer."""


class MemoryFileError(QLLMError, ValueError):
    """A file that is not a saved memory, or one that was cut short or altered since it was saved."""


class MemoryMismatchError(QLLMError, ValueError):
    """A saved memory made by another model, tokenizer or memory-shaping config than the loading engine's."""

"""QuickLLaMA runtime: query-aware block memory for long-context inference on stock transformers models."""

from .config import EMBEDDED_MODEL_CONFIG, QLLMConfig
from .engine import Memory, QLLMEngine
from .errors import (
    EngineBusyError,
    InvalidInputError,
    InvalidModelFileError,
    MemoryFileError,
    MemoryMismatchError,
    ModelNotFoundError,
    QLLMError,
    StreamClosedError,
    UnsupportedModelError,
)
from .results import Answer, AnswerStream, BlockSpan, GenerationSettings, Timings, Usage

__all__ = [
    "EMBEDDED_MODEL_CONFIG",
    "Answer",
    "AnswerStream",
    "BlockSpan",
    "EngineBusyError",
    "GenerationSettings",
    "InvalidInputError",
    "InvalidModelFileError",
    "Memory",
    "MemoryFileError",
    "MemoryMismatchError",
    "ModelNotFoundError",
    "QLLMConfig",
    "QLLMEngine",
    "QLLMError",
    "StreamClosedError",
    "Timings",
    "UnsupportedModelError",
    "Usage",
]

"""QuickLLaMA runtime: query-aware block memory for long-context inference on stock transformers models."""

from .config import QLLMConfig
from .engine import Memory, QLLMEngine
from .errors import (
    EngineBusyError,
    InvalidInputError,
    ModelNotFoundError,
    QLLMError,
    StreamClosedError,
    UnsupportedModelError,
)
from .results import Answer, AnswerStream, BlockSpan, GenerationSettings, Timings, Usage

__all__ = [
    "Answer",
    "AnswerStream",
    "BlockSpan",
    "EngineBusyError",
    "GenerationSettings",
    "InvalidInputError",
    "Memory",
    "ModelNotFoundError",
    "QLLMConfig",
    "QLLMEngine",
    "QLLMError",
    "StreamClosedError",
    "Timings",
    "UnsupportedModelError",
    "Usage",
]

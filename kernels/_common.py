"""Checks shared by the kernel wrappers."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton decides at decoration time (for its own library: when Triton is first imported; for ours: when
# this package is) whether jit functions are compiled or run by its CPU interpreter (TRITON_INTERPRET=1).
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels of this package can run on `device`: CUDA, or the CPU under the interpreter
    (tests and smoke runs only: it is far slower than the torch reference there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRETED


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for `tl.dot` on inputs of `dtype`: the input dtype, except bfloat16 under the
    interpreter, whose `tl.dot` multiplies bfloat16 bit patterns (triton-lang/triton#11584): fp32 there."""
    if _INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def on_device(device: torch.device) -> AbstractContextManager:
    """Where a launch must run: Triton launches on the current CUDA device, which need not be the inputs' (a
    model split across GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def check_device(tensors: list[Tensor]) -> torch.device:
    """The one device all `tensors` live on; ValueError if they differ or Triton cannot run there."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if not triton_available(device):
        raise ValueError(
            f"Triton cannot run on {device}: use a CUDA device, or set TRITON_INTERPRET=1 before Triton is "
            "first imported to run on the CPU (slow), or use the qllm_runtime reference"
        )
    return device

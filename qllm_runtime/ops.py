"""Which implementation runs: the Triton kernels (`qllm_kernels`) on CUDA, the tiled PyTorch attention
(`attention_cpu`) on the CPU, the PyTorch references elsewhere (attention, block gather, block store,
representative keys; on CUDA also the model's RMSNorms, `norms`).

The references are the spec and the test oracle. `QUICKLLAMA_KERNELS=0` forces them on CUDA and CPU alike (to
compare or debug).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache, partial
from types import ModuleType

import torch
from torch import Tensor

from .attention import attend_reference
from .attention_cpu import attend_tiled
from .blocks import (
    FarSetFn,
    GatherFn,
    Planes,
    Represent,
    StoreFn,
    gather_far_set_reference,
    gather_reference,
    store_reference,
)
from .norms import RMSNormFn

log = logging.getLogger("quickllama")

AttendFn = Callable[..., tuple[Tensor, Tensor | None]]
DecodeAttendFn = Callable[..., Tensor]  # `qllm_kernels.decode_attention`


@cache
def _import_kernels() -> ModuleType | None:
    try:
        import qllm_kernels
    except ImportError as e:  # said once: the reference path is correct, only slower
        log.warning("qllm_kernels cannot be imported (%s): CUDA runs the slower PyTorch path; "
                    "pip install 'quickllama[kernels]'", e)
        return None
    return qllm_kernels


def kernels(device: torch.device) -> ModuleType | None:
    """`qllm_kernels` if its kernels should run on `device`, else None."""
    if device.type != "cuda" or os.environ.get("QUICKLLAMA_KERNELS", "1") == "0":
        return None
    module = _import_kernels()
    return module if module is not None and module.triton_available(device) else None


def attention_op(device: torch.device, head_dim: int) -> AttendFn:
    """The attention for tensors on `device` (on CUDA, head_dim outside the kernel's 32/64/128 uses the reference)."""
    module = kernels(device)
    if module is not None and module.supports_head_dim(head_dim):
        # the engine's inputs are valid by construction; its layers run one after another, so they share temporaries
        return partial(module.attention, check=False, scratch=module.Scratch())
    if device.type == "cpu" and os.environ.get("QUICKLLAMA_KERNELS", "1") != "0":
        return attend_tiled
    return attend_reference


def decode_attention_op(device: torch.device, head_dim: int) -> DecodeAttendFn | None:
    """The attention of one-token steps with positions on the device (CUDA graphs), or None where the kernels do
    not run: those steps then take the ordinary path."""
    module = kernels(device)
    if module is None or not module.supports_head_dim(head_dim):
        return None
    return partial(module.decode_attention, check=False)


def gather_op(device: torch.device) -> GatherFn:
    """The block gather for a layer on `device`: on CUDA the kernel, which reads offloaded blocks in place from
    pinned host memory (no host sync); elsewhere the reference. The engine's calls to a kernel skip its input
    validation (valid by construction: tens of microseconds a call on the host)."""
    module = kernels(device)
    if module is None:
        return gather_reference

    def gather(pool: Planes, host: Planes, indices: Tensor, device_limit: int, dtype: torch.dtype
               ) -> tuple[Tensor, Tensor]:
        return module.gather_blocks(pool.held(), host.held(), indices, device_limit, dtype, check=False)

    return gather


def far_set_op(device: torch.device) -> FarSetFn:
    """Writing a lookup group's blocks and remainder into its far set (`BlockStore.gather_far_set`): on CUDA one kernel
    launch (blocks read in place as `gather_op`'s, the remainder copied, positions written), elsewhere the reference."""
    module = kernels(device)
    if module is None:
        return gather_far_set_reference

    def far_set(pool: Planes, host: Planes, indices: Tensor, device_limit: int, *outputs_and_remainder) -> None:
        module.gather_far_set(pool.held(), host.held(), indices, device_limit, *outputs_and_remainder, check=False)

    return far_set


def store_op(device: torch.device) -> StoreFn:
    """Writing new blocks where they are kept (quantised to float8 on the way where stored so), and their
    representative keys: on CUDA the kernel (one launch for K, V, their scales and the representatives), elsewhere
    the reference."""
    module = kernels(device)
    if module is None:
        return store_reference

    def store(k: Tensor, v: Tensor, target: Planes, represent: Represent | None = None) -> None:
        module.store_blocks(k, v, target.held(), represent, check=False)

    return store


def rms_norm_op(device: torch.device) -> RMSNormFn | None:
    """The model's RMSNorm as one kernel (`norms.fuse_rms_norms`) on CUDA; None elsewhere (the model's own forward)."""
    module = kernels(device)
    return None if module is None else partial(module.rms_norm, check=False)

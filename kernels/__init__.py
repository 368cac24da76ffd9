"""Triton kernels for QuickLLaMA: the block scorer and the whole lookup, the fused [local | far] attention, the block
gather, the block store (float8 quantisation on the way), the blocks' representative keys, and the model's RMSNorm.

Each op has a plain-PyTorch reference in `qllm_runtime` (the spec and the CPU path). Kernels are compiled
for CUDA, or run by Triton's CPU interpreter when TRITON_INTERPRET=1 is set before Triton is first
imported; `triton_available(device)` says which devices they can run on.
"""

from ._common import Scratch, triton_available
from .attention import attention, decode_attention, supports_head_dim
from .block_score import TOP_MAX_K, block_score, top_blocks
from .gather import gather_blocks, gather_far_set
from .norm import rms_norm
from .representatives import representative_keys
from .store import store_blocks

__all__ = [
    "TOP_MAX_K", "Scratch", "attention", "block_score", "decode_attention", "gather_blocks", "gather_far_set",
    "representative_keys", "rms_norm", "store_blocks",
    "supports_head_dim", "top_blocks", "triton_available",
]

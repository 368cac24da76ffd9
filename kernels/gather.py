"""Block gather: the keys and values of looked-up blocks, read where they live (device pool or pinned host memory),
de-quantised from float8 when stored so, in one launch.

The spec is `qllm_runtime.blocks.gather_reference`. Block b < device_limit is pool[b], a later one host[b -
device_limit]. Host memory must be pinned: a CUDA kernel reads it in place over the bus (unified addressing), so a
lookup of offloaded blocks needs no host sync and no copy per block. Grid (slots, kv_heads, chunks): each program
copies one chunk of one block of one KV head (block_size * head_dim contiguous values), so many reads are in flight
over the bus at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, Launcher, cdiv, next_power_of_2, on_device, triton_available

__all__ = ["gather_blocks", "gather_far_set"]

_CHUNK = 1024


@triton.jit
def _e4m3_to_float(bits):
    """float8 e4m3 (fn) bit patterns (uint8) -> their float32 values, exactly (no NaN codes expected)."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 0xF
    mantissa = b & 0x7
    normal = ((exponent + 120) << 23) | (mantissa << 20)  # float32 bits of (1 + m/8) * 2^(e - 7)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    return tl.where((b & 0x80) != 0, -magnitude, magnitude)


@Launcher
@triton.jit(do_not_specialize=["n_blocks", "n_rem", "first_position", "rem_position"])
def _gather_kernel(
    PoolK, PoolV, HostK, HostV, PoolKScale, PoolVScale, HostKScale, HostVScale, Index, OutK, OutV, RemK, RemV, OutPos,
    stride_pb, stride_ph, stride_hb, stride_hh, stride_psb, stride_hsb, stride_ir, stride_oh, stride_rh,
    n_values, device_limit, n_blocks, n_rem, block_size, first_position, rem_position,
    FP8: tl.constexpr, CHUNK: tl.constexpr, POSITIONS: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    """Slot s < n_blocks: block Index[head, s]; a later slot: the next block_size remainder tokens of RemK/RemV."""
    slot = tl.program_id(0)
    head = tl.program_id(1)
    out = head.to(tl.int64) * stride_oh + slot.to(tl.int64) * n_values
    o = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    if slot < n_blocks:
        block = tl.load(Index + head * stride_ir + slot).to(tl.int64)
        if block < device_limit:
            src_k = PoolK + block * stride_pb + head * stride_ph
            src_v = PoolV + block * stride_pb + head * stride_ph
            k_scale_ptr = PoolKScale + block * stride_psb + head
            v_scale_ptr = PoolVScale + block * stride_psb + head
        else:
            src_k = HostK + (block - device_limit) * stride_hb + head * stride_hh
            src_v = HostV + (block - device_limit) * stride_hb + head * stride_hh
            k_scale_ptr = HostKScale + (block - device_limit) * stride_hsb + head
            v_scale_ptr = HostVScale + (block - device_limit) * stride_hsb + head
        ok = o < n_values
        k = tl.load(src_k + o, mask=ok, other=0)
        v = tl.load(src_v + o, mask=ok, other=0)
        if FP8:
            k = _e4m3_to_float(k) * tl.load(k_scale_ptr)
            v = _e4m3_to_float(v) * tl.load(v_scale_ptr)
        k, v = k.to(OutK.dtype.element_ty), v.to(OutV.dtype.element_ty)
        first = first_position + block * block_size  # the position of the block's first token
        tokens = block_size + 0 * n_rem  # an int32 value as in the other branch, even where block_size is constant
    else:
        row = (slot - n_blocks).to(tl.int64) * block_size  # the slot's first remainder token
        head_dim = n_values // block_size
        ok = row * head_dim + o < n_rem * head_dim
        rem = head.to(tl.int64) * stride_rh + row * head_dim + o
        k = tl.load(RemK + rem, mask=ok, other=0).to(OutK.dtype.element_ty)
        v = tl.load(RemV + rem, mask=ok, other=0).to(OutV.dtype.element_ty)
        first = rem_position + row
        tokens = tl.minimum(n_rem - row, block_size).to(tl.int32)
    tl.store(OutK + out + o, k, mask=ok)
    tl.store(OutV + out + o, v, mask=ok)
    if POSITIONS and ((head == 0) & (tl.program_id(2) == 0)):  # one program per slot writes its tokens' positions
        t = tl.arange(0, TOKENS)
        tl.store(OutPos + slot.to(tl.int64) * block_size + t, first + t, mask=t < tokens)


def gather_blocks(
    pool: tuple[Tensor, ...],
    host: tuple[Tensor, ...],
    indices: Tensor,
    device_limit: int,
    dtype: torch.dtype,
    *,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """K and V of the blocks `indices`, concatenated per KV head: (kv_heads, m * block_size, head_dim) in `dtype`.

    pool, host: (k, v) or, float8, (k, v, k_scale, v_scale): k, v (n, kv_heads, block_size, head_dim) in a float
    dtype or uint8 (e4m3 bits), block and token planes contiguous; scales (n, kv_heads) float32. pool on the CUDA
    device (or the CPU under the interpreter); host there too or in pinned CPU memory; either may hold no blocks.
    indices: (1, m), the same blocks for every KV head, or (kv_heads, m); block b < device_limit is pool[b], a later
    one host[b - device_limit]. The caller guarantees every index is in range. check=False skips validating the
    inputs (the engine's calls, valid by construction).
    """
    if check:
        _check(pool, host, indices, dtype)
    kv_heads, block_size, head_dim = (pool if pool[0].shape[0] else host)[0].shape[1:]
    out_k = torch.empty((kv_heads, indices.shape[1] * block_size, head_dim), dtype=dtype, device=pool[0].device)
    out_v = torch.empty_like(out_k)
    _launch(pool, host, indices, device_limit, out_k, out_v, None, out_k[:, :0], out_v[:, :0], 0, 0)
    return out_k, out_v


def gather_far_set(
    pool: tuple[Tensor, ...],
    host: tuple[Tensor, ...],
    indices: Tensor,
    device_limit: int,
    out_k: Tensor,
    out_v: Tensor,
    out_pos: Tensor,
    rem_k: Tensor,
    rem_v: Tensor,
    first_position: int,
    rem_position: int,
    *,
    check: bool = True,
) -> None:
    """Write a lookup group's far keys after its init tokens, in one launch: the blocks `indices` (as `gather_blocks`
    reads them), then the remainder, with their positions.

    out_k, out_v: (kv_heads, m * block_size + n_rem, head_dim) views (token planes contiguous) that receive the blocks'
    K and V, de-quantised to their dtype, then rem_k, rem_v (kv_heads, n_rem, head_dim), likewise. out_pos: (m *
    block_size + n_rem,) int64 receives first_position + b * block_size + t for token t of block b (by the first row of
    `indices`), then rem_position + j for remainder token j. pool, host, indices, device_limit as `gather_blocks`;
    m or n_rem may be 0. check=False skips validating the inputs (the engine's calls, valid by construction).
    """
    if check:
        _check(pool, host, indices, out_k.dtype)
        _check_far_set(pool, host, indices, out_k, out_v, out_pos, rem_k, rem_v)
    _launch(pool, host, indices, device_limit, out_k, out_v, out_pos, rem_k, rem_v, first_position, rem_position)


def _launch(pool: tuple[Tensor, ...], host: tuple[Tensor, ...], indices: Tensor, device_limit: int, out_k: Tensor,
            out_v: Tensor, out_pos: Tensor | None, rem_k: Tensor, rem_v: Tensor, first_position: int,
            rem_position: int) -> None:
    """The gather kernel over m block slots and the remainder's slots of block_size tokens."""
    fp8 = len(pool) == 4
    kv_heads, block_size, head_dim = (pool if pool[0].shape[0] else host)[0].shape[1:]
    m, n_rem = indices.shape[1], rem_k.shape[1]
    slots = m + cdiv(n_rem, block_size)
    if slots == 0:
        return
    if indices.device != out_k.device or not indices.is_contiguous():
        indices = indices.to(out_k.device).contiguous()
    # a source with no blocks is never read: stand the other one in for it (a launch takes no empty tensor)
    pool = pool if pool[0].shape[0] else host
    host = host if host[0].shape[0] else pool
    scales = (*pool[2:], *host[2:]) if fp8 else (pool[0],) * 4
    rem_k, rem_v = (rem_k, rem_v) if n_rem else (out_k, out_v)
    with on_device(out_k.device):
        _gather_kernel[(slots, kv_heads, cdiv(block_size * head_dim, _CHUNK))](
            pool[0], pool[1], host[0], host[1], scales[0], scales[1], scales[2], scales[3], indices, out_k, out_v,
            rem_k, rem_v, out_k if out_pos is None else out_pos,
            pool[0].stride(0), pool[0].stride(1), host[0].stride(0), host[0].stride(1),
            scales[0].stride(0) if fp8 else 0, scales[2].stride(0) if fp8 else 0,
            indices.stride(0) if indices.shape[0] > 1 else 0, out_k.stride(0), rem_k.stride(0),
            block_size * head_dim, device_limit, m, n_rem, block_size, first_position, rem_position,
            FP8=fp8, CHUNK=_CHUNK, POSITIONS=out_pos is not None, TOKENS=next_power_of_2(block_size),
        )  # fmt: skip


def _check(pool: tuple[Tensor, ...], host: tuple[Tensor, ...], indices: Tensor, dtype: torch.dtype) -> None:
    """ValueError unless the inputs are as `gather_blocks` documents them."""
    if len(pool) != len(host) or len(pool) not in (2, 4):
        raise ValueError("pool and host must both be (k, v) or both (k, v, k_scale, v_scale)")
    fp8 = len(pool) == 4
    kv_heads, block_size, head_dim = (pool if pool[0].shape[0] else host)[0].shape[1:]
    device = pool[0].device
    if not triton_available(device):
        raise ValueError(f"Triton cannot run on {device}: use the qllm_runtime reference")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    for name, planes in (("pool", pool), ("host", host)):
        k, v = planes[:2]
        if k.shape[1:] != (kv_heads, block_size, head_dim) or v.shape != k.shape or k.dtype != v.dtype:
            raise ValueError(f"{name} k and v must both be (n, {kv_heads}, {block_size}, {head_dim}) of one dtype")
        if (k.dtype == torch.uint8) != fp8:
            raise ValueError(f"{name}: float8 planes are uint8 bits and come with scales")
        if k[:1].numel() and not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"{name} k and v must be contiguous")
        if k.numel() and k.device != device and not (device.type == "cuda" and k.device.type == "cpu"
                                                     and k.is_pinned()):
            raise ValueError(f"{name} blocks must be on {device} or in pinned CPU memory, got {k.device}")
    if indices.dim() != 2 or indices.shape[0] not in (1, kv_heads) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be (1 or {kv_heads}, m) int32/int64, got {tuple(indices.shape)} "
                         f"{indices.dtype}")


def _check_far_set(pool: tuple[Tensor, ...], host: tuple[Tensor, ...], indices: Tensor, out_k: Tensor, out_v: Tensor,
                   out_pos: Tensor, rem_k: Tensor, rem_v: Tensor) -> None:
    """ValueError unless the outputs and the remainder are as `gather_far_set` documents them."""
    kv_heads, block_size, head_dim = (pool if pool[0].shape[0] else host)[0].shape[1:]
    n_rem = rem_k.shape[1] if rem_k.dim() == 3 else -1
    n = indices.shape[1] * block_size + n_rem
    for name, t in (("rem_k", rem_k), ("rem_v", rem_v), ("out_k", out_k), ("out_v", out_v)):
        want = (kv_heads, n_rem if name.startswith("rem") else n, head_dim)
        rows = t.dim() == 3 and t.stride(2) == 1 and (t.shape[1] < 2 or t.stride(1) == head_dim)
        if tuple(t.shape) != want or t.dtype != out_k.dtype or not rows:
            raise ValueError(f"{name} must be {want} of one float dtype with contiguous token rows, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
    if out_pos.shape != (n,) or out_pos.dtype != torch.int64 or out_pos.stride(0) != 1:
        raise ValueError(f"out_pos must be a contiguous ({n},) int64 tensor, got {tuple(out_pos.shape)} "
                         f"{out_pos.dtype}")
    if len({t.device for t in (out_k, out_v, out_pos, rem_k, rem_v)}) != 1:
        raise ValueError("the outputs and the remainder must be on one device")

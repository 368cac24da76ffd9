"""Block store: new blocks' keys and values written where they are kept (device pool or pinned host memory), cast
to the stored dtype or quantised to float8 e4m3 with a scale per block and KV head, K, V and scales in one launch.

The spec is `qllm_runtime.blocks.store_reference` (float8: `qllm_runtime.blocks.quantize`): scale = max |x| over the
block's block_size * head_dim values of one KV head, clamped to >= 1e-30, times float32(1 / 448);
bits = e4m3fn(clamp(x / scale, -448, 448)), rounded to nearest even. The targets may be pinned host memory: a CUDA
kernel writes it in place over the bus (unified addressing). The engine does not: it encodes offloaded blocks on
the device and copies them over with one DMA copy per plane (`BlockStore.add`). Grid (count, kv_heads, 2): each
program writes one plane (K or V) of one block of one KV head; float8 reads it twice (its largest magnitude first).
A lookup group makes a few blocks at a time, so the programs are few: two per block and head, not one. With
`represent`, the same launch writes the blocks' representative keys (`representative_keys`): grid (count, kv_heads,
2 + heads / kv_heads), one more program for each query head (a launch less for each lookup group).

Rounding is done with integer bit operations, the same compiled and interpreted (Triton's interpreter truncates
float32 -> bfloat16 and its float8 casts do not round to nearest even), and divisions are IEEE-rounded
(`tl.math.div_rn`: a compiled `/`, and with Triton 3.6 even `tl.fdiv(..., ieee_rounding=True)`, can be one ulp
off, which moves a quotient off a tie), so the stored bits equal torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, Launcher, check_device, next_power_of_2, on_device, round_to_bf16
from .representatives import check_inputs as check_representatives
from .representatives import representative

__all__ = ["store_blocks"]

# values per load: (tokens, head_dim) tiles of up to this size, so a block of 128 x 128 is one load (with 8 warps, 64
# float32 values a thread). Its programs are few: with 2048-value tiles each ran 16 dependent loads, 21 µs a call on
# the H200 for a prefill group's 4 blocks (their 3 MB take under 1 µs at its bandwidth)
_TILE = 16384


@triton.jit
def _e4m3_bits(x):
    """float32 values with |x| <= 448 -> their float8 e4m3fn bit patterns (int32 in 0..255), to nearest even."""
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    # normal (|x| >= 2^-6): drop 20 of float32's 23 mantissa bits, rounding (a carry bumps the exponent); rebias
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal: a multiple of 2^-9; adding 2^23 rounds |x| * 2^9 to an integer (to nearest even) in its mantissa
    subnormal = (tl.abs(x) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return tl.where(a < 0x3C800000, subnormal, normal) | ((u >> 24) & 0x80)


@triton.jit
def _store_plane(
    Src, Dst, Scale, stride_b, stride_h, stride_t, stride_db, stride_sb, block, head, block_size, head_dim,
    FP8: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    src = Src + block * stride_b + head * stride_h
    dst = Dst + block * stride_db + head * block_size * head_dim
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if FP8:
        amax = 0.0
        for t0 in range(0, block_size, BLOCK_T):
            t = t0 + offs_t
            ok = (t < block_size)[:, None] & d_ok[None, :]
            x = tl.load(src + t[:, None] * stride_t + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x)))
        scale = tl.maximum(amax, 1e-30) * (1.0 / 448.0)  # as the reference: times the float32 reciprocal
        tl.store(Scale + block * stride_sb + head, scale)
    for t0 in range(0, block_size, BLOCK_T):
        t = t0 + offs_t
        ok = (t < block_size)[:, None] & d_ok[None, :]
        x = tl.load(src + t[:, None] * stride_t + offs_d[None, :], mask=ok, other=0.0)
        if FP8:
            xf = x.to(tl.float32)
            q = tl.math.div_rn(xf, tl.zeros_like(xf) + scale)
            x = _e4m3_bits(tl.minimum(tl.maximum(q, -448.0), 448.0))
        elif ROUND_BF16:
            x = round_to_bf16(x.to(tl.float32))
        tl.store(dst + t[:, None] * head_dim + offs_d[None, :], x.to(Dst.dtype.element_ty), mask=ok)


@Launcher
@triton.jit
def _store_kernel(
    K, V, OutK, OutV, KScale, VScale, Scores, Repr,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_okb, stride_ovb, stride_ksb, stride_vsb,
    stride_sh, stride_rb, stride_rh,
    block_size, head_dim, group, repr_topk,
    FP8: tl.constexpr, ROUND_BF16: tl.constexpr, REPRESENT: tl.constexpr, ROUND_REPR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    task = tl.program_id(2)  # 0: the K plane, 1: the V plane, 2 + j: query head j of this KV head's representative
    if task == 0:
        _store_plane(K, OutK, KScale, stride_kb, stride_kh, stride_kt, stride_okb, stride_ksb, block, head,
                     block_size, head_dim, FP8, ROUND_BF16, BLOCK_T, BLOCK_D)
    elif task == 1:
        _store_plane(V, OutV, VScale, stride_vb, stride_vh, stride_vt, stride_ovb, stride_vsb, block, head,
                     block_size, head_dim, FP8, ROUND_BF16, BLOCK_T, BLOCK_D)
    elif REPRESENT:
        q_head = head * group + task - 2
        representative(K + block * stride_kb + head * stride_kh, stride_kt,
                        Scores + q_head * stride_sh + block * block_size, Repr + block * stride_rb + q_head * stride_rh,
                        block_size, head_dim, repr_topk, ROUND_REPR, BLOCK_S, BLOCK_D)


def store_blocks(k: Tensor, v: Tensor, target: tuple[Tensor, ...], represent: tuple[Tensor, int, Tensor] | None = None,
                 *, check: bool = True) -> None:
    """Write blocks k, v into `target` as it stores them; with `represent`, their representative keys too.

    k, v: (count, kv_heads, block_size, head_dim), float16/bfloat16/float32, any strides but a contiguous last dim
    (e.g. views of a (kv_heads, tokens, head_dim) buffer), on the CUDA device (or the CPU under the interpreter).
    target: (K, V) of that shape in a float dtype (a cast copy), or (K_bits, V_bits, K_scale, V_scale): uint8 e4m3
    bits of that shape and (count, kv_heads) float32 scales. Each target plane is contiguous but for its first
    dimension (e.g. rows [first : first + count] of a bigger plane), on k's device or, on CUDA, in pinned CPU memory.
    represent: None, or (scores, repr_topk, out): `representative_keys` of the keys k (per KV head, block after block)
    with these arguments, in the same launch (scores on k's device). check=False skips validating the inputs (the
    engine's calls, valid by construction).
    """
    if check:
        _check(k, v, target)
        if represent is not None:
            scores, repr_topk, out = represent
            check_representatives(k.transpose(0, 1).flatten(1, 2), scores, repr_topk, out)
    fp8 = len(target) == 4
    count, kv_heads, block_size, head_dim = k.shape
    out_k, out_v = target[:2]
    stored = torch.uint8 if fp8 else out_k.dtype
    if count == 0 or k.numel() == 0:
        return
    scales = target[2:] if fp8 else (out_k, out_k)  # not read without float8: stand-ins
    scores, repr_topk, out = represent if represent is not None else (out_k, 1, out_k)  # stand-ins, not read
    group = out.shape[1] // kv_heads if represent is not None else 0
    block_d = next_power_of_2(head_dim)
    block_t = min(next_power_of_2(block_size), max(1, _TILE // block_d))
    with on_device(k.device):
        _store_kernel[(count, kv_heads, 2 + group)](
            k, v, out_k, out_v, scales[0], scales[1], scores, out,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            out_k.stride(0), out_v.stride(0), scales[0].stride(0) if fp8 else 0, scales[1].stride(0) if fp8 else 0,
            scores.stride(0), out.stride(0), out.stride(1),
            block_size, head_dim, group, repr_topk,
            FP8=fp8, ROUND_BF16=stored == torch.bfloat16 and k.dtype != torch.bfloat16, REPRESENT=represent is not None,
            ROUND_REPR=out.dtype == torch.bfloat16, BLOCK_T=block_t, BLOCK_S=next_power_of_2(block_size),
            BLOCK_D=block_d, num_warps=8 if block_t * block_d >= 8192 else 4,
        )  # fmt: skip


def _check(k: Tensor, v: Tensor, target: tuple[Tensor, ...]) -> None:
    """ValueError unless the inputs are as `store_blocks` documents them."""
    if len(target) not in (2, 4):
        raise ValueError(f"target must be (k, v) or (k_bits, v_bits, k_scale, v_scale), got {len(target)} tensors")
    fp8 = len(target) == 4
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (count, kv_heads, block_size, head_dim), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.dtype not in FLOAT_DTYPES or v.dtype != k.dtype:
        raise ValueError(f"k and v must be float16, bfloat16 or float32 of one dtype, got {k.dtype} and {v.dtype}")
    count, kv_heads, _, head_dim = k.shape
    if head_dim > 1 and (k.stride(3) != 1 or v.stride(3) != 1):
        raise ValueError("k and v need a contiguous last dim (head_dim)")
    device = check_device([k, v])
    out_k, out_v = target[:2]
    if out_k.shape != k.shape or out_v.shape != k.shape:
        raise ValueError(f"target k and v must be {tuple(k.shape)}, got {tuple(out_k.shape)} and {tuple(out_v.shape)}")
    stored = torch.uint8 if fp8 else out_k.dtype
    if out_k.dtype != stored or out_v.dtype != stored or not (fp8 or stored in FLOAT_DTYPES):
        want = "uint8 (float8 bits)" if fp8 else "float16, bfloat16 or float32 of one dtype"
        raise ValueError(f"target k and v must be {want}, got {out_k.dtype} and {out_v.dtype}")
    for scale in target[2:]:
        if scale.shape != (count, kv_heads) or scale.dtype != torch.float32 or (kv_heads > 1 and scale.stride(1) != 1):
            raise ValueError(f"target scales must be ({count}, {kv_heads}) float32 with a contiguous last dim, got "
                             f"{tuple(scale.shape)} {scale.dtype}")
    if count and not (out_k[0].is_contiguous() and out_v[0].is_contiguous()):
        raise ValueError("target k and v must be contiguous in their last three dims")
    for t in target:
        if t.device != device and not (device.type == "cuda" and t.device.type == "cpu" and t.is_pinned()):
            raise ValueError(f"target planes must be on {device} or in pinned CPU memory, got {t.device}")

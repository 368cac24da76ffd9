"""Fused attention over [local window | init | selected blocks | remainder] with one softmax.

The spec is `qllm_runtime.attention.attend_reference`. Keys arrive un-rotated. Local keys and queries are
rotated in-kernel to their positions relative to the start of the local buffer (relative RoPE). Far keys
take one of two position schemes (`ORDERED`, a constexpr, so each compiles its own kernel):
- shared (`far_origin=None`): far keys stay raw and the query is rotated once to position `n_local`, so
  every far key sits at distance `n_local`;
- ordered: far key j sits at virtual position `far_origin + j`; queries are rotated per row to
  `q - far_origin + shift` and far keys per tile to `j + shift` (`shift` >= 0 keeps table rows valid).
Masks use real absolute positions in both: local iff 0 <= q - k < n_local, far iff q - k >= n_local.

Up to three launches:
0. More rows than one row tile (a prefill group): `_rotate_keys_kernel` rotates the local keys and (ordered) the
   far keys once, into buffers the two kernels below read as they are, instead of each row tile rotating each
   key tile again (table reads and fp32 work in the inner loop).
1. `_attn_fwd_kernel`, grid (row tiles, kv_heads): the rows of a tile are (query head of the kv head's
   group, query) pairs, so GQA reads each K/V tile once per group and never materialises repeated K/V.
   One online softmax (base 2, fp32 running max / sum / accumulator) runs over the local tiles that
   the window can reach, then over all far tiles; it writes the output and the base-2 log-sum-exp.
   When every row fits one tile (decode), the key tiles are cut into runs, one program each (grid (runs,
   kv_heads)), and `_combine_kernel` merges their softmax states (flash-decoding): a decode step's 8 KV heads
   would otherwise keep 8 programs busy.
2. `_received_kernel`, grid (local key tiles, heads): recomputes the local logits of the queries that
   can see each key tile and adds exp2(logit - lse) summed over them to the key's received probability (with
   step 0, from the local queries the forward kernel wrote rotated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, Launcher, Scratch, cdiv, check_device, dot_dtype, empty, next_power_of_2, on_device

__all__ = [
    "LAUNCH", "ROTATE_AHEAD", "SPLIT", "attention", "decode_attention", "key_runs", "rotates_ahead",
    "supports_head_dim",
]

_LOG2E = 1.4426950408889634
_HEAD_DIMS = (32, 64, 128)
# Launch shapes of the two kernels for 16-bit inputs (fp32 tiles take BLOCK_N 32 and BLOCK_M <= 64 to fit shared
# memory): rows (query head, query) per program, keys per tile, warps, pipeline stages. Chosen on an H200 with
# `python -m benchmarks.kernel_bench --sweep` (BENCHMARKS.md §1), which tries others by changing this dict; the
# forward's 64 keys a tile over the sweep's 32 by its GPU time in a 100K reading (0.65 against 0.72 s)
LAUNCH = {
    "forward": dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "received": dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
}
# More rows than one row tile (a prefill group): every row tile reads every key tile, so the keys are rotated once
# ahead (`_rotate_keys_kernel`, tiles of ROTATE_TILE keys) rather than by each row tile; False rotates them in the
# forward kernel always (to compare)
ROTATE_AHEAD = True
ROTATE_TILE = 64
# Rows that fit one row tile (decode, short prompts): the key tiles are shared out among up to `max_splits`
# programs per KV head, about `tiles` each.
SPLIT = dict(tiles=4, max_splits=32)


def supports_head_dim(head_dim: int) -> bool:
    """Whether `attention` takes this head_dim."""
    return head_dim in _HEAD_DIMS


@triton.jit
def _load_rope(X, Cos, Sin, offs_x, pos, mask, stride_cosn, stride_sinn, HALF: tl.constexpr):
    """The vectors at X + offs_x (rows,), each rotated to its position in `pos`: halves (rows, HALF), fp32."""
    offs_h = tl.arange(0, HALF)
    x_ptrs = X + offs_x[:, None] + offs_h[None, :]
    cos_ptrs = Cos + pos[:, None] * stride_cosn + offs_h[None, :]
    sin_ptrs = Sin + pos[:, None] * stride_sinn + offs_h[None, :]
    m = mask[:, None]
    x1 = tl.load(x_ptrs, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=m, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptrs, mask=m, other=0.0).to(tl.float32)  # a table row repeats its first half
    sin = tl.load(sin_ptrs, mask=m, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _load_halves(X, offs_x, mask, HALF: tl.constexpr):
    """The vectors at X + offs_x (rows,) as they are: halves (rows, HALF)."""
    x_ptrs = X + offs_x[:, None] + tl.arange(0, HALF)[None, :]
    return tl.load(x_ptrs, mask=mask[:, None], other=0.0), tl.load(x_ptrs + HALF, mask=mask[:, None], other=0.0)


@triton.jit
def _load_halves_t(X, offs_x, mask, HALF: tl.constexpr):
    """The vectors at X + offs_x (keys,) as they are (raw, or rotated ahead), transposed halves (HALF, keys)."""
    offs_h = tl.arange(0, HALF)
    x_ptrs = X + offs_x[None, :] + offs_h[:, None]
    return tl.load(x_ptrs, mask=mask[None, :], other=0.0), tl.load(x_ptrs + HALF, mask=mask[None, :], other=0.0)


@Launcher
@triton.jit(do_not_specialize=["n_loc", "n_far", "k_far_start"])
def _rotate_keys_kernel(
    K_loc, K_far, Cos, Sin, Out_loc, Out_far,
    stride_klh, stride_kln, stride_kfh, stride_kfn, stride_olh, stride_ofh, stride_cosn, stride_sinn,
    n_loc, n_far, k_far_start,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Local key j rotated to position j, far key j to k_far_start + j, into contiguous (kv_heads, n, HEAD_DIM)
    buffers: grid (local tiles + far tiles, kv_heads)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    n_loc_tiles = tl.cdiv(n_loc, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    if tile < n_loc_tiles:
        offs_k = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs_k < n_loc
        x1, x2 = _load_rope(K_loc, Cos, Sin, kv_head * stride_klh + offs_k * stride_kln, offs_k, ok, stride_cosn,
                            stride_sinn, HALF)
        out_ptrs = Out_loc + kv_head * stride_olh + offs_k[:, None] * HEAD_DIM + offs_h[None, :]
    else:
        offs_k = (tile - n_loc_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs_k < n_far
        x1, x2 = _load_rope(K_far, Cos, Sin, kv_head * stride_kfh + offs_k * stride_kfn, k_far_start + offs_k, ok,
                            stride_cosn, stride_sinn, HALF)
        out_ptrs = Out_far + kv_head * stride_ofh + offs_k[:, None] * HEAD_DIM + offs_h[None, :]
    tl.store(out_ptrs, x1.to(Out_loc.dtype.element_ty), mask=ok[:, None])
    tl.store(out_ptrs + HALF, x2.to(Out_loc.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _softmax_step(s, visible, v, m_i, l_i, acc):
    """Fold one tile of base-2 logits `s` (rows, keys) with values `v` (keys, head_dim) into the state."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays empty
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


# positions and lengths change from call to call: one compiled kernel for all of them, not one per divisibility
@Launcher
@triton.jit(do_not_specialize=["n_loc", "n_far", "q_rel_start", "q_start", "q_far_start", "k_far_start", "n_splits"])
def _attn_fwd_kernel(
    Q, K_loc, V_loc, K_far, V_far, Far_pos, Cos, Sin, Out, Lse, Part, Step, Q_rot,
    stride_qh, stride_qm,
    stride_klh, stride_kln, stride_vlh, stride_vln,
    stride_kfh, stride_kfn, stride_vfh, stride_vfn,
    stride_cosn, stride_sinn, stride_om, stride_oh, stride_lseh,
    n_q, n_loc, n_far, q_rel_start, q_start, n_local, q_far_start, k_far_start, group, qk_scale, n_splits,
    HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ORDERED: tl.constexpr, PARTIAL: tl.constexpr, STEP_ON_DEVICE: tl.constexpr, ROTATED: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)  # the row tile; PARTIAL: the run of key tiles (one row tile holds every row)
    kv_head = tl.program_id(1)
    if STEP_ON_DEVICE:  # `decode_attention`: (window offset, n_far, q_start, far_origin) read here, not passed
        window = tl.load(Step)
        K_loc += window * stride_kln
        V_loc += window * stride_vln
        n_far = tl.load(Step + 1).to(tl.int32)
        q_start = tl.load(Step + 2).to(tl.int32)
        q_far_start = q_start - tl.load(Step + 3).to(tl.int32)

    offs_r = (0 if PARTIAL else pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = (query head of the group, query)
    row_ok = offs_r < group * n_q
    offs_m = offs_r % n_q
    head = kv_head * group + offs_r // n_q
    q_rel = q_rel_start + offs_m
    q_pos = q_start + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_q = head * stride_qh + offs_m * stride_qm

    ql1, ql2 = _load_rope(Q, Cos, Sin, offs_q, q_rel, row_ok, stride_cosn, stride_sinn, HALF)
    far_rel = q_far_start + offs_m if ORDERED else tl.zeros_like(offs_m) + n_local
    qf1, qf2 = _load_rope(Q, Cos, Sin, offs_q, far_rel, row_ok, stride_cosn, stride_sinn, HALF)
    ql1, ql2, qf1, qf2 = ql1.to(DOT_DTYPE), ql2.to(DOT_DTYPE), qf1.to(DOT_DTYPE), qf2.to(DOT_DTYPE)
    if ROTATED:  # keys come rotated ahead; the rotated local queries go to Q_rot (heads, n_q, HEAD_DIM) for the
        # received kernel
        q_rot_ptrs = Q_rot + (head * n_q + offs_m)[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
        tl.store(q_rot_ptrs, ql1.to(Q_rot.dtype.element_ty), mask=row_ok[:, None])
        tl.store(q_rot_ptrs + HALF, ql2.to(Q_rot.dtype.element_ty), mask=row_ok[:, None])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # local keys: only the tiles some row's window 0 <= q_rel - k_rel < n_local reaches
    lo = tl.maximum(tl.min(tl.where(row_ok, q_rel, n_loc), 0) - n_local + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(tl.max(tl.where(row_ok, q_rel, 0), 0) + 1, n_loc)
    far_lo = 0
    far_hi = n_far
    if PARTIAL:  # this program's share of the key tiles: [local tiles lo..hi | far tiles], cut into n_splits runs
        n_lt = tl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
        per = (n_lt + tl.cdiv(n_far, BLOCK_N) + n_splits - 1) // n_splits
        t0 = pid_m * per
        t1 = t0 + per
        hi = tl.minimum(lo + tl.minimum(t1, n_lt) * BLOCK_N, hi)
        lo = lo + tl.minimum(t0, n_lt) * BLOCK_N
        far_lo = tl.maximum(t0 - n_lt, 0) * BLOCK_N
        far_hi = tl.minimum(tl.maximum(t1 - n_lt, 0) * BLOCK_N, n_far)
    for start_n in range(lo, hi, BLOCK_N):
        k_rel = start_n + offs_n
        key_ok = k_rel < n_loc
        offs_k = kv_head * stride_klh + k_rel * stride_kln
        if ROTATED:
            k1_t, k2_t = _load_halves_t(K_loc, offs_k, key_ok, HALF)
        else:
            k1, k2 = _load_rope(K_loc, Cos, Sin, offs_k, k_rel, key_ok, stride_cosn, stride_sinn, HALF)
            k1_t, k2_t = tl.trans(k1), tl.trans(k2)
        s = tl.dot(ql1, k1_t.to(DOT_DTYPE), input_precision="ieee")
        s += tl.dot(ql2, k2_t.to(DOT_DTYPE), input_precision="ieee")
        dist = q_rel[:, None] - k_rel[None, :]
        visible = (dist >= 0) & (dist < n_local) & key_ok[None, :]
        v_ptrs = V_loc + kv_head * stride_vlh + k_rel[:, None] * stride_vln + offs_d[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
        m_i, l_i, acc = _softmax_step(s * qk_scale, visible, v, m_i, l_i, acc)

    # far keys (init, selected blocks, remainder), seen iff q_pos - pos >= n_local: shared, raw keys in any
    # order; ordered, key j rotated to k_far_start + j (here, or ahead)
    for start_n in range(far_lo, far_hi, BLOCK_N):
        offs_k = start_n + offs_n
        key_ok = offs_k < n_far
        offs_kf = kv_head * stride_kfh + offs_k * stride_kfn
        if ORDERED and not ROTATED:
            k1, k2 = _load_rope(K_far, Cos, Sin, offs_kf, k_far_start + offs_k, key_ok, stride_cosn, stride_sinn, HALF)
            k1_t, k2_t = tl.trans(k1), tl.trans(k2)
        else:
            k1_t, k2_t = _load_halves_t(K_far, offs_kf, key_ok, HALF)
        s = tl.dot(qf1, k1_t.to(DOT_DTYPE), input_precision="ieee")
        s += tl.dot(qf2, k2_t.to(DOT_DTYPE), input_precision="ieee")
        pos = tl.load(Far_pos + offs_k, mask=key_ok, other=0)
        visible = (q_pos[:, None] - pos[None, :] >= n_local) & key_ok[None, :]
        v_ptrs = V_far + kv_head * stride_vfh + offs_k[:, None] * stride_vfn + offs_d[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
        m_i, l_i, acc = _softmax_step(s * qk_scale, visible, v, m_i, l_i, acc)

    if PARTIAL:  # the unnormalised state, for `_combine_kernel`: Part (n_splits, kv_heads, BLOCK_M, HEAD_DIM + 2)
        row = ((pid_m * tl.num_programs(1) + kv_head) * BLOCK_M + tl.arange(0, BLOCK_M)) * (HEAD_DIM + 2)
        tl.store(Part + row[:, None] + offs_d[None, :], acc)
        tl.store(Part + row + HEAD_DIM, m_i)
        tl.store(Part + row + HEAD_DIM + 1, l_i)
    else:  # every valid row sees at least its own key, so l_i >= 1 there
        out_ptrs = Out + offs_m[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + head * stride_lseh + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@Launcher
@triton.jit(do_not_specialize=["n_splits"])
def _combine_kernel(
    Part, Out, Lse, stride_om, stride_oh, stride_lseh, n_q, group, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Merge the split programs' softmax states of one KV head's rows into the output and its log-sum-exp."""
    kv_head = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_M)
    row_ok = offs_r < group * n_q
    offs_m = offs_r % n_q
    head = kv_head * group + offs_r // n_q
    offs_d = tl.arange(0, HEAD_DIM)
    stride_split = tl.num_programs(0) * BLOCK_M * (HEAD_DIM + 2)
    row = (kv_head * BLOCK_M + offs_r) * (HEAD_DIM + 2)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(n_splits):
        m = tl.maximum(m, tl.load(Part + split * stride_split + row + HEAD_DIM))
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # defensive: every row sees at least its own key
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for split in range(n_splits):
        part = Part + split * stride_split + row
        weight = tl.math.exp2(tl.load(part + HEAD_DIM) - m_ref)  # 0 for a split that saw no key of the row
        l_i += tl.load(part + HEAD_DIM + 1) * weight
        acc += tl.load(part[:, None] + offs_d[None, :]) * weight[:, None]
    out_ptrs = Out + offs_m[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + head * stride_lseh + offs_m, m + tl.math.log2(l_i), mask=row_ok)


@Launcher
@triton.jit(do_not_specialize=["n_loc", "q_rel_start"])
def _received_kernel(
    Q, K_loc, Cos, Sin, Lse, Received,
    stride_qh, stride_qm, stride_klh, stride_kln,
    stride_cosn, stride_sinn, stride_lseh, stride_rh,
    n_q, n_loc, q_rel_start, n_local, group, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATED: tl.constexpr,
):  # fmt: skip
    """ROTATED: Q holds the local queries and K_loc the local keys, both rotated ahead (the forward kernel's Q_rot,
    `_rotate_keys_kernel`); else both are raw and rotated here."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group

    k_rel = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = k_rel < n_loc
    offs_k = kv_head * stride_klh + k_rel * stride_kln
    if ROTATED:
        k1_t, k2_t = _load_halves_t(K_loc, offs_k, key_ok, HALF)
    else:
        k1, k2 = _load_rope(K_loc, Cos, Sin, offs_k, k_rel, key_ok, stride_cosn, stride_sinn, HALF)
        k1_t, k2_t = tl.trans(k1), tl.trans(k2)
    k1_t, k2_t = k1_t.to(DOT_DTYPE), k2_t.to(DOT_DTYPE)

    received = tl.zeros([BLOCK_N], dtype=tl.float32)
    # only the queries whose window reaches this tile: k_rel <= q_rel < k_rel + n_local
    lo = tl.maximum(pid_n * BLOCK_N - q_rel_start, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 + n_local - q_rel_start, n_q)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        q_rel = q_rel_start + offs_m
        offs_q = head * stride_qh + offs_m * stride_qm
        if ROTATED:
            q1, q2 = _load_halves(Q, offs_q, row_ok, HALF)
        else:
            q1, q2 = _load_rope(Q, Cos, Sin, offs_q, q_rel, row_ok, stride_cosn, stride_sinn, HALF)
        s = tl.dot(q1.to(DOT_DTYPE), k1_t, input_precision="ieee")
        s += tl.dot(q2.to(DOT_DTYPE), k2_t, input_precision="ieee")
        lse = tl.load(Lse + head * stride_lseh + offs_m, mask=row_ok, other=0.0)
        dist = q_rel[:, None] - k_rel[None, :]
        visible = (dist >= 0) & (dist < n_local) & row_ok[:, None] & key_ok[None, :]
        p = tl.where(visible, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        received += tl.sum(p, 0)
    received_ptrs = Received + head * stride_rh + k_rel  # this program alone adds to these keys of this head
    tl.store(received_ptrs, tl.load(received_ptrs, mask=key_ok, other=0.0) + received, mask=key_ok)


def attention(
    query: Tensor,
    q_start: int,
    local_k: Tensor,
    local_v: Tensor,
    local_start: int,
    far_k: Tensor,
    far_v: Tensor,
    far_pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    n_local: int,
    scaling: float,
    *,
    far_origin: int | None = None,
    received: Tensor | None = None,
    out: Tensor | None = None,
    check: bool = True,
    scratch: Scratch | None = None,
) -> Tensor:
    """One lookup group's attention; arguments and result as `qllm_runtime.attention.attend_reference`.

    query: (heads, n_q, head_dim), raw; absolute positions q_start .. q_start + n_q - 1.
    local_k, local_v: (kv_heads, n_loc, head_dim), raw; positions local_start .. q_start + n_q - 1.
    far_k, far_v: (kv_heads, n_far, head_dim), raw; if ordered, in the order they are laid out;
        n_far may be 0.
    far_pos: (n_far,) int64 (or int32) absolute positions of the far keys.
    cos, sin: (n_pos, head_dim) RoPE tables whose rows repeat their first half (as the rotary modules of HF
        models make them: the kernels read only that half), n_pos > max(n_local, n_loc - 1); ordered: also
        > q_start + n_q - 1 - far_origin + s and n_far - 1 + s, s = max(far_origin - q_start, 0).
    far_origin: None for shared far positions; an int for ordered ones: far key j at virtual position
        far_origin + j.
    query, local and far K/V share one dtype (fp16/bf16/fp32); head_dim in (32, 64, 128); the last dim
    of every tensor contiguous.

    check=False skips validating the inputs (the engine's calls, whose inputs hold these by construction: tens of
    microseconds a call on the host).

    received: None, or (heads, n_loc) float32 with a contiguous last dim: the softmax probability each local key
    received, summed over the queries, is added to it (by a second launch; None: not launched). out: None, or
    (n_q, heads, head_dim) in the query dtype with a contiguous last dim, to write the output into. scratch: where the
    kernels' temporaries are kept from call to call (None: allocated per call).

    Returns the output (n_q, heads, head_dim) in the query dtype (`out` when given).
    """
    if check:
        _check(query, q_start, local_k, local_v, local_start, far_k, far_v, far_pos, cos, sin, n_local, far_origin)
        _check_outputs(query, local_k, received, out)
    q_far_start, k_far_start = _far_shifts(q_start, far_origin)
    heads, n_q, head_dim = query.shape
    n_loc = local_k.shape[1]
    qk_scale = float(scaling) * _LOG2E
    q_rel_start = q_start - local_start
    ordered = far_origin is not None
    q_rot = None
    if rotates_ahead(heads // local_k.shape[0] * n_q, query.element_size()):
        local_k, far_k, q_rot = _rotate_ahead(query, local_k, far_k, cos, sin, k_far_start, ordered, scratch)
    out, lse = _forward(
        query, local_k, local_v, far_k, far_v, far_pos, cos, sin, None, out, q_rot, n_loc=n_loc,
        n_far=far_k.shape[1], q_rel_start=q_rel_start, q_start=q_start, n_local=n_local, q_far_start=q_far_start,
        k_far_start=k_far_start, qk_scale=qk_scale, ordered=ordered, scratch=scratch,
    )  # fmt: skip
    if received is None:
        return out
    receive = _launch(LAUNCH["received"], query.element_size())
    block_m = _rows_per_program(n_q, receive.pop("block_m"))
    queries = query if q_rot is None else q_rot
    with on_device(query.device):
        _received_kernel[(cdiv(n_loc, receive["BLOCK_N"]), heads)](
            queries, local_k, cos, sin, lse, received,
            queries.stride(0), queries.stride(1), local_k.stride(0), local_k.stride(1),
            cos.stride(0), sin.stride(0), lse.stride(0), received.stride(0),
            n_q, n_loc, q_rel_start, n_local, heads // local_k.shape[0], qk_scale,
            HEAD_DIM=head_dim, DOT_DTYPE=dot_dtype(query.dtype), BLOCK_M=block_m, ROTATED=q_rot is not None,
            **receive,
        )  # fmt: skip
    return out


def rotates_ahead(rows: int, element_size: int) -> bool:
    """Whether `attention` rotates the keys of `rows` (query head, query) rows ahead of its kernels (`ROTATE_AHEAD`):
    where they span more than one row tile."""
    return ROTATE_AHEAD and rows > _launch(LAUNCH["forward"], element_size)["block_m"]


def _rotate_ahead(query: Tensor, local_k: Tensor, far_k: Tensor, cos: Tensor, sin: Tensor, k_far_start: int,
                  ordered: bool, scratch: Scratch | None) -> tuple[Tensor, Tensor, Tensor]:
    """The local keys rotated to their positions in the local buffer and, ordered, the far keys to theirs, once for
    all the row tiles that read them (shared far keys stay raw); and the buffer for the rotated local queries
    (written by the forward kernel, read by the received kernel). In the dtype the dots read."""
    dtype = torch.float32 if dot_dtype(query.dtype) == tl.float32 else query.dtype
    kv_heads, n_loc, head_dim = local_k.shape
    n_far = far_k.shape[1] if ordered else 0
    local_rot = empty(scratch, "local_rot", (kv_heads, n_loc, head_dim), dtype, query.device)
    far_rot = empty(scratch, "far_rot", (kv_heads, n_far, head_dim), dtype, query.device) if ordered else far_k
    with on_device(query.device):
        _rotate_keys_kernel[(cdiv(n_loc, ROTATE_TILE) + cdiv(n_far, ROTATE_TILE), kv_heads)](
            local_k, far_k, cos, sin, local_rot, far_rot,
            local_k.stride(0), local_k.stride(1), far_k.stride(0), far_k.stride(1), local_rot.stride(0),
            far_rot.stride(0), cos.stride(0), sin.stride(0), n_loc, n_far, k_far_start,
            HEAD_DIM=head_dim, BLOCK_N=ROTATE_TILE,
        )  # fmt: skip
    return local_rot, far_rot, empty(scratch, "q_rot", query.shape, dtype, query.device)


def decode_attention(
    query: Tensor, window_k: Tensor, window_v: Tensor, far_k: Tensor, far_v: Tensor, far_pos: Tensor, cos: Tensor,
    sin: Tensor, n_local: int, scaling: float, step: Tensor, *, ordered: bool, check: bool = True,
) -> Tensor:
    """A decode step's `attention` whose positions are read on the device from `step`, so that one launch sequence
    (a CUDA graph) serves every step while they change.

    query: (heads, 1, head_dim), raw, at position q_start; its window is full: the n_local keys before it, itself
    last. window_k, window_v: (kv_heads, capacity, head_dim) buffers holding the window at [offset, offset +
    n_local). far_k, far_v: (kv_heads, far_capacity, head_dim) and far_pos (far_capacity,): the first n_far are the
    far keys, as `attention` takes them. step: (4,) int64 on the device: offset, n_far (<= far_capacity), q_start,
    far_origin (ordered: far key j at virtual position far_origin + j, q_start - n_local + 1 - n_far <= far_origin <=
    q_start; unread when shared). cos, sin: more than n_local + far_capacity rows.

    Returns out (1, heads, head_dim): `attention(query, q_start, window_k[:, offset : offset + n_local], ...,
    q_start - n_local + 1, far_k[:, :n_far], far_v[:, :n_far], far_pos[:n_far], ..., far_origin=far_origin if
    ordered else None)`. The key tiles are shared out for far_capacity keys (fixed programs);
    check=True validates the inputs with the step's values (a host sync).
    """
    if check:
        if query.dim() != 3 or query.shape[1] != 1 or cos.shape[0] <= n_local + far_k.shape[1]:
            raise ValueError("decode_attention takes one query per head (heads, 1, head_dim) and cos/sin of more "
                             f"than n_local + far_capacity ({n_local + far_k.shape[1]}) rows")
        offset, n_far, q_start, far_origin = _check_step(step, query.device, window_k.shape[1], far_k.shape[1],
                                                         n_local, ordered)
        window = slice(offset, offset + n_local)
        _check(query, q_start, window_k[:, window], window_v[:, window], q_start - n_local + 1, far_k[:, :n_far],
               far_v[:, :n_far], far_pos[:n_far], cos, sin, n_local, far_origin)
    # n_far, q_start and the far shifts are read from `step`; the window holds n_local keys, the query last
    out, _ = _forward(
        query, window_k, window_v, far_k, far_v, far_pos, cos, sin, step, None, None, n_loc=n_local, n_far=0,
        q_rel_start=n_local - 1, q_start=0, n_local=n_local, q_far_start=0, k_far_start=0,
        qk_scale=float(scaling) * _LOG2E, ordered=ordered,
    )  # fmt: skip
    return out


def _forward(
    query: Tensor, local_k: Tensor, local_v: Tensor, far_k: Tensor, far_v: Tensor, far_pos: Tensor, cos: Tensor,
    sin: Tensor, step: Tensor | None, out: Tensor | None, q_rot: Tensor | None, *, n_loc: int, n_far: int,
    q_rel_start: int, q_start: int, n_local: int, q_far_start: int, k_far_start: int, qk_scale: float, ordered: bool,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel (and the merge of split runs, `key_runs` for the buffers' n_loc and far keys):
    out (n_q, heads, head_dim; into `out` when given), lse (heads, n_q). With `step`, the kernel reads the positions
    from it. With `q_rot`, the keys come rotated ahead (`_rotate_ahead`) and the rotated local queries go there."""
    heads, n_q, head_dim = query.shape
    kv_heads = local_k.shape[0]
    group = heads // kv_heads
    device = query.device
    if out is None:
        out = torch.empty(n_q, heads, head_dim, dtype=query.dtype, device=device)
    lse = empty(scratch, "lse", (heads, n_q), torch.float32, device)
    forward = _launch(LAUNCH["forward"], query.element_size())
    n_splits = _runs(group * n_q, n_loc, far_k.shape[1], forward)
    block_m = _rows_per_program(group * n_q, forward.pop("block_m"))
    # the split programs' states; without a split never read (lse stands in: a launch takes no missing tensor)
    part = lse if n_splits == 1 else torch.empty((n_splits, kv_heads, block_m, head_dim + 2), dtype=torch.float32,
                                                 device=device)
    with on_device(device):
        _attn_fwd_kernel[(n_splits if n_splits > 1 else cdiv(group * n_q, block_m), kv_heads)](
            query, local_k, local_v, far_k, far_v, far_pos, cos, sin, out, lse, part, lse if step is None else step,
            lse if q_rot is None else q_rot, query.stride(0), query.stride(1),
            local_k.stride(0), local_k.stride(1), local_v.stride(0), local_v.stride(1),
            far_k.stride(0), far_k.stride(1), far_v.stride(0), far_v.stride(1),
            cos.stride(0), sin.stride(0), out.stride(0), out.stride(1), lse.stride(0),
            n_q, n_loc, n_far, q_rel_start, q_start, n_local, q_far_start, k_far_start, group, qk_scale, n_splits,
            HEAD_DIM=head_dim, DOT_DTYPE=dot_dtype(query.dtype), BLOCK_M=block_m, ORDERED=ordered,
            PARTIAL=n_splits > 1, STEP_ON_DEVICE=step is not None, ROTATED=q_rot is not None, **forward,
        )  # fmt: skip
        if n_splits > 1:
            _combine_kernel[(kv_heads,)](
                part, out, lse, out.stride(0), out.stride(1), lse.stride(0), n_q, group, n_splits,
                HEAD_DIM=head_dim, BLOCK_M=block_m,
            )  # fmt: skip
    return out, lse


def key_runs(rows: int, n_loc: int, n_far: int, element_size: int) -> int:
    """Programs per KV head that share the key tiles of `rows` (query head, query) rows: 1 unless the rows fit one
    row tile (decode), which would leave most of the GPU idle; then runs of about `SPLIT["tiles"]` key tiles, their
    softmax states merged after (flash-decoding)."""
    return _runs(rows, n_loc, n_far, _launch(LAUNCH["forward"], element_size))


def _runs(rows: int, n_loc: int, n_far: int, forward: dict[str, int]) -> int:
    """`key_runs` under the forward kernel's launch arguments (`_launch`)."""
    if rows > forward["block_m"]:  # more than one row tile
        return 1
    key_tiles = cdiv(n_loc, forward["BLOCK_N"]) + cdiv(n_far, forward["BLOCK_N"])
    return min(SPLIT["max_splits"], cdiv(key_tiles, SPLIT["tiles"]))


def _rows_per_program(rows: int, block_m: int) -> int:
    """BLOCK_M for `rows` rows: the launch shape's, or the next power of two >= 16 when fewer rows than that."""
    return min(block_m, max(16, next_power_of_2(rows)))


def _launch(shape: dict[str, int], element_size: int) -> dict[str, int]:
    """A `LAUNCH` entry as launch arguments (block_m kept lower-case for the caller to clamp)."""
    if element_size > 2:  # fp32 tiles are twice as large: fit shared memory
        shape = {**shape, "block_m": min(shape["block_m"], 64), "block_n": 32}
    return dict(block_m=shape["block_m"], BLOCK_N=shape["block_n"], num_warps=shape["num_warps"],
                num_stages=shape["num_stages"])


def _check(
    query: Tensor, q_start: int, local_k: Tensor, local_v: Tensor, local_start: int, far_k: Tensor, far_v: Tensor,
    far_pos: Tensor, cos: Tensor, sin: Tensor, n_local: int, far_origin: int | None,
) -> None:
    """ValueError / TypeError unless the inputs are as `attention` documents them."""
    heads, n_q, head_dim = _shape(query, "query", 3)
    kv_heads, n_loc, _ = _shape(local_k, "local_k", 3)
    n_far = _shape(far_k, "far_k", 3)[1]
    n_pos = _shape(cos, "cos", 2)[0]
    expected = {
        "local_k": (kv_heads, n_loc, head_dim),
        "local_v": (kv_heads, n_loc, head_dim),
        "far_k": (kv_heads, n_far, head_dim),
        "far_v": (kv_heads, n_far, head_dim),
        "far_pos": (n_far,),
        "cos": (n_pos, head_dim),
        "sin": (n_pos, head_dim),
    }
    named = dict(zip(expected, (local_k, local_v, far_k, far_v, far_pos, cos, sin), strict=True))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(named[name].shape)}")
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_HEAD_DIMS}, got {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if n_q < 1 or local_start > q_start or local_start + n_loc != q_start + n_q:
        raise ValueError(
            f"local keys must end with the queries: local_start ({local_start}) <= q_start ({q_start}) and "
            f"local_start + n_loc ({local_start + n_loc}) == q_start + n_q ({q_start + n_q}), n_q >= 1"
        )
    if far_origin is not None and (isinstance(far_origin, bool) or not isinstance(far_origin, int)):
        raise TypeError(f"far_origin must be None or an int, got {type(far_origin).__name__}")
    need = max(n_local, n_loc - 1)
    if far_origin is not None:
        q_far_start, k_far_start = _far_shifts(q_start, far_origin)
        need = max(need, q_far_start + n_q - 1, k_far_start + n_far - 1)
    if n_local < 1 or n_pos <= need:
        raise ValueError(f"need n_local >= 1 and RoPE tables longer than {need} positions, got {n_pos}")
    for name in ("local_k", "local_v", "far_k", "far_v"):
        if named[name].dtype != query.dtype:
            raise ValueError(f"{name} must have the query dtype {query.dtype}, got {named[name].dtype}")
    if query.dtype not in FLOAT_DTYPES or not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"query must be float16, bfloat16 or float32 (got {query.dtype}); cos/sin float")
    half = head_dim // 2
    if not all(torch.equal(t[: need + 1, :half], t[: need + 1, half:]) for t in (cos, sin)):
        raise ValueError("cos and sin rows must repeat their first half (rotate-half RoPE tables)")
    if far_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"far_pos must be int64 or int32, got {far_pos.dtype}")
    for name, t in (("query", query), *named.items()):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim; call .contiguous() first")
    check_device([query, *named.values()])


def _check_outputs(query: Tensor, local_k: Tensor, received: Tensor | None, out: Tensor | None) -> None:
    """ValueError unless `received` and `out` are None or as `attention` documents them."""
    heads, n_q, head_dim = query.shape
    for name, t, shape, dtype in (("received", received, (heads, local_k.shape[1]), torch.float32),
                                  ("out", out, (n_q, heads, head_dim), query.dtype)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
        check_device([query, t])


def _check_step(step: Tensor, device: torch.device, capacity: int, far_capacity: int, n_local: int, ordered: bool
                ) -> tuple[int, int, int, int | None]:
    """`decode_attention`'s step as ints (offset, n_far, q_start, far_origin or None); ValueError unless it fits."""
    if not isinstance(step, Tensor) or step.shape != (4,) or step.dtype != torch.int64 or step.stride(0) != 1:
        raise ValueError(f"step must be a contiguous (4,) int64 tensor, got {getattr(step, 'shape', type(step))}")
    if step.device != device:
        raise ValueError(f"step must be on the query's device {device}, got {step.device}")
    offset, n_far, q_start, far_origin = step.tolist()
    if not (0 <= offset <= capacity - n_local and 0 <= n_far <= far_capacity and q_start >= n_local - 1):
        raise ValueError(f"step {step.tolist()} does not fit buffers of {capacity} window and {far_capacity} far keys")
    if ordered and not q_start - n_local + 1 - n_far <= far_origin <= q_start:
        raise ValueError(f"far_origin ({far_origin}) must lie in [q_start - n_local + 1 - n_far, q_start] = "
                         f"[{q_start - n_local + 1 - n_far}, {q_start}]")
    return offset, n_far, q_start, far_origin if ordered else None


def _far_shifts(q_start: int, far_origin: int | None) -> tuple[int, int]:
    """(q_far_start, k_far_start): the RoPE table rows of the first query and first far key for ordered far positions
    (0, 0 when shared)."""
    if far_origin is None:
        return 0, 0
    # <rope(q, q_pos), rope(k_j, far_origin + j)> = <rope(q, q_pos - far_origin + s), rope(k_j, j + s)>;
    # the shift s keeps both table rows non-negative
    k_far_start = max(far_origin - q_start, 0)
    return q_start - far_origin + k_far_start, k_far_start


def _shape(t: Tensor, name: str, ndim: int) -> tuple[int, ...]:
    if not isinstance(t, Tensor) or t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-d tensor, got {getattr(t, 'shape', type(t))}")
    return tuple(t.shape)

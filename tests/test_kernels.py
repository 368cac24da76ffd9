"""Triton kernels against the qllm_runtime references.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before Triton
decorates any kernel), so shapes stay small; with CUDA the same tests run compiled, plus LLaMA-3-8B
shapes marked `gpu`. Kernel outputs start as NaN (see `poison`), so an element never written fails.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "Triton was imported before TRITON_INTERPRET=1 could be set: export TRITON_INTERPRET=1",
            allow_module_level=True,
        )
    # before the first `import triton`: Triton fixes compiled vs interpreted for every jit function, its own
    # library included, when it is decorated
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import qllm_kernels as qk

from qllm_runtime.attention import apply_rope, attend_reference
from qllm_runtime.attention_cpu import attend_tiled
from qllm_runtime.blocks import Planes, gather_reference, quantize, representatives_reference, store_reference
from qllm_runtime.lookup import block_scores_reference, select_blocks
from qllm_runtime.norms import rms_norm_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

LOW_PRECISION = {torch.bfloat16: 2e-2, torch.float16: 5e-3}  # rtol = atol vs the fp32 reference


@pytest.fixture
def poison(monkeypatch):
    """Make every float tensor from torch.empty start as NaN while the test runs."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _rope_tables(n_pos: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def _far_positions(n_far: int, q_start: int, n_q: int, n_local: int, gen: torch.Generator) -> torch.Tensor:
    """[init | blocks | remainder] positions; the remainder straddles the far threshold of the queries."""
    n_init, n_rem = n_far // 4, n_far // 3
    rem_end = q_start + n_q - n_local + 2  # the last two are too recent for every query
    init = torch.arange(n_init)
    span = torch.arange(n_init, rem_end - n_rem)
    blocks = span[torch.randperm(len(span), generator=gen)[: n_far - n_init - n_rem]].sort().values
    return torch.cat([init, blocks, torch.arange(rem_end - n_rem, rem_end)])


def _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, dtype, seed=0, ordered=False):
    """Inputs of `attention`; ordered: far_origin packs the far keys against the last one (the remainder's end),
    which lies after q_start when n_q > n_far + n_local - 2, and the RoPE tables are long enough for it."""
    gen = torch.Generator().manual_seed(seed)
    local_start = 3 * n_loc + 4 * n_far + 7
    q_start = local_start + n_loc - n_q

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    cos, sin = _rope_tables(max(n_local, n_loc) + n_far + 3, head_dim)
    far_origin = q_start + n_q - n_local + 2 - n_far if ordered else None
    return dict(
        query=randn(heads, n_q, head_dim), q_start=q_start,
        local_k=randn(kv_heads, n_loc, head_dim), local_v=randn(kv_heads, n_loc, head_dim),
        local_start=local_start,
        far_k=randn(kv_heads, n_far, head_dim), far_v=randn(kv_heads, n_far, head_dim),
        far_pos=_far_positions(n_far, q_start, n_q, n_local, gen).to(DEVICE),
        cos=cos, sin=sin, n_local=n_local, scaling=head_dim**-0.5, far_origin=far_origin,
    )  # fmt: skip


def attend_received(attend, *args, **kwargs):
    """(out, received) of an attention, its received probabilities summed into zeros."""
    query = kwargs["query"] if "query" in kwargs else args[0]
    local_k = kwargs["local_k"] if "local_k" in kwargs else args[2]
    received = torch.zeros(query.shape[0], local_k.shape[1], dtype=torch.float32, device=query.device)
    return attend(*args, **kwargs, received=received), received


def _check_attention(case, dtype):
    out, received = attend_received(qk.attention, **case)
    exact = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    ref_out, ref_received = attend_received(attend_reference, **exact)
    assert out.dtype == dtype and out.shape == ref_out.shape and out.device.type == DEVICE.type
    assert received.dtype == torch.float32 and received.shape == ref_received.shape
    rtol = LOW_PRECISION.get(dtype, 1e-4)
    atol = rtol / 10 if dtype == torch.float32 else rtol
    torch.testing.assert_close(out.float(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(received, ref_received, rtol=rtol, atol=atol)


ATTENTION_DIMS = ("heads", "kv_heads", "head_dim", "n_q", "n_loc", "n_far", "n_local")
ATTENTION_SHAPES = [
    pytest.param(2, 2, 64, 17, 45, 30, 32, id="mha-odd"),
    pytest.param(4, 2, 32, 1, 24, 70, 24, id="gqa2-decode-d32-far-tail"),
    pytest.param(6, 2, 64, 9, 70, 21, 40, id="gqa3-tail"),
    pytest.param(8, 2, 128, 1, 33, 50, 24, id="gqa4-decode-d128"),
    pytest.param(7, 1, 64, 13, 13, 0, 16, id="gqa7-nofar-rows-cross-heads"),
    pytest.param(4, 1, 32, 70, 75, 12, 8, id="gqa4-d32-window-shorter-than-group"),
    pytest.param(2, 2, 32, 70, 75, 6, 39, id="d32-windows-end-on-tile-edges"),
    pytest.param(3, 3, 128, 5, 37, 66, 37, id="mha-d128-far-tail"),
]


FAR_POSITIONS = pytest.mark.parametrize("ordered", [False, True], ids=["shared", "ordered"])


@FAR_POSITIONS
@pytest.mark.parametrize(ATTENTION_DIMS, ATTENTION_SHAPES)
def test_attention_matches_reference_fp32(poison, heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, ordered):
    case = _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, torch.float32, ordered=ordered)
    _check_attention(case, torch.float32)


@FAR_POSITIONS
@pytest.mark.parametrize(ATTENTION_DIMS, [(8, 2, 64, 1, 70, 300, 64), (6, 2, 64, 9, 70, 21, 40)],
                         ids=["decode", "tail"])
def test_without_received_the_output_is_unchanged(poison, heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local,
                                                  ordered):
    """Answering from evidence skips the received scores: every implementation gives the same output without them,
    and adds them to what `received` holds; `out=` takes the output."""
    case = _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, torch.float32, ordered=ordered)
    for attend in (qk.attention, attend_reference, attend_tiled):
        out, received = attend_received(attend, **case)
        lean = attend(**case)
        torch.testing.assert_close(lean, out, rtol=0, atol=0)
        into = torch.full_like(out, math.nan)
        assert attend(**case, out=into, received=received) is into
        torch.testing.assert_close(into, out, rtol=0, atol=0)
        torch.testing.assert_close(received, 2 * attend_received(attend, **case)[1], rtol=1e-6, atol=1e-6)


@FAR_POSITIONS
@pytest.mark.parametrize("tiles", [1, 2, 3, 1000], ids=["split-every-tile", "split-2", "split-3", "one-program"])
@pytest.mark.parametrize(ATTENTION_DIMS, [(8, 2, 64, 1, 70, 300, 64), (4, 4, 32, 3, 40, 150, 38)],
                         ids=["gqa4-decode", "mha-few-rows"])
def test_split_key_tiles_match_reference(
    poison, monkeypatch, tiles, heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, ordered
):
    """Rows that fit one tile share their key tiles out among programs (local and far runs, some holding no key a
    row can see), merged after: the reference's result for every way of cutting them."""
    monkeypatch.setitem(sys.modules["qllm_kernels.attention"].SPLIT, "tiles", tiles)
    for dtype in (torch.float32, torch.bfloat16):
        case = _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, dtype, seed=4, ordered=ordered)
        _check_attention(case, dtype)


@FAR_POSITIONS
@pytest.mark.parametrize("rotate_ahead", [True, False], ids=["rotated-ahead", "rotated-in-kernel"])
def test_keys_rotated_ahead_or_in_the_kernel_match_reference(poison, monkeypatch, rotate_ahead, ordered):
    """A prefill group (rows over several row tiles) has its keys rotated once ahead of the two kernels, which read
    them, and its rotated queries, as they are; rotated in the kernels instead, the same result."""
    module = sys.modules["qllm_kernels.attention"]
    monkeypatch.setattr(module, "ROTATE_AHEAD", rotate_ahead)
    calls = []
    rotate = module._rotate_ahead
    monkeypatch.setattr(module, "_rotate_ahead", lambda *args: calls.append(1) or rotate(*args))
    for dtype in (torch.float32, torch.bfloat16):
        case = _attention_case(8, 2, 64, 100, 160, 90, 64, dtype, seed=7, ordered=ordered)
        _check_attention(case, dtype)
    assert len(calls) == (2 if rotate_ahead else 0)  # the kernel once in each dtype


def _in_buffer(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """`t` (kv_heads, n, head_dim) inside a NaN buffer, `before` slots ahead of it and `after` behind: values a
    kernel must never read."""
    buffer = torch.full((t.shape[0], before + t.shape[1] + after, t.shape[2]), math.nan, dtype=t.dtype,
                        device=t.device)
    buffer[:, before : before + t.shape[1]] = t
    return buffer


@FAR_POSITIONS
@pytest.mark.parametrize("tiles", [1, 4])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "n_far", "n_local", "offset", "spare"),
                         [(8, 2, 64, 70, 24, 5, 40), (4, 4, 32, 0, 16, 0, 9), (6, 2, 128, 33, 40, 17, 0)])
def test_decode_attention_reads_positions_from_the_device(
    poison, monkeypatch, tiles, heads, kv_heads, head_dim, n_far, n_local, offset, spare, ordered
):
    """`decode_attention` (positions in a device tensor, window and far keys inside larger buffers) = `attention`
    on the slices they name, for fp32 and bf16, however the far buffer's key tiles are shared out."""
    monkeypatch.setitem(sys.modules["qllm_kernels.attention"].SPLIT, "tiles", tiles)
    for dtype in (torch.float32, torch.bfloat16):
        case = _attention_case(heads, kv_heads, head_dim, 1, n_local, n_far, n_local, dtype, seed=5, ordered=ordered)
        case["cos"], case["sin"] = _rope_tables(2 * n_local + n_far + spare + 3, head_dim)
        expected = qk.attention(**case)
        far_origin = case["far_origin"] if ordered else 0
        step = torch.tensor([offset, n_far, case["q_start"], far_origin], device=DEVICE)
        window_k, window_v = (_in_buffer(case[name], offset, 7) for name in ("local_k", "local_v"))
        far_k, far_v = (_in_buffer(case[name], 0, spare) for name in ("far_k", "far_v"))
        far_pos = torch.cat([case["far_pos"], torch.zeros(spare, dtype=torch.int64, device=DEVICE)])
        out = qk.decode_attention(case["query"], window_k, window_v, far_k, far_v, far_pos, case["cos"], case["sin"],
                                  n_local, case["scaling"], step, ordered=ordered)
        rtol = LOW_PRECISION.get(dtype, 1e-5)
        torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=rtol / 10)


def test_decode_attention_refuses_a_step_that_does_not_fit():
    case = _attention_case(4, 2, 32, 1, 16, 10, 16, torch.float32, ordered=True)
    args = (case["query"], case["local_k"], case["local_v"], case["far_k"], case["far_v"], case["far_pos"],
            case["cos"], case["sin"], 16, 0.1)
    q_start = case["q_start"]
    for step, match in (([1, 10, q_start, 0], "does not fit"), ([0, 11, q_start, 0], "does not fit"),
                        ([0, 10, q_start, q_start + 1], "far_origin"), ([0, 10, q_start, q_start - 26], "far_origin"),
                        ([0, 10, q_start], "int64")):
        with pytest.raises(ValueError, match=match):
            qk.decode_attention(*args, torch.tensor(step, device=DEVICE), ordered=True)


@FAR_POSITIONS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(ATTENTION_DIMS, [(8, 2, 64, 19, 50, 40, 32), (4, 1, 128, 1, 20, 33, 16)])
def test_attention_matches_reference_low_precision(
    poison, dtype, heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, ordered
):
    case = _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, dtype, seed=1, ordered=ordered)
    _check_attention(case, dtype)


@FAR_POSITIONS
def test_attention_strided_views_and_int32_positions(poison, ordered):
    """Inputs as the runtime may hold them (a transposed query view, slices of larger K/V buffers), and
    bf16 cos/sin tables of arbitrary values (each row repeating its first half, as rotate-half tables do), which
    pin the exact rotation formula of the reference."""
    case = _attention_case(6, 2, 64, 11, 40, 27, 30, torch.float32, seed=2, ordered=ordered)
    gen = torch.Generator().manual_seed(3)
    n_pos, head_dim = case["cos"].shape
    case["cos"], case["sin"] = (
        torch.rand(n_pos, head_dim // 2, generator=gen).repeat(1, 2).to(DEVICE, torch.bfloat16) for _ in "cs")
    case["query"] = case["query"].transpose(0, 1).contiguous().transpose(0, 1)
    for name in ("local_k", "local_v", "far_k", "far_v"):
        t = case[name]
        buffer = torch.full((t.shape[0], t.shape[1] + 9, t.shape[2]), math.inf, device=DEVICE)
        buffer[:, 3 : 3 + t.shape[1]] = t
        case[name] = buffer[:, 3 : 3 + t.shape[1]]
    case["far_pos"] = case["far_pos"].int()
    _check_attention(case, torch.float32)


def _rope_attention(query, q_pos, k, v, k_pos, visible, cos, sin):
    """Plain softmax attention with RoPE at absolute positions, GQA by repeating K/V.

    query: (heads, n_q, head_dim) at q_pos (n_q,); k, v: (kv_heads, n_k, head_dim) at k_pos (n_k,);
    visible: (n_q, n_k) bool. Returns out: (n_q, heads, head_dim) and probs: (heads, n_q, n_k).
    """
    group = query.shape[0] // k.shape[0]
    q = apply_rope(query, cos[q_pos], sin[q_pos])
    k = apply_rope(k, cos[k_pos], sin[k_pos]).repeat_interleave(group, 0)
    logits = (q @ k.transpose(1, 2)) * query.shape[-1] ** -0.5
    probs = logits.masked_fill(~visible, -math.inf).softmax(-1)
    return (probs @ v.repeat_interleave(group, 0)).transpose(0, 1), probs


ATTEND_FNS = pytest.mark.parametrize("attend", [attend_reference, attend_tiled, qk.attention],
                                     ids=["reference", "cpu-tiled", "kernel"])


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


@ATTEND_FNS
def test_ordered_far_keys_all_selected_is_causal_attention(poison, attend):
    """Far set = every key before far_end in order, far_origin = 0: the memory attends like full attention."""
    heads, kv_heads, head_dim, n_keys, n_q, n_local = 4, 2, 32, 48, 20, 16
    q_start, local_start, far_end = n_keys - n_q, n_keys - n_q - n_local + 1, n_keys - n_local
    gen = torch.Generator().manual_seed(4)
    query, keys, values = _randn(gen, heads, n_q, head_dim), *(_randn(gen, kv_heads, n_keys, head_dim) for _ in "kv")
    cos, sin = _rope_tables(n_keys, head_dim)
    out, received = attend_received(
        attend, query, q_start, keys[:, local_start:], values[:, local_start:], local_start,
        keys[:, :far_end], values[:, :far_end], torch.arange(far_end, device=DEVICE),
        cos, sin, n_local, head_dim**-0.5, far_origin=0,
    )  # fmt: skip

    q_pos, k_pos = torch.arange(q_start, n_keys, device=DEVICE), torch.arange(n_keys, device=DEVICE)
    dist = q_pos[:, None] - k_pos[None, :]
    full_out, probs = _rope_attention(query, q_pos, keys, values, k_pos, dist >= 0, cos, sin)
    full_received = (probs * (dist < n_local)).sum(1)[:, local_start:]
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received, full_received, rtol=1e-5, atol=1e-5)


@ATTEND_FNS
@pytest.mark.parametrize(
    ("n_q", "local_start", "n_local"), [(1, 64, 24), (16, 96, 40)], ids=["decode", "chunk-after-a-gap"]
)
@pytest.mark.parametrize("runs", [((0, 4), (40, 48), (60, 64)), ((0, 4), (60, 64), (40, 48))],
                         ids=["document-order", "evidence-by-relevance"])
def test_ordered_far_keys_packed_is_compacted_attention(poison, attend, n_q, local_start, n_local, runs):
    """Far keys at 0..3, 40..47, 60..63 packed just before the local buffer (far_origin = local_start - n_far),
    every query seeing all of them: attention over [far keys | local keys] at consecutive positions, the far
    keys in the order passed (document order, or runs laid out out of it as `evidence_order="relevance"` does)."""
    heads, kv_heads, head_dim, n_loc = 2, 1, 64, n_local
    far_pos = torch.cat([torch.arange(*run) for run in runs]).to(DEVICE)
    n_far, q_start = len(far_pos), local_start + n_loc - n_q
    assert q_start - 63 >= n_local and local_start + n_loc - 1 - local_start < n_local  # sees every kept key
    gen = torch.Generator().manual_seed(5)
    query = _randn(gen, heads, n_q, head_dim)
    keys, values = (_randn(gen, kv_heads, n_far + n_loc, head_dim) for _ in "kv")  # [far | local]
    cos, sin = _rope_tables(n_far + n_loc, head_dim)
    out = attend(
        query, q_start, keys[:, n_far:], values[:, n_far:], local_start, keys[:, :n_far], values[:, :n_far],
        far_pos, cos, sin, n_local, head_dim**-0.5, far_origin=local_start - n_far,
    )  # fmt: skip

    k_pos = torch.arange(n_far + n_loc, device=DEVICE)
    q_pos = k_pos[-n_q:]
    compact_out, _ = _rope_attention(query, q_pos, keys, values, k_pos, q_pos[:, None] >= k_pos[None, :], cos, sin)
    torch.testing.assert_close(out, compact_out, rtol=1e-5, atol=1e-5)


@ATTEND_FNS
@pytest.mark.parametrize("heads", [2, 8], ids=["one-row-tile", "rows-over-tiles"])  # the kernel: keys rotated ahead
def test_ordered_far_origin_after_early_queries(poison, attend, heads):
    """far_origin > q_start while the early queries see far keys (a chunk longer than the window): the far
    logit is still <rope(q, q), rope(k_j, far_origin + j)>, computed here with absolute positions."""
    kv_heads, head_dim, n_q, n_local, local_start, far_origin = 2, 32, 24, 8, 33, 48
    far_pos = torch.cat([torch.arange(0, 4), torch.arange(30, 36), torch.arange(50, 56)]).to(DEVICE)
    q_start, n_far, n_loc = 40, len(far_pos), 40 + n_q - local_start
    gen = torch.Generator().manual_seed(6)
    query = _randn(gen, heads, n_q, head_dim)
    keys, values = (_randn(gen, kv_heads, n_far + n_loc, head_dim) for _ in "kv")  # [far | local]
    cos, sin = _rope_tables(far_origin + n_far, head_dim)
    out = attend(
        query, q_start, keys[:, n_far:], values[:, n_far:], local_start, keys[:, :n_far], values[:, :n_far],
        far_pos, cos, sin, n_local, head_dim**-0.5, far_origin=far_origin,
    )  # fmt: skip

    q_pos = torch.arange(q_start, q_start + n_q, device=DEVICE)
    local_pos = torch.arange(local_start, local_start + n_loc, device=DEVICE)
    k_pos = torch.cat([far_origin + torch.arange(n_far, device=DEVICE), local_pos])
    real = q_pos[:, None] - torch.cat([far_pos, local_pos])[None, :]
    visible = torch.cat([real[:, :n_far] >= n_local, (real[:, n_far:] >= 0) & (real[:, n_far:] < n_local)], dim=1)
    assert visible[0, :n_far].any()  # the first query sees far keys placed after it
    ref_out, _ = _rope_attention(query, q_pos, keys, values, k_pos, visible, cos, sin)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def _bad(case, **changes):
    return {**case, **changes}


def test_attention_rejects_bad_inputs():
    case = _attention_case(4, 2, 64, 3, 10, 5, 8, torch.float32)
    q, lk = case["query"], case["local_k"]
    head_dim_inputs = ("query", "local_k", "local_v", "far_k", "far_v", "cos", "sin")
    bad_cases = {
        "must have the query dtype": _bad(case, local_k=lk.half()),
        "multiple of kv_heads": _bad(case, query=torch.randn(3, 3, 64, device=DEVICE)),
        "local keys must end with the queries": _bad(case, q_start=case["q_start"] + 1),
        "head_dim must be one of": _bad(case, **{name: case[name][..., :48] for name in head_dim_inputs}),
        "contiguous last dim": _bad(case, query=q.transpose(1, 2).contiguous().transpose(1, 2)),
        "RoPE tables longer": _bad(case, cos=case["cos"][:8], sin=case["sin"][:8]),
        "far_pos must have shape": _bad(case, far_pos=case["far_pos"][:-1]),
        "far_pos must be int64": _bad(case, far_pos=case["far_pos"].float()),
        "repeat their first half": _bad(case, sin=case["sin"] * torch.linspace(1, 2, 64, device=DEVICE)),
        "received must be a torch.float32 tensor": _bad(case, received=torch.zeros(q.shape[0], lk.shape[1] + 1,
                                                                                    device=DEVICE)),
        "out must be a torch.float32 tensor": _bad(case, out=torch.zeros(q.shape[1], q.shape[0], 64, device=DEVICE,
                                                                         dtype=torch.float16)),
        "received needs a contiguous last dim": _bad(case, received=torch.zeros(lk.shape[1], q.shape[0],
                                                                                device=DEVICE).t()),
    }
    for message, bad in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            qk.attention(**bad)


def test_attention_rejects_bad_far_origin():
    case = _attention_case(4, 2, 64, 3, 10, 5, 8, torch.float32, ordered=True)
    for far_origin in (True, 3.0, torch.tensor(3)):
        with pytest.raises(TypeError, match="far_origin must be None or an int"):
            qk.attention(**_bad(case, far_origin=far_origin))
    # needed rows: queries at q - far_origin + s, far keys at j + s, s = max(far_origin - q_start, 0)
    q_start = case["q_start"]
    for far_origin, need in ((0, q_start + 2), (q_start + 20, 20 + 4)):
        cos, sin = _rope_tables(need + 1, 64)
        qk.attention(**_bad(case, cos=cos, sin=sin, far_origin=far_origin))
        with pytest.raises(ValueError, match=f"RoPE tables longer than {need} positions"):
            qk.attention(**_bad(case, cos=cos[:need], sin=sin[:need], far_origin=far_origin))


BLOCK_SHAPES = [
    # n_groups, heads, head_dim, n_blocks, topk
    pytest.param(1, 4, 64, 1, 4, id="decode-one-block"),
    pytest.param(3, 2, 128, 37, 8, id="tail"),
    pytest.param(1, 6, 128, 301, 8, id="lookup-one-group-features-not-tile-multiple"),
    pytest.param(20, 3, 64, 70, 5, id="many-groups"),
    pytest.param(5, 1, 32, 130, 130, id="topk-all"),
]


@pytest.mark.parametrize(("n_groups", "heads", "head_dim", "n_blocks", "topk"), BLOCK_SHAPES)
@pytest.mark.parametrize(
    ("q_dtype", "k_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=["fp32", "bf16", "fp16-fp32"],
)
@pytest.mark.parametrize("beta", [None, 0.0, 4.0], ids=["no-question", "beta0", "beta4"])
def test_block_score_matches_reference(
    poison, n_groups, heads, head_dim, n_blocks, topk, q_dtype, k_dtype, beta
):
    gen = torch.Generator().manual_seed(n_blocks)
    group_queries = torch.randn(n_groups, heads, head_dim, generator=gen).to(DEVICE, q_dtype)
    repr_keys = torch.randn(n_blocks, heads, head_dim, generator=gen).to(DEVICE, k_dtype)
    question = None if beta is None else torch.randn(n_blocks, generator=gen).to(DEVICE)
    scores, indices = qk.block_score(group_queries, repr_keys, question, beta or 0.0, topk)

    ref = block_scores_reference(group_queries, repr_keys, question, beta or 0.0)
    assert scores.dtype == torch.float32 and scores.shape == (n_groups, n_blocks) and scores.device.type == DEVICE.type
    assert indices.dtype == torch.int64 and indices.shape == (n_groups, min(topk, n_blocks))
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
    # tie-robust top-k check: the chosen blocks carry the reference's best scores, best first
    ref_top = ref.gather(1, select_blocks(ref, topk))
    torch.testing.assert_close(ref.gather(1, indices), ref_top, rtol=1e-4, atol=1e-4)


def test_block_score_empty_and_bad_inputs():
    gq, rk = torch.randn(2, 4, 32, device=DEVICE), torch.randn(9, 4, 32, device=DEVICE)
    scores, indices = qk.block_score(gq, rk[:0], None, 0.0, 3)
    assert scores.shape == (2, 0) and indices.shape == (2, 0)
    scores, indices = qk.block_score(gq, rk, None, 0.0, None)  # the scores alone
    assert indices is None
    torch.testing.assert_close(scores, block_scores_reference(gq, rk, None, 0.0), rtol=1e-4, atol=1e-4)
    unchecked, _ = qk.block_score(gq, rk, None, 0.0, None, check=False)  # the engine's call: the same scores
    torch.testing.assert_close(unchecked, scores, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        qk.block_score(gq, rk[:, :3], None, 0.0, 2)
    with pytest.raises(ValueError, match="question_scores must be"):
        qk.block_score(gq, rk, torch.zeros(8, device=DEVICE), 1.0, 2)
    with pytest.raises(ValueError, match="topk must be"):
        qk.block_score(gq, rk, None, 0.0, 0)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qk.block_score(gq.double(), rk, None, 0.0, 2)


TOP_SHAPES = [
    # n_groups, n_blocks, topk
    pytest.param(1, 40, 8, id="one-group"),
    pytest.param(8, 70, 5, id="per-kv-head-rows"),  # more rows than the row scorer takes: the tiled scorer
    pytest.param(2, 33, 33, id="every-block"),
    pytest.param(2, 2100, 33, id="three-chunks-merged"),  # beyond TOP_CHUNK blocks; k beyond a power of two
]


@pytest.mark.parametrize(("n_groups", "n_blocks", "topk"), TOP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("terms", "standardized"), [(False, False), (True, False), (True, True)],
                         ids=["no-terms", "raw", "standardized"])
def test_top_blocks_matches_reference(n_groups, n_blocks, topk, dtype, terms, standardized):
    """The fused lookup picks the reference's top-k (tie-robust: the picked blocks carry its best scores), each row
    ascending without repeats; block terms on a larger scale than the query term, so standardising changes picks."""
    gen = torch.Generator().manual_seed(n_blocks + topk)
    group_queries = torch.randn(n_groups, 4, 32, generator=gen).to(DEVICE, dtype)
    repr_keys = torch.randn(n_blocks, 4, 32, generator=gen).to(DEVICE, dtype)
    block_terms = 300 * torch.randn(n_blocks, generator=gen).to(DEVICE) if terms else None
    picked = qk.top_blocks(group_queries, repr_keys, block_terms, 2.0, topk, standardized=standardized)

    ref = block_scores_reference(group_queries, repr_keys, block_terms, 2.0, standardized)
    assert picked.dtype == torch.int64 and picked.shape == (n_groups, min(topk, n_blocks))
    assert bool((picked[:, 1:] > picked[:, :-1]).all())  # ascending, no block twice
    best = ref.gather(1, select_blocks(ref, topk)).sort(dim=-1, descending=True).values
    torch.testing.assert_close(ref.gather(1, picked).sort(dim=-1, descending=True).values, best, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n_groups", "n_blocks", "topk"), [(1, 780, 8), (8, 2100, 33)], ids=["one", "kv-heads-merged"])
@pytest.mark.parametrize("standardized", [False, True], ids=["raw", "standardized"])
def test_top_blocks_term_row_is_the_block_terms(n_groups, n_blocks, topk, standardized):
    """A term query as the last row of the queries: its scores (made in the same launch) are the block terms, so the
    picks are those with block_terms = <term query, r_B> summed over heads."""
    gen = torch.Generator().manual_seed(n_groups)
    group_queries = torch.randn(n_groups, 4, 32, generator=gen).to(DEVICE)
    term_query = 20 * torch.randn(1, 4, 32, generator=gen).to(DEVICE)
    repr_keys = torch.randn(n_blocks, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
    picked = qk.top_blocks(torch.cat([group_queries, term_query]), repr_keys, None, 2.0, topk,
                           standardized=standardized, term_row=True)
    terms = block_scores_reference(term_query, repr_keys, None, 0.0)[0]
    ref = block_scores_reference(group_queries, repr_keys, terms, 2.0, standardized)
    assert picked.shape == (n_groups, topk)
    best = ref.gather(1, select_blocks(ref, topk)).sort(dim=-1, descending=True).values
    torch.testing.assert_close(ref.gather(1, picked).sort(dim=-1, descending=True).values, best, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="term_row"):
        qk.top_blocks(term_query, repr_keys, None, 2.0, topk, term_row=True)


def test_top_blocks_merges_many_chunks_with_torch(monkeypatch):
    """Beyond TOP_MERGE chunk picks (lakhs of blocks) the merge is torch.topk over the same keys: the same blocks."""
    module = importlib.import_module("qllm_kernels.block_score")  # the package's `block_score` is the function
    gen = torch.Generator().manual_seed(5)
    group_queries = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    repr_keys = torch.randn(2100, 4, 32, generator=gen).to(DEVICE)
    block_terms = torch.randn(2100, generator=gen).to(DEVICE)
    merged = qk.top_blocks(group_queries, repr_keys, block_terms, 1.0, 20, standardized=True)
    monkeypatch.setattr(module, "TOP_MERGE", 64)
    assert torch.equal(qk.top_blocks(group_queries, repr_keys, block_terms, 1.0, 20, standardized=True), merged)


def test_top_blocks_with_a_scratch_is_the_same_as_without(poison):
    """Lookups reusing one scratch (their scores and chunk picks kept from call to call) while the blocks grow, past
    the scratch's room and past a chunk, pick what fresh temporaries pick; a result outlives the next call."""
    gen = torch.Generator().manual_seed(11)
    scratch = qk.Scratch()
    repr_keys = torch.randn(1100, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
    kept = []
    for n_blocks in (5, 250, 256, 257, 1100, 300):
        group_queries = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
        args = (group_queries, repr_keys[:n_blocks], None, 2.0, 8)
        picked = qk.top_blocks(*args, standardized=True, term_row=True, scratch=scratch)
        assert torch.equal(picked, qk.top_blocks(*args, standardized=True, term_row=True))
        kept.append((picked, picked.clone()))
    assert all(torch.equal(a, b) for a, b in kept)


def _top_blocks_in_two_launches(rows, repr_keys, block_terms, beta, topk, standardized=False, term_row=False):
    """`top_blocks` of up to ROW_GROUPS rows and one chunk of blocks as two launches: the row scorer
    (`block_score`), then the ranking kernel over its scores."""
    module = importlib.import_module("qllm_kernels.block_score")  # the package's `block_score` is the function
    n_groups, n_blocks = rows.shape[0] - term_row, repr_keys.shape[0]
    assert rows.shape[0] <= module.ROW_GROUPS and n_blocks <= module.TOP_CHUNK
    k = min(topk, n_blocks)
    scores, _ = qk.block_score(rows, repr_keys, None, 0.0, None)
    terms = scores[n_groups] if term_row else block_terms
    out = torch.empty(n_groups, k, dtype=torch.int64, device=rows.device)
    module._top_chunk_kernel[(n_groups, 1)](
        scores, scores if terms is None else terms, out, out, scores.stride(0), out.stride(0), out.stride(0),
        n_blocks, k, float(beta),
        HAS_TERMS=terms is not None, STANDARDIZED=standardized, FINAL=True, CHUNK=module.TOP_CHUNK,
        K_PAD=max(16, 1 << (k - 1).bit_length()),
    )  # fmt: skip
    return out


def _counter(scratch: qk.Scratch, device: torch.device) -> int:
    """The one-launch lookup's counter that `scratch` keeps for `device` (a tensor's: with its index)."""
    return scratch.empty("counter", (1,), torch.int32, device).item()


@pytest.mark.parametrize(("n_rows", "terms", "standardized", "block_counts"), [
    pytest.param(1, None, False, (2, 300, 1024, 57), id="one-group"),
    pytest.param(2, "row", False, (300, 2, 57), id="group-term-row-raw"),
    pytest.param(2, "row", True, (2, 1024, 300, 57), id="group-term-row-standardized"),
    pytest.param(3, "given", False, (57, 300, 2), id="three-groups-terms-raw"),
    pytest.param(4, "row", True, (300, 2, 57), id="three-groups-term-row-standardized"),
    pytest.param(4, "given", True, (2, 300, 57), id="four-groups-terms-standardized"),
])  # fmt: skip
def test_top_blocks_in_one_launch_is_the_two_launch_path(poison, n_rows, terms, standardized, block_counts):
    """Up to ROW_GROUPS rows and one chunk of blocks: one launch, whose last program ranks what all scored, picks what
    the scorer and the ranking launched apart pick, bit for bit, call after call on one scratch as the block count
    changes (its counter back at zero after each)."""
    gen = torch.Generator().manual_seed(n_rows)
    scratch = qk.Scratch()
    for n_blocks in block_counts:
        rows = torch.randn(n_rows, 4, 32, generator=gen).to(DEVICE)
        repr_keys = torch.randn(n_blocks, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
        block_terms = 30 * torch.randn(n_blocks, generator=gen).to(DEVICE) if terms == "given" else None
        args, kwargs = (rows, repr_keys, block_terms, 2.0, 8), dict(standardized=standardized, term_row=terms == "row")
        picked = qk.top_blocks(*args, **kwargs, scratch=scratch)
        assert torch.equal(picked, _top_blocks_in_two_launches(*args, **kwargs))
        assert _counter(scratch, picked.device) == 0


def test_top_blocks_of_few_rows_and_one_chunk_is_one_launch(monkeypatch):
    """A lookup of up to ROW_GROUPS rows over one chunk of blocks is one launch (which leaves its counter at zero);
    more rows launch the tiled scorer and the ranking, more blocks the row scorer, the ranking and the merge."""
    from qllm_kernels import _common

    module = importlib.import_module("qllm_kernels.block_score")
    launches = []
    launch = _common.Launcher.__getitem__
    monkeypatch.setattr(_common.Launcher, "__getitem__", lambda self, grid: launches.append(self) or launch(self, grid))
    gen = torch.Generator().manual_seed(2)
    repr_keys = torch.randn(module.TOP_CHUNK + 1, 4, 32, generator=gen).to(DEVICE)
    scratch = qk.Scratch()
    for n_rows, n_blocks, kernels in (
        (2, module.TOP_CHUNK, [module._score_and_rank_kernel]),
        (4, 57, [module._score_and_rank_kernel]),
        (5, 57, [module._block_score_kernel, module._top_chunk_kernel]),
        (2, module.TOP_CHUNK + 1, [module._block_score_rows_kernel, module._top_chunk_kernel,
                                   module._top_merge_kernel]),
    ):
        launches.clear()
        rows = torch.randn(n_rows, 4, 32, generator=gen).to(DEVICE)
        qk.top_blocks(rows, repr_keys[:n_blocks], None, 2.0, 8, standardized=True, term_row=True, scratch=scratch)
        assert launches == kernels
        assert _counter(scratch, rows.device) == 0


def test_attention_with_a_scratch_is_the_same_as_without(poison):
    """Attention calls reusing one scratch for their temporaries (rotated keys and queries, log-sum-exp) give what
    calls with fresh ones give, call after call, as the shapes change and come back."""
    scratch = qk.Scratch()
    for seed, shape in enumerate([(8, 2, 64, 40, 70, 30, 32), (8, 2, 64, 40, 70, 30, 32), (8, 2, 64, 17, 45, 21, 16),
                                  (8, 2, 64, 40, 70, 30, 32)]):
        case = _attention_case(*shape, torch.float32, seed=seed, ordered=True)
        out, received = attend_received(qk.attention, **case, scratch=scratch)
        want, want_received = attend_received(qk.attention, **case)
        assert torch.equal(out, want) and torch.equal(received, want_received)


def test_top_blocks_ties_and_bad_inputs():
    """Equal scores go to the lower index; an empty memory picks nothing; bad input is refused."""
    group_queries = torch.ones(1, 2, 16, device=DEVICE)
    repr_keys = torch.zeros(50, 2, 16, device=DEVICE)
    repr_keys[[3, 9, 20, 41]] = 1.0  # four equal best blocks, take three
    assert qk.top_blocks(group_queries, repr_keys, None, 0.0, 3).tolist() == [[3, 9, 20]]
    assert qk.top_blocks(group_queries, repr_keys[:0], None, 0.0, 3).shape == (1, 0)
    with pytest.raises(ValueError, match="topk must be"):
        qk.top_blocks(group_queries, repr_keys, None, 0.0, 0)
    with pytest.raises(ValueError, match="topk must be"):
        qk.top_blocks(group_queries, repr_keys, None, 0.0, None)
    with pytest.raises(ValueError, match="up to 256"):
        qk.top_blocks(group_queries, repr_keys, None, 0.0, qk.TOP_MAX_K + 1)
    with pytest.raises(ValueError, match="does not match"):
        qk.top_blocks(group_queries, repr_keys[:, :1], None, 0.0, 2)


@pytest.mark.parametrize(("mode", "scale"), [("qllm", "standardized"), ("qllm", "raw"), ("infllm", "standardized")])
def test_policy_pick_through_the_kernels_is_its_selection_in_document_order(monkeypatch, mode, scale):
    """A policy's `pick` on the kernels (one fused lookup) = its PyTorch `select`, ascending; `follow_blocks` and
    the random control take the general path."""
    from qllm_runtime.config import QLLMConfig
    from qllm_runtime.policies import POLICIES, base

    monkeypatch.setattr(base, "kernels", lambda device: qk)  # the CUDA path, here under the interpreter
    gen = torch.Generator().manual_seed(1)
    queries, repr_keys = torch.randn(1, 4, 16, generator=gen), torch.randn(90, 4, 16, generator=gen)
    question = torch.randn(4, 16, generator=gen)
    config = QLLMConfig(mode=mode, question_scale=scale, question_weight=1.5)
    fused, reference = POLICIES[mode](config, DEVICE), POLICIES[mode](config, DEVICE)
    reference._kernel = reference._top = None
    terms = fused.block_terms(question.to(DEVICE), repr_keys.to(DEVICE))
    got = fused.pick(queries.to(DEVICE), repr_keys.to(DEVICE), terms, 7)
    want = reference.select(queries, repr_keys, None if terms is None else terms.cpu(), 7).sort(dim=-1).values
    assert torch.equal(got.cpu(), want)
    term = fused.term_query(question)  # the question as a query row: scored with the group, the same picks
    if term is not None:
        rows = torch.cat([queries, term[None]])
        assert torch.equal(fused.pick(rows.to(DEVICE), repr_keys.to(DEVICE), None, 7, term_row=True).cpu(), want)
        assert torch.equal(reference.pick(rows, repr_keys, None, 7, term_row=True), want)
    following = POLICIES[mode](QLLMConfig(mode=mode, follow_blocks=2), DEVICE)
    following._top = lambda *args, **kwargs: pytest.fail("follow_blocks has no fused lookup")
    following.pick(queries.to(DEVICE), repr_keys.to(DEVICE), None, 7)
    fused._top = lambda *args, **kwargs: pytest.fail(f"top-k beyond {qk.TOP_MAX_K} has no fused lookup")
    fused.pick(queries.to(DEVICE), torch.randn(400, 4, 16).to(DEVICE), None, qk.TOP_MAX_K + 1)
    random_policy = POLICIES["random"](QLLMConfig(mode="random"), DEVICE)
    assert random_policy.weighting() is None and random_policy.pick(queries.to(DEVICE), repr_keys.to(DEVICE), None,
                                                                    7).shape == (1, 7)


@pytest.mark.parametrize(("lookup_heads", "kv_dtype", "question"), [
    ("all", "auto", False), ("kv_head", "auto", False), ("all", "float8_e4m3", True)])
def test_engine_through_every_kernel_equals_the_reference(tokenizer, monkeypatch, lookup_heads, kv_dtype, question):
    """A reading (and its answer steps, from evidence with a question) whose every op runs the kernels as on CUDA
    (lookups, attention, gather, far set, store, representative keys; interpreted here) gives the logits of the PyTorch
    path: the engine hands each kernel the layouts it needs (a transposed view once reached the lookup on CUDA)."""
    if DEVICE.type == "cuda":
        pytest.skip("runs the kernels interpreted beside the CPU engine; on CUDA test_gpu's kernel-path tests cover it")
    from qllm_runtime import QLLMConfig, QLLMEngine, engine, ops
    from qllm_runtime.policies import base

    from .conftest import random_ids, tiny_model

    model = tiny_model("llama", len(tokenizer), hidden_size=128)  # head_dim 32: the attention kernel's smallest
    ids = random_ids(330, len(tokenizer))
    config = QLLMConfig(n_init=8, n_local=64, block_size=16, topk=3, lookup_chunk=32, prefill_chunk=128,
                        lookup_heads=lookup_heads, kv_dtype=kv_dtype, evidence_tokens=48 if question else None,
                        full_within_window=False)

    def run() -> list[torch.Tensor]:
        qllm = QLLMEngine(model, tokenizer, config)
        session = qllm._new_session(len(ids) + 4)
        if question:
            session.set_question(qllm._question("Which number comes after the word apple?"))
        logits = [session.feed(ids[:300])]
        if question:
            session.choose_evidence(qllm._evidence_blocks())
        logits += [session.feed(ids[300:326])] + [session.feed([t]) for t in ids[326:]]
        return [out.float() for out in logits]

    reference = run()
    for module in (ops, base, engine):
        monkeypatch.setattr(module, "kernels", lambda device: qk)
    fused = run()
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _stored_blocks(n: int, shape: tuple[int, int, int], dtype: torch.dtype, fp8: bool, seed: int) -> Planes:
    """n random blocks as a BlockStore stores them: in `dtype`, or float8 bits with their scales."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(n, *shape, generator=gen) * torch.logspace(-2, 2, n)[:, None, None, None] for _ in "kv")
    if not fp8:
        return Planes(k.to(dtype), v.to(dtype))
    (kb, ks), (vb, vs) = quantize(k), quantize(v)
    return Planes(kb, vb, ks, vs)


def test_e4m3_decoding_covers_every_code(poison):
    """Every non-NaN float8 code decodes to torch's value (one block holding all 254, scale 1)."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    bits = torch.cat([codes, codes[:2]]).view(1, 1, 16, 16).to(DEVICE)
    ones = torch.ones(1, 1, device=DEVICE)
    k, _ = qk.gather_blocks((bits, bits, ones, ones), (bits[:0], bits[:0], ones[:0], ones[:0]),
                            torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), 1, torch.float32)
    assert torch.equal(k.flatten(), bits.flatten().view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("fp8", [False, True], ids=["stored", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("device_limit", "rows"), [(100, 1), (5, 1), (5, 3), (0, 3)], ids=["pooled", "split", "split-per-head", "host"]
)
def test_gather_matches_reference(poison, fp8, dtype, device_limit, rows):
    shape = (3, 16, 32)  # kv_heads, block_size, head_dim
    blocks = _stored_blocks(9, shape, dtype, fp8, seed=rows + device_limit)
    pool = blocks.map(lambda t: t[: min(9, device_limit)].to(DEVICE))
    host = blocks.map(lambda t: t[min(9, device_limit) :])  # the CPU (pinned on CUDA: read in place)
    if DEVICE.type == "cuda":
        host = host.map(lambda t: t.pin_memory())
    indices = torch.tensor([[8, 0, 4, 4, 6], [1, 2, 3, 5, 7], [6, 6, 0, 8, 2]][:rows], device=DEVICE)
    k, v = qk.gather_blocks(pool.held(), host.held(), indices, device_limit, dtype)
    want_k, want_v = gather_reference(pool, host, indices, device_limit, dtype)
    assert k.shape == (3, 5 * 16, 32) and k.dtype == dtype and k.device.type == DEVICE.type
    if DEVICE.type == "cpu" and fp8 and dtype == torch.bfloat16:  # the interpreter truncates float32 to bfloat16
        torch.testing.assert_close(k, want_k, rtol=2**-7, atol=0)
        torch.testing.assert_close(v, want_v, rtol=2**-7, atol=0)
    else:  # the same values: a copy, or float32 products rounded to the nearest
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("device_limit", [9, 4], ids=["pooled", "offloaded"])
@pytest.mark.parametrize("rows", [1, 3], ids=["shared-picks", "per-kv-head"])
@pytest.mark.parametrize("m, n_rem", [(5, 0), (2, 21), (0, 37)], ids=["blocks", "both", "remainder"])
def test_far_set_matches_reference(poison, fp8, device_limit, rows, m, n_rem):
    """The blocks and the remainder written after the init tokens, with their positions, as the reference writes them;
    nothing outside the far set's new part is touched."""
    from qllm_runtime.blocks import gather_far_set_reference

    shape, dtype = (3, 16, 32), torch.bfloat16  # kv_heads, block_size, head_dim
    blocks = _stored_blocks(9, shape, dtype, fp8, seed=rows + device_limit + m)
    pool = blocks.map(lambda t: t[:device_limit].to(DEVICE))
    host = blocks.map(lambda t: t[device_limit:])
    if DEVICE.type == "cuda":
        host = host.map(lambda t: t.pin_memory())
    indices = torch.tensor([[8, 0, 4, 4, 6], [1, 2, 3, 5, 7], [6, 6, 0, 8, 2]][:rows], device=DEVICE)[:, :m]
    tail = torch.randn(3, 60, 32, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    rem = slice(7, 7 + n_rem)
    n = m * 16 + n_rem
    outputs = []
    for fn in (qk.gather_far_set, gather_far_set_reference):
        k, v = (torch.full((3, 200, 32), math.nan, dtype=dtype, device=DEVICE) for _ in "kv")
        pos = torch.full((200,), -1, dtype=torch.int64, device=DEVICE)
        new = slice(11, 11 + n)
        planes = (pool.held(), host.held()) if fn is qk.gather_far_set else (pool, host)
        fn(*planes, indices, device_limit, k[:, new], v[:, new], pos[new], tail[:, rem], tail[:, rem], 128, 500)
        outputs.append((k, v, pos))
    (k, v, pos), (want_k, want_v, want_pos) = outputs
    assert torch.equal(pos, want_pos) and pos[11 : 11 + n].min() >= 128 and (pos[:11] == -1).all()
    assert k[:, :11].isnan().all() and k[:, 11 + n :].isnan().all()
    if DEVICE.type == "cpu" and fp8:  # the interpreter truncates float32 to bfloat16
        torch.testing.assert_close(k, want_k, rtol=2**-7, atol=0, equal_nan=True)
        torch.testing.assert_close(v, want_v, rtol=2**-7, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(k, want_k, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v, want_v, rtol=0, atol=0, equal_nan=True)


def test_far_set_bad_inputs():
    blocks = _stored_blocks(4, (2, 8, 16), torch.float32, False, seed=0)
    pool, host = blocks.map(lambda t: t.to(DEVICE)).held(), blocks.map(lambda t: t[:0].to(DEVICE)).held()
    one = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    k, v = torch.zeros(2, 11, 16, device=DEVICE), torch.zeros(2, 11, 16, device=DEVICE)
    pos, rem = torch.zeros(11, dtype=torch.int64, device=DEVICE), torch.zeros(2, 3, 16, device=DEVICE)
    qk.gather_far_set(pool, host, one, 4, k, v, pos, rem, rem, 0, 0)  # 8 block tokens + 3 remainder tokens
    with pytest.raises(ValueError, match="out_k must be"):
        qk.gather_far_set(pool, host, one, 4, k[:, :10], v, pos, rem, rem, 0, 0)
    with pytest.raises(ValueError, match="rem_v must be"):
        qk.gather_far_set(pool, host, one, 4, k, v, pos, rem, rem.transpose(1, 2).contiguous().transpose(1, 2), 0, 0)
    with pytest.raises(ValueError, match="out_pos must be"):
        qk.gather_far_set(pool, host, one, 4, k, v, pos.int(), rem, rem, 0, 0)


def test_gather_empty_and_bad_inputs():
    blocks = _stored_blocks(4, (2, 8, 16), torch.float32, False, seed=0)
    pool, host = blocks.map(lambda t: t.to(DEVICE)).held(), blocks.map(lambda t: t[:0].to(DEVICE)).held()
    none = torch.zeros(1, 0, dtype=torch.int64, device=DEVICE)
    assert qk.gather_blocks(pool, host, none, 4, torch.float32)[0].shape == (2, 0, 16)
    one = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="both be"):
        qk.gather_blocks(pool, (*host, host[0][:, 0], host[0][:, 0]), one, 4, torch.float32)
    with pytest.raises(ValueError, match="indices must be"):
        qk.gather_blocks(pool, host, torch.zeros(3, 1, dtype=torch.int64, device=DEVICE), 4, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        qk.gather_blocks((pool[0].transpose(2, 3), pool[1].transpose(2, 3)), host, one, 4, torch.float32)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qk.gather_blocks(pool, host, one, 4, torch.float64)
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="pinned CPU memory"):
            qk.gather_blocks(pool, blocks.map(lambda t: t[:1]).held(), one, 4, torch.float32)


@pytest.mark.gpu  # skipped without CUDA by conftest
def test_fast_launches_run_the_kernels_the_jit_would(monkeypatch):
    """`Launcher` reuses a compiled kernel only within its specialization: indices 8 bytes off the 16-byte alignment
    launch another kernel than aligned ones, and every launch gives what a launch through the JIT gives."""
    from qllm_kernels import _common, gather

    blocks = _stored_blocks(9, (2, 16, 32), torch.bfloat16, True, seed=3)
    pool, host = blocks.map(lambda t: t.to(DEVICE)).held(), blocks.map(lambda t: t[:0].to(DEVICE)).held()
    base = torch.tensor([[7, 1, 8, 0, 4, 2, 5, 3]], device=DEVICE)
    views = [base[:, i : i + 6] for i in (0, 1, 0, 1, 1, 2)]  # 0, 8, 0, 8, 8, 16 bytes in
    monkeypatch.setattr(gather._gather_kernel, "_compiled", {})
    fast = [qk.gather_blocks(pool, host, ix, 9, torch.bfloat16) for ix in views]
    if _common._FAST_LAUNCH:
        assert len(gather._gather_kernel._compiled) == 2  # aligned and not: each launched directly after its first
    monkeypatch.setattr(_common, "_FAST_LAUNCH", False)
    jit = [qk.gather_blocks(pool, host, ix, 9, torch.bfloat16) for ix in views]
    for (k, v), (want_k, want_v) in zip(fast, jit, strict=True):
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_triton_available():
    assert qk.triton_available(DEVICE)
    assert not qk.triton_available("meta")


@pytest.mark.gpu  # skipped without CUDA by conftest
@FAR_POSITIONS
@pytest.mark.parametrize("n_q", [1, 512])
def test_attention_llama3_shapes(poison, n_q, ordered):
    case = _attention_case(32, 8, 128, n_q, 1024 + n_q - 1, 1200, 1024, torch.bfloat16, ordered=ordered)
    _check_attention(case, torch.bfloat16)


@pytest.mark.gpu  # skipped without CUDA by conftest
@pytest.mark.parametrize("n_groups", [1, 200])
def test_block_score_llama3_shapes(poison, n_groups):
    group_queries = torch.randn(n_groups, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    repr_keys = torch.randn(800, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    question = torch.randn(800, device=DEVICE)
    scores, _ = qk.block_score(group_queries, repr_keys, question, 4.0, 8)
    ref = block_scores_reference(group_queries, repr_keys, question, 4.0)
    torch.testing.assert_close(scores, ref, rtol=1e-3, atol=1e-2)


@pytest.mark.gpu  # skipped without CUDA by conftest
def test_top_blocks_in_one_launch_ranks_every_programs_scores(poison):
    """On the GPU the one-launch lookup's last program ranks scores the other programs wrote (the counter's release
    and acquire make them visible): 200 lookups in a row on one scratch, whose scores row holds the last lookup's
    until written, each of another block count (100 to 1024) at the LLaMA-3-8B shape, launched back to back, pick what
    the scorer and the ranking launched apart pick, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    scratch = qk.Scratch()
    repr_keys = torch.randn(1024, 32, 128, generator=gen).to(DEVICE, torch.bfloat16)
    cases = [(torch.randn(2, 32, 128, generator=gen).to(DEVICE, torch.bfloat16), repr_keys[:n_blocks])
             for n_blocks in torch.randint(100, 1025, (200,), generator=gen).tolist()]
    picked = [qk.top_blocks(rows, keys, None, 4.0, 8, standardized=True, term_row=True, scratch=scratch)
              for rows, keys in cases]
    for (rows, keys), got in zip(cases, picked, strict=True):
        assert torch.equal(got, _top_blocks_in_two_launches(rows, keys, None, 4.0, 8, standardized=True, term_row=True))
    assert _counter(scratch, repr_keys.device) == 0


def _store_case(count, kv_heads, block_size, head_dim, dtype, seed, first=2, extra=3):
    """k, v as the runtime passes them: (count, kv_heads, block_size, head_dim) views of (kv_heads, tokens, head_dim)
    tail buffers, starting mid-buffer; blocks of growing magnitude, the second (when there is one) all zero."""
    gen = torch.Generator().manual_seed(seed)
    n = count * block_size
    scale = torch.logspace(-3, 3, max(count, 1)).repeat_interleave(block_size)[:n, None]
    if count > 1:
        scale[block_size : 2 * block_size] = 0
    views = []
    for _ in "kv":
        tail = torch.randn(kv_heads, first + n + extra, head_dim, generator=gen)
        tail[:, first : first + n] *= scale
        tail = tail.to(DEVICE, dtype)
        views.append(tail[:, first : first + n].unflatten(1, (count, block_size)).transpose(0, 1))
    return views


def _store_targets(n, count, kv_heads, block_size, head_dim, stored, first=1, device=DEVICE) -> tuple[Planes, Planes]:
    """Planes for n blocks (NaN or 0xFF: no value the store writes) and their rows [first : first + count]."""
    pin = device.type == "cpu" and DEVICE.type == "cuda"
    fp8 = stored == "fp8"
    planes = [torch.empty((n, kv_heads, block_size, head_dim), dtype=torch.uint8 if fp8 else stored, device=device,
                          pin_memory=pin) for _ in "kv"]
    if fp8:
        planes = [p.fill_(0xFF) for p in planes]
        planes += [torch.empty((n, kv_heads), device=device, pin_memory=pin) for _ in "kv"]
    whole = Planes(*planes)
    return whole, whole.map(lambda t: t[first : first + count])


def _assert_stored(got: Planes, want: Planes, first: int, count: int):
    """The rows [first : first + count] are bit-equal, the others untouched."""
    for mine, theirs in zip(got.held(), want.held(), strict=True):
        rows = slice(first, first + count)
        assert torch.equal(mine[rows].cpu(), theirs[rows].cpu())
        for outside in (mine[:first], mine[first + count :]):
            assert (outside.isnan() if outside.is_floating_point() else outside == 0xFF).all()


STORE_SHAPES = [  # count, kv_heads, block_size, head_dim
    pytest.param(4, 2, 3, 8, id="bs3-d8"),
    pytest.param(3, 3, 5, 16, id="bs5-d16"),
    pytest.param(2, 2, 130, 16, id="bs130-chunked"),
]


@pytest.mark.parametrize(("count", "kv_heads", "block_size", "head_dim"), STORE_SHAPES)
@pytest.mark.parametrize("stored", ["fp8", torch.float32, torch.bfloat16], ids=["fp8", "fp32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["in-fp32", "in-bf16"])
def test_store_blocks_matches_reference(poison, count, kv_heads, block_size, head_dim, stored, dtype):
    k, v = _store_case(count, kv_heads, block_size, head_dim, dtype, seed=count * block_size)
    assert not k.is_contiguous()
    shape = (count, kv_heads, block_size, head_dim)
    got, got_rows = _store_targets(count + 3, *shape, stored)
    want, want_rows = _store_targets(count + 3, *shape, stored)
    qk.store_blocks(k, v, got_rows.held())
    store_reference(k, v, want_rows)
    _assert_stored(got, want, 1, count)
    if stored == "fp8" and count > 1:  # the all-zero block: scale 1e-30 / 448, bits +-0
        assert (got.k_scale[2] == torch.tensor(1e-30) / 448).all() and (got.k[2] & 0x7F == 0).all()


@pytest.mark.parametrize("stored", ["fp8", torch.float16], ids=["fp8", "fp16"])
def test_store_blocks_into_host_memory(poison, stored):
    """Targets in CPU memory (pinned on CUDA: the kernel writes it in place)."""
    k, v = _store_case(3, 2, 5, 16, torch.bfloat16, seed=7)
    got, got_rows = _store_targets(6, 3, 2, 5, 16, stored, first=3, device=torch.device("cpu"))
    want, want_rows = _store_targets(6, 3, 2, 5, 16, stored, first=3, device=torch.device("cpu"))
    qk.store_blocks(k, v, got_rows.held())
    store_reference(k, v, want_rows)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    _assert_stored(got, want, 3, 3)


@pytest.mark.parametrize("stored", ["fp8", torch.float32], ids=["fp8", "fp32"])
def test_store_blocks_count_zero(poison, stored):
    k, v = _store_case(0, 2, 4, 8, torch.float32, seed=0)
    got, got_rows = _store_targets(2, 0, 2, 4, 8, stored)
    qk.store_blocks(k, v, got_rows.held())
    _assert_stored(got, got, 1, 0)


def test_e4m3_encoding_is_torchs():
    """Quantising with scale 1 (the block's largest magnitude is 448) encodes every float32 like torch: all e4m3
    values, the midpoints between neighbours (ties to even) and the floats just either side, the subnormal range,
    signed zeros, float32 denormals and random values of every magnitude."""
    e4m3 = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (e4m3[1:] + e4m3[:-1]) / 2  # exact in float32
    near = torch.cat([mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(math.inf)),
                      e4m3.nextafter(torch.tensor(math.inf))[:-1], e4m3[1:].nextafter(torch.tensor(0.0))])
    subnormal = torch.arange(0, 2**-5, 2**-13)  # eighths of e4m3's subnormal step, past the smallest normal
    tiny = torch.tensor([0.0, 1e-45, 2**-126, 2**-20, 2**-11, 2**-10 - 2**-40, 2**-10 + 2**-40, 448.0])
    rand = torch.exp2(torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 30 - 21)
    rand = (rand * torch.rand(2000, generator=torch.Generator().manual_seed(1)).add(1)).clamp_max(448)
    values = torch.cat([e4m3, near, subnormal, tiny, rand])
    half = len(values)
    values = torch.cat([values, -values])
    values = torch.cat([values, values.new_zeros(-len(values) % 16)]).view(1, 1, -1, 16).to(DEVICE)
    bits = torch.empty(values.shape, dtype=torch.uint8, device=DEVICE)
    scales = torch.empty(1, 1, device=DEVICE)
    qk.store_blocks(values, values, (bits, bits.clone(), scales, scales.clone()))
    assert scales.item() == 1.0
    want = values.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(bits, want)
    assert want.flatten()[half] == 0x80  # -0.0 kept its sign


def test_store_blocks_bad_inputs():
    k, v = _store_case(2, 2, 4, 8, torch.float32, seed=0)
    _, fp8 = _store_targets(3, 2, 2, 4, 8, "fp8")
    _, plain = _store_targets(3, 2, 2, 4, 8, torch.float32)
    fp8, plain = fp8.held(), plain.held()
    bad_cases = {
        "target must be": (k, v, fp8[:3]),
        "k and v must both be": (k, v[:1], plain),
        "float16, bfloat16 or float32 of one dtype": (k.double(), v.double(), plain),
        "contiguous last dim": (k.transpose(2, 3), v.transpose(2, 3), tuple(p.transpose(2, 3) for p in plain)),
        "target k and v must be \\(2, 2, 4, 8\\)": (k, v, (plain[0][:1], plain[1])),
        "target k and v must be uint8": (k, v, (plain[0], plain[1], *fp8[2:])),
        "must be float16, bfloat16 or float32 of one dtype, got torch.uint8": (k, v, fp8[:2]),
        "target scales must be": (k, v, (*fp8[:2], fp8[2][:, :1], fp8[3])),
        "contiguous in their last three dims": (k, v, (*(p.transpose(2, 3).contiguous().transpose(2, 3)
                                                         for p in plain),)),
    }
    for message, args in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            qk.store_blocks(*args)
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="pinned CPU memory"):
            qk.store_blocks(k, v, tuple(p.cpu() for p in plain))


def _representatives_case(heads, kv_heads, count, block_size, head_dim, dtype, seed, out_dtype=None):
    """keys, scores (distinct values) and a poisoned out, each a slice of a bigger buffer."""
    gen = torch.Generator().manual_seed(seed)
    n = count * block_size
    keys = torch.randn(kv_heads, n + 7, head_dim, generator=gen).to(DEVICE, dtype)[:, 4 : 4 + n]
    scores = torch.randperm(heads * (n + 5), generator=gen).float().view(heads, n + 5).to(DEVICE)[:, 2 : 2 + n]
    out = torch.empty(count + 4, heads, head_dim, dtype=out_dtype or dtype, device=DEVICE)[3 : 3 + count]
    return keys, scores, out


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize(("block_size", "repr_topk"), [(7, 1), (7, 3), (7, 7), (16, 4)])
@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32"])
def test_representative_keys_match_reference(poison, heads, kv_heads, block_size, repr_topk, dtype, out_dtype):
    keys, scores, out = _representatives_case(heads, kv_heads, 3, block_size, 16, dtype, heads + block_size, out_dtype)
    assert keys.stride(0) != keys.shape[1] * 16 and scores.stride(0) != scores.shape[1]
    want = torch.full_like(out, math.nan)
    qk.representative_keys(keys, scores, repr_topk, out)
    representatives_reference(keys, scores, repr_topk, want)
    rtol = 1e-2 if out_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize(("heads", "kv_heads", "count", "block_size"), [(8, 2, 3, 7), (4, 4, 2, 16), (6, 2, 4, 130)],
                         ids=["gqa4-bs7", "mha-bs16", "gqa3-bs130-chunked"])
@pytest.mark.parametrize("stored", ["fp8", torch.bfloat16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["in-fp32", "in-bf16"])
def test_store_blocks_with_their_representatives(poison, heads, kv_heads, count, block_size, stored, dtype):
    """One launch stores the blocks as without `represent` and writes their representative keys as
    `representative_keys` (the same program code) of the blocks' keys, close to the reference."""
    keys, scores, out = _representatives_case(heads, kv_heads, count, block_size, 16, dtype, heads + block_size)
    values = torch.randn(kv_heads, count * block_size, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    k, v = (t.unflatten(1, (count, block_size)).transpose(0, 1) for t in (keys, values))
    shape = (count, kv_heads, block_size, 16)
    got, got_rows = _store_targets(count + 2, *shape, stored)
    want, want_rows = _store_targets(count + 2, *shape, stored)
    qk.store_blocks(k, v, got_rows.held(), (scores, 3, out))
    qk.store_blocks(k, v, want_rows.held())
    _assert_stored(got, want, 1, count)
    alone = torch.full_like(out, math.nan)
    qk.representative_keys(keys, scores, 3, alone)
    assert torch.equal(out, alone)
    reference = torch.full_like(out, math.nan)
    store_reference(k, v, _store_targets(count + 2, *shape, stored)[1], (scores, 3, reference))
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out, reference, rtol=rtol, atol=rtol)


def test_representative_keys_write_only_their_rows(poison):
    keys, scores, _ = _representatives_case(4, 1, 2, 5, 8, torch.float32, seed=0)
    whole = torch.empty(5, 4, 8, device=DEVICE)
    want = torch.full_like(whole, math.nan)
    qk.representative_keys(keys, scores, 2, whole[1:3])
    representatives_reference(keys, scores, 2, want[1:3])
    torch.testing.assert_close(whole, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert not whole[1:3].isnan().any()


def test_representative_keys_bad_inputs():
    keys, scores, out = _representatives_case(4, 2, 3, 5, 8, torch.float32, seed=0)
    bad_cases = {
        "repr_topk must be": [(keys, scores, 0, out), (keys, scores, 6, out), (keys, scores, 2.0, out)],
        "heads a multiple of kv_heads": [(keys, scores[:3], 1, out[:, :3])],
        "the tokens count \\* block_size": [(keys[:, :14], scores[:, :14], 1, out), (keys, scores[:, :-1], 1, out)],
        "scores must be float32": [(keys, scores.double(), 1, out)],
        "float16, bfloat16 or float32": [(keys.double(), scores, 1, out)],
        "contiguous last dim": [(keys.transpose(1, 2).contiguous().transpose(1, 2), scores, 1, out)],
    }
    for message, cases in bad_cases.items():
        for args in cases:
            with pytest.raises(ValueError, match=message):
                qk.representative_keys(*args)


# ---- RMSNorm ------------------------------------------------------------------------------------------------------
def _assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for the order of the sum of squares: the normalised x one unit in its last place off at most (which
    the weight carries into the output), the output one more."""
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(want.dtype, 1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=1e-6)


@pytest.mark.parametrize("hidden", [1, 48, 100], ids=lambda h: f"hidden{h}")
@pytest.mark.parametrize(("dtype", "weight_dtype"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "fp16", "bf16-x-fp32-weight"])
def test_rms_norm_matches_reference(poison, hidden, dtype, weight_dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn((2, 3, hidden), generator=gen)).to(DEVICE, dtype)
    weight = (1 + torch.randn(hidden, generator=gen)).to(DEVICE, weight_dtype)
    want = rms_norm_reference(x, weight, 1e-6)
    _assert_within_one_ulp(qk.rms_norm(x, weight, 1e-6), want)
    out = torch.empty_like(want)
    assert qk.rms_norm(x, weight, 1e-6, out=out) is out
    _assert_within_one_ulp(out, want)
    rows = torch.randn((5, 2 * hidden), generator=gen).to(DEVICE, dtype)[:, :hidden]  # rows of a bigger tensor
    _assert_within_one_ulp(qk.rms_norm(rows, weight, 1e-6), rms_norm_reference(rows, weight, 1e-6))
    assert qk.rms_norm(x[:0], weight, 1e-6).shape == (0, 3, hidden)


def test_rms_norm_bad_inputs():
    x, weight = torch.randn(3, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    bad_cases = {
        "weight must be \\(8,\\)": [(x, weight[:4]), (x, weight[None])],
        "float16/bfloat16/float32": [(x.double(), weight), (x, weight.long())],
        "contiguous last dim": [(x.t().contiguous().t(), weight)],
        "flatten to one stride": [(torch.randn(4, 3, 8, device=DEVICE)[:, :2], weight)],
    }
    for message, cases in bad_cases.items():
        for args in cases:
            with pytest.raises(ValueError, match=message):
                qk.rms_norm(*args, 1e-6)
    with pytest.raises(ValueError, match="out must be contiguous"):
        qk.rms_norm(x, weight, 1e-6, out=torch.empty(3, 8, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "yarn"])
def test_rms_norms_fused_inside_engine_forwards_only(tokenizer, arch, monkeypatch):
    """Each RMSNorm of the model runs the kernel inside the engine's forwards, with the logits of the model's own
    norms; a plain forward outside them runs the model's own, bit for bit; a norm of another form is left alone."""
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")  # on CUDA the engine would fuse them itself: here the test does
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qllm_runtime import QLLMConfig, QLLMEngine
    from qllm_runtime.norms import fuse_rms_norms

    from .conftest import COVERING, random_ids, session_logits, tiny_model
    from .test_equivalence import assert_same_logits

    class DoubledRMSNorm(LlamaRMSNorm):  # the same attributes, another result
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    model = tiny_model(arch, len(tokenizer), seed=4).to(DEVICE)  # its own: fusing changes the model it is given
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):  # weights other than ones, so the kernel must read them
            module.weight.data = (1 + 0.5 * torch.randn(module.weight.shape, generator=gen)).to(DEVICE)
    model.model.norm.__class__ = DoubledRMSNorm
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**COVERING))
    ids = random_ids(40, len(tokenizer))
    want = session_logits(engine, ids, 2)
    with torch.no_grad():
        plain = model(torch.tensor([ids[:5]], device=DEVICE)).logits

    calls = []

    def counted(x, weight, eps):
        calls.append(x.shape)
        return qk.rms_norm(x, weight, eps)

    assert fuse_rms_norms(model, counted, "meta") == 0  # where the kernel does not run: none
    assert fuse_rms_norms(model, counted, DEVICE.type) == len(norms) - 1  # all but the doubled final norm
    assert fuse_rms_norms(model, counted, DEVICE.type) == len(norms) - 1  # idempotent
    assert not getattr(model.model.norm.forward, "_quickllama", False)
    calls.clear()
    assert_same_logits(session_logits(engine, ids, 2), want)
    per_forward = 2 * model.config.num_hidden_layers * (2 if arch == "qwen3" else 1)  # qwen3 norms q and k too
    assert len(calls) >= per_forward
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids[:5]], device=DEVICE)).logits, plain)
    assert not calls
    if DEVICE.type == "cuda":  # moved off the kernel's device: the model's own norms again, inside the engine too
        model.cpu()
        assert_same_logits(session_logits(QLLMEngine(model, tokenizer, QLLMConfig(**COVERING)), ids, 2), want)
        assert not calls

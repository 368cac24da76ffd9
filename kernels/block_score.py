"""Block scorer: lookup groups against all representative keys, plus the cached question term, and top-k.

scores[g, b] = sum_h < group_queries[g, h], repr_keys[b, h] >  +  beta * question_scores[b]

`block_score`: one tiled matrix product over the flattened (heads * head_dim) axis with fp32 accumulation; the top-k
stays on the device (`torch.topk`), so a decode step needs no host synchronisation. `top_blocks`: the lookup whole,
scores, standardisation, top-k and document order (the engine's per-group lookup, which took nine launches from
PyTorch) in one launch for a few rows over up to TOP_CHUNK blocks (the engine's lookups: the last program to finish
scoring ranks), else in two or three. The spec is `qllm_runtime.lookup.block_scores_reference` followed by
`select_blocks`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, Launcher, Scratch, cdiv, check_device, dot_dtype, empty, next_power_of_2, on_device

__all__ = ["block_score", "top_blocks"]


@Launcher
@triton.jit(do_not_specialize=["stride_sg", "n_groups", "n_blocks"])
def _block_score_kernel(
    Query, Repr, Question, Scores,
    stride_qg, stride_rb, stride_sg,
    n_groups, n_blocks, n_features, beta,
    HAS_QUESTION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    g_ok = offs_g < n_groups
    b_ok = offs_b < n_blocks

    acc = tl.zeros([BLOCK_G, BLOCK_B], dtype=tl.float32)
    for start_k in range(0, n_features, BLOCK_K):
        k_ok = start_k + offs_k < n_features
        q = tl.load(
            Query + offs_g[:, None] * stride_qg + (start_k + offs_k)[None, :],
            mask=g_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        r_t = tl.load(
            Repr + offs_b[None, :] * stride_rb + (start_k + offs_k)[:, None],
            mask=b_ok[None, :] & k_ok[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        acc += tl.dot(q, r_t, input_precision="ieee")

    if HAS_QUESTION:
        question = tl.load(Question + offs_b, mask=b_ok, other=0.0).to(tl.float32)
        acc += beta * question[None, :]
    tl.store(Scores + offs_g[:, None] * stride_sg + offs_b[None, :], acc, mask=g_ok[:, None] & b_ok[None, :])


# Few groups (the engine's lookups: one): each program takes one group and ROW_BLOCKS blocks and reduces over the
# features in fp32 without tl.dot, so the programs cover the blocks many times over (tiles of the matrix product
# left a few programs running 64 steps each: ~150 µs for 256 blocks on an H200, now a few µs).
ROW_GROUPS, ROW_BLOCKS, ROW_FEATURES = 4, 4, 512
SCORES_ROOM = 256  # blocks: the scores' rows grow in steps of this many (a multiple of 4)


@triton.jit
def _score_rows(
    Query, Repr, Question, Scores,
    stride_qg, stride_rb, stride_sg,
    n_blocks, n_features, beta, pid_b, group,
    HAS_QUESTION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Scores[group, pid_b * BLOCK_B : + BLOCK_B]: one group's query (n_features,) against BLOCK_B blocks' keys, summed
    in fp32 over the features, plus beta * Question[b] (HAS_QUESTION)."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    b_ok = offs_b < n_blocks
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for start_k in range(0, n_features, BLOCK_K):
        k_ok = start_k + offs_k < n_features
        q = tl.load(Query + group * stride_qg + start_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.load(
            Repr + offs_b[:, None] * stride_rb + (start_k + offs_k)[None, :],
            mask=b_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc += r * q[None, :]
    scores = tl.sum(acc, 1)
    if HAS_QUESTION:
        scores += beta * tl.load(Question + offs_b, mask=b_ok, other=0.0).to(tl.float32)
    tl.store(Scores + group * stride_sg + offs_b, scores, mask=b_ok)


@Launcher
@triton.jit(do_not_specialize=["stride_sg", "n_blocks"])
def _block_score_rows_kernel(
    Query, Repr, Question, Scores,
    stride_qg, stride_rb, stride_sg,
    n_blocks, n_features, beta,
    HAS_QUESTION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    _score_rows(
        Query, Repr, Question, Scores, stride_qg, stride_rb, stride_sg, n_blocks, n_features, beta,
        tl.program_id(0), tl.program_id(1), HAS_QUESTION, BLOCK_B, BLOCK_K,
    )  # fmt: skip


def _scores(scratch: Scratch | None, n_rows: int, n_blocks: int, device: torch.device) -> Tensor:
    """The scores (n_rows, n_blocks) float32, rows 16-byte aligned whatever the block count (a row may serve as block
    terms: one specialization, not two), with room for the next blocks: a scratch keeps them while blocks come one
    lookup after another."""
    room = cdiv(n_blocks, SCORES_ROOM) * SCORES_ROOM
    return empty(scratch, "scores", (n_rows, room), torch.float32, device)[:, :n_blocks]


def block_score(
    group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, beta: float, topk: int | None,
    *, check: bool = True, scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Score every lookup group against every block and pick each group's top-k blocks.

    group_queries: (n_groups, heads, head_dim), mean far-rotated query of each group; fp16/bf16/fp32.
    repr_keys: (n_blocks, heads, head_dim), representative keys; fp16/bf16/fp32; each row contiguous.
    question_scores: (n_blocks,) float, the cached question term, or None (beta is then ignored).
    Returns scores: (n_groups, n_blocks) float32 and indices: (n_groups, min(topk, n_blocks)) int64,
    best first, both on the inputs' device (topk None: the scores alone, indices None). check=False skips validating
    the inputs (the engine's lookups, valid by construction). With a `scratch` the scores live there (until its next
    call).
    """
    if check:
        _check(group_queries, repr_keys, question_scores, topk)
    n_groups, heads, head_dim = group_queries.shape
    n_blocks = repr_keys.shape[0]
    device = group_queries.device
    scores = _scores(scratch, n_groups, n_blocks, device)
    has_question = question_scores is not None and beta != 0.0
    args = (group_queries, repr_keys, question_scores if has_question else scores, scores,
            group_queries.stride(0), repr_keys.stride(0), scores.stride(0))
    if n_groups and n_blocks and n_groups <= ROW_GROUPS:
        with on_device(device):
            _block_score_rows_kernel[(cdiv(n_blocks, ROW_BLOCKS), n_groups)](
                *args, n_blocks, heads * head_dim, float(beta),
                HAS_QUESTION=has_question, BLOCK_B=ROW_BLOCKS, BLOCK_K=ROW_FEATURES,
            )  # fmt: skip
    elif n_groups and n_blocks:
        mixed = group_queries.dtype != repr_keys.dtype  # then multiply in fp32
        block_g = min(64, max(16, next_power_of_2(n_groups)))
        block_b = 32 if n_groups <= 16 else 64  # few groups: more programs over the blocks
        grid = (cdiv(n_blocks, block_b), cdiv(n_groups, block_g))
        with on_device(device):
            _block_score_kernel[grid](
                *args, n_groups, n_blocks, heads * head_dim, float(beta),
                HAS_QUESTION=has_question, DOT_DTYPE=tl.float32 if mixed else dot_dtype(repr_keys.dtype),
                BLOCK_G=block_g, BLOCK_B=block_b, BLOCK_K=64,
            )  # fmt: skip
    if topk is None:
        return scores, None
    return scores, scores.topk(min(topk, n_blocks), dim=-1).indices


# top_blocks: a block's rank is one int64 key, its combined score's order-preserving bits above the complement of its
# index, so a single max reduction finds the best block and, among equal scores, the lowest index (torch.topk's
# choice among ties is unspecified); no block has the key -2**63. Each program ranks up to TOP_CHUNK blocks (one chunk
# of up to ROW_GROUPS rows: the row scorer's last program, in the same launch); more chunks are merged by a second
# launch, in one program up to TOP_MERGE keys (by torch.topk beyond). top-k up to TOP_MAX_K (a program holds k keys).
TOP_CHUNK, TOP_MERGE, TOP_MAX_K = 1024, 8192, 256
_INDEX = 0x7FFFFFFF  # the key's low bits: the complement of the block's index


@triton.jit
def _deviation(X, n, TILE: tl.constexpr):
    """Standard deviation (unbiased, as torch.std) of X[0 : n], n >= 2, in two passes over tiles."""
    offs = tl.arange(0, TILE)
    total = tl.zeros([TILE], dtype=tl.float32)
    for start in range(0, n, TILE):
        total += tl.load(X + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
    mean = tl.sum(total, 0) / n
    squares = tl.zeros([TILE], dtype=tl.float32)
    for start in range(0, n, TILE):
        ok = start + offs < n
        d = tl.where(ok, tl.load(X + start + offs, mask=ok, other=0.0).to(tl.float32) - mean, 0.0)
        squares += d * d
    return tl.sqrt(tl.sum(squares, 0) / (n - 1))


@triton.jit
def _best_keys(keys, k, K_PAD: tl.constexpr):
    """The k largest of `keys` (distinct), in slots 0 .. k-1 of a (K_PAD,) vector, the rest -2**63."""
    slots = tl.arange(0, K_PAD)
    best = tl.full([K_PAD], -(2**63), dtype=tl.int64)
    for i in range(0, k):
        top = tl.max(keys, 0)
        best = tl.where(slots == i, top, best)
        keys = tl.where(keys == top, -(2**63), keys)
    return best


@triton.jit
def _store_ascending(Out, best, k, K_PAD: tl.constexpr):
    """The blocks of `_best_keys`' first k keys, in ascending order, to Out[0 : k]."""
    slots = tl.arange(0, K_PAD)
    index = tl.where(slots < k, 0x7FFFFFFF - (best & 0x7FFFFFFF), 0x7FFFFFFF)
    tl.store(Out + slots, tl.sort(index, 0).to(tl.int64), mask=slots < k)


@triton.jit
def _chunk_keys(
    row, Terms, offs, n_blocks, k, beta,
    HAS_TERMS: tl.constexpr, STANDARDIZED: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    """`_best_keys` of the blocks `offs` (CHUNK,) of one group: its scores row[0 : n_blocks], plus beta * Terms[b]
    (HAS_TERMS), each standardised over the n_blocks (STANDARDIZED)."""
    ok = offs < n_blocks
    value = tl.load(row + offs, mask=ok, other=0.0)
    if HAS_TERMS:
        weight = beta
        if STANDARDIZED:  # z(query term) + beta * z(block term), less the means, which no ranking sees
            value = value / tl.maximum(_deviation(row, n_blocks, CHUNK), 1e-6)
            weight = beta / tl.maximum(_deviation(Terms, n_blocks, CHUNK), 1e-6)
        value += weight * tl.load(Terms + offs, mask=ok, other=0.0)
    bits = value.to(tl.int32, bitcast=True)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # signed order = the float order
    keys = tl.where(ok, (ordered << 32) | (0x7FFFFFFF - offs).to(tl.int64), -(2**63))
    return _best_keys(keys, k, K_PAD)


@Launcher
@triton.jit(do_not_specialize=["stride_sg", "stride_kg", "n_blocks"])
def _top_chunk_kernel(
    Scores, Terms, Keys, Out,
    stride_sg, stride_kg, stride_og,
    n_blocks, k, beta,
    HAS_TERMS: tl.constexpr, STANDARDIZED: tl.constexpr, FINAL: tl.constexpr,
    CHUNK: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    best = _chunk_keys(Scores + group * stride_sg, Terms, chunk * CHUNK + tl.arange(0, CHUNK), n_blocks, k, beta,
                       HAS_TERMS, STANDARDIZED, CHUNK, K_PAD)
    if FINAL:
        _store_ascending(Out + group * stride_og, best, k, K_PAD)
    else:
        tl.store(Keys + group * stride_kg + chunk * K_PAD + tl.arange(0, K_PAD), best)


@Launcher
@triton.jit(do_not_specialize=["stride_sg", "n_blocks"])
def _score_and_rank_kernel(
    Query, Repr, Scores, Terms, Out, Counter,
    stride_qg, stride_rb, stride_sg, stride_og,
    n_groups, n_blocks, n_features, k, beta,
    HAS_TERMS: tl.constexpr, STANDARDIZED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    """`_block_score_rows_kernel`, then `_top_chunk_kernel` FINAL over one chunk, in one launch. Grid (cdiv(n_blocks,
    BLOCK_B), rows): each program writes the scores of BLOCK_B blocks of one row to Scores (rows, n_blocks), then
    counts itself in Counter (1,) int32, zero before the launch; the last to arrive ranks each group's row (Terms: the
    term row of Scores, the block terms, or unread) into Out (n_groups, k), and zeroes Counter for the next launch.

    As CUDA's threadFenceReduction: the barrier orders the program's score stores before its atomic, the atomic's
    release and acquire (gpu scope) order every program's stores before the last program's loads, which are plain
    global loads issued after the atomic (under the interpreter programs run one after another)."""
    _score_rows(
        Query, Repr, Scores, Scores, stride_qg, stride_rb, stride_sg, n_blocks, n_features, 0.0,
        tl.program_id(0), tl.program_id(1), False, BLOCK_B, BLOCK_K,
    )  # fmt: skip
    tl.debug_barrier()  # every thread's score stores before the (one thread's) atomic
    arrived = tl.atomic_add(Counter, 1, sem="acq_rel")  # programs before this one
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
        for group in range(0, n_groups):
            best = _chunk_keys(Scores + group * stride_sg, Terms, tl.arange(0, CHUNK), n_blocks, k, beta,
                               HAS_TERMS, STANDARDIZED, CHUNK, K_PAD)
            _store_ascending(Out + group * stride_og, best, k, K_PAD)
        tl.store(Counter, 0)  # the next launch on this stream starts after this one ends: it sees the zero


@Launcher
@triton.jit(do_not_specialize=["stride_kg", "n_keys"])
def _top_merge_kernel(Keys, Out, stride_kg, stride_og, n_keys, k, K_PAD: tl.constexpr, MERGE: tl.constexpr):
    group = tl.program_id(0)
    offs = tl.arange(0, MERGE)
    keys = tl.load(Keys + group * stride_kg + offs, mask=offs < n_keys, other=-(2**63))
    _store_ascending(Out + group * stride_og, _best_keys(keys, k, K_PAD), k, K_PAD)


def top_blocks(
    group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None, beta: float, topk: int,
    *, standardized: bool = False, term_row: bool = False, check: bool = True, scratch: Scratch | None = None,
) -> Tensor:
    """Each lookup group's top-k blocks in document order: (n_groups, min(topk, n_blocks)) int64, ascending.

    Ranked by the query term s (as `block_score`) plus beta * block_terms; `standardized`: s / std(s) + beta *
    block_terms / std(block_terms), each deviation over the blocks (unbiased, at least 1e-6; the means are left out:
    no ranking sees them). Among equal scores the lower index wins. Inputs as `block_score`'s, block_terms (n_blocks,)
    float32 or None; topk at most TOP_MAX_K. `term_row`: the last row of group_queries is no group but a term query,
    whose scores (made in the same launch as the groups') are the block terms; block_terms is then None. The spec:
    `select_blocks(block_scores_reference(..., standardized), topk)`, sorted. scratch: where the temporaries are kept
    from call to call (None: allocated per call). Up to ROW_GROUPS rows (the term row included) and TOP_CHUNK blocks:
    one launch, which scores and ranks (the engine's lookups); otherwise two, three beyond TOP_CHUNK blocks.
    """
    if check:
        _check(group_queries, repr_keys, block_terms, topk)
        if topk is None or topk > TOP_MAX_K:
            raise ValueError(f"topk must be a positive int up to {TOP_MAX_K}, got {topk!r}")
        if term_row and (block_terms is not None or group_queries.shape[0] < 2):
            raise ValueError("with term_row the block terms are the last query row's scores: pass block_terms=None "
                             "and at least one group before that row")
    n_rows, heads, head_dim = group_queries.shape
    n_groups = n_rows - term_row
    n_blocks = repr_keys.shape[0]
    k = min(topk, n_blocks)
    out = torch.empty(n_groups, k, dtype=torch.int64, device=group_queries.device)
    if not (n_groups and k):
        return out
    n_chunks = cdiv(n_blocks, TOP_CHUNK)  # one shape for every count: no compiling mid-reading as blocks come
    k_pad = max(16, next_power_of_2(k))
    one_launch = ranks_in_one_launch(n_rows, n_blocks)
    if one_launch:
        scores = _scores(scratch, n_rows, n_blocks, out.device)
    else:
        scores, _ = block_score(group_queries, repr_keys, None, 0.0, None, check=False, scratch=scratch)
    if term_row:
        block_terms = scores[n_groups]
    has_terms = block_terms is not None and beta != 0.0
    terms = block_terms if has_terms else scores  # unread without terms
    if one_launch:
        with on_device(out.device):
            _score_and_rank_kernel[(cdiv(n_blocks, ROW_BLOCKS), n_rows)](
                group_queries, repr_keys, scores, terms, out, _counter(scratch, out.device),
                group_queries.stride(0), repr_keys.stride(0), scores.stride(0), out.stride(0),
                n_groups, n_blocks, heads * head_dim, k, float(beta),
                HAS_TERMS=has_terms, STANDARDIZED=standardized,
                BLOCK_B=ROW_BLOCKS, BLOCK_K=ROW_FEATURES, CHUNK=TOP_CHUNK, K_PAD=k_pad,
            )  # fmt: skip
        return out
    keys = empty(scratch, "keys", (n_groups, n_chunks * k_pad), torch.int64, out.device) if n_chunks > 1 else out
    with on_device(out.device):
        _top_chunk_kernel[(n_groups, n_chunks)](
            scores, terms, keys, out,
            scores.stride(0), keys.stride(0), out.stride(0),
            n_blocks, k, float(beta),
            HAS_TERMS=has_terms, STANDARDIZED=standardized, FINAL=n_chunks == 1, CHUNK=TOP_CHUNK, K_PAD=k_pad,
        )  # fmt: skip
        if n_chunks > 1 and keys.shape[1] <= TOP_MERGE:
            _top_merge_kernel[(n_groups,)](
                keys, out, keys.stride(0), out.stride(0), keys.shape[1], k,
                K_PAD=k_pad, MERGE=max(512, next_power_of_2(keys.shape[1])),
            )  # fmt: skip
    if keys.shape[1] > TOP_MERGE:  # very many chunks: their picks merged by torch (the keys rank as the scores)
        out = (_INDEX - (keys.topk(k, dim=-1).values & _INDEX)).sort(dim=-1).values
    return out


def ranks_in_one_launch(n_rows: int, n_blocks: int) -> bool:
    """Whether `top_blocks` scores and ranks `n_rows` query rows (the term row included) over `n_blocks` blocks in one
    launch: the row scorer's case over one ranking chunk, whose last program ranks."""
    return n_rows <= ROW_GROUPS and n_blocks <= TOP_CHUNK


def _counter(scratch: Scratch | None, device: torch.device) -> Tensor:
    """`_score_and_rank_kernel`'s counter of arrived programs: (1,) int32, zero (each launch leaves it so). A scratch
    (one caller, one stream) keeps one, zeroed when made; without a scratch a new one (a fill launch on CUDA)."""
    if scratch is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return scratch.zeros("counter", (1,), torch.int32, device)


def _check(group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, topk: int | None) -> None:
    """ValueError unless the inputs are as `block_score` documents them."""
    for name, t in (("group_queries", group_queries), ("repr_keys", repr_keys)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (n, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} needs contiguous (heads, head_dim) rows; call .contiguous() first")
    _, heads, head_dim = group_queries.shape
    n_blocks = repr_keys.shape[0]
    if repr_keys.shape[1:] != (heads, head_dim):
        raise ValueError(
            f"repr_keys {tuple(repr_keys.shape)} does not match group_queries {tuple(group_queries.shape)}"
        )
    if question_scores is not None and (
        question_scores.shape != (n_blocks,) or not question_scores.is_floating_point()
    ):
        raise ValueError(f"question_scores must be a float tensor of shape ({n_blocks},)")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    check_device([group_queries, repr_keys] + ([] if question_scores is None else [question_scores]))

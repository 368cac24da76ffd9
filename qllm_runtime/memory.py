"""LayerMemory: what one attention layer keeps instead of a KV cache, and its append-and-attend step.

Token positions are absolute (0 = first token read). Per layer:
  init    positions [0, n_init)                      always attended (as far keys once out of the window)
  tail    positions [tail_start, seen)               the local window plus the remainder: tokens that left
                                                     the window but do not fill a block yet; kept in buffers
                                                     whose index 0 is position `_base` (moved back to 0 only
                                                     when the buffers run out of room, not every step)
  blocks  positions [n_init + b*block_size, ...)     finished blocks, each with a representative key
Keys are stored un-rotated. A token is "final" once every query that sees it locally has run; only
final tokens become blocks, so a selected block is always out of the current queries' windows.
Which blocks a lookup group attends is the policy's decision (`qllm_runtime.policies`); where the far
keys sit for RoPE is `QLLMConfig.far_positions`. While a question is answered, a policy may fix one set of
evidence blocks for every layer (`ModelMemory.choose_evidence`): each later lookup attends exactly those
(plus blocks made after the choice, from the question turn and the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import rope_matrix
from .blocks import BlockStore
from .config import QLLMConfig
from .layout import BlockLayout
from .lookup import choose_evidence
from .ops import AttendFn, DecodeAttendFn, far_set_op, gather_op, store_op
from .placement import Placement
from .policies import LookupPolicy
from .question import Question
from .recent import Recent
from .rope import RotaryTables


@dataclass
class LayerSnapshot:
    init_len: int
    tail_start: int
    seen: int
    n_blocks: int
    tail_k: Tensor
    tail_v: Tensor
    tail_scores: Tensor
    pinned: Tensor | None


@dataclass
class EvidenceBuffer:
    """The far keys while answering from evidence: init, the evidence blocks (with those made since), then the
    remainder, which grows step by step; k, v (kv_heads, capacity, head_dim), pos (capacity,)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    n_blocks: int  # the layer's blocks when gathered: a new block means a new buffer
    fixed: int  # init + evidence tokens, before the remainder
    rem_start: int  # position of the remainder's first token
    written: int = 0  # remainder tokens copied in so far


class LayerMemory:
    """Block memory of one attention layer (batch size 1)."""

    APPEND_SPAN = 4  # lookup groups whose keys join the tail in one copy, before the first of them attends
    TAIL_SLACK = 2  # lookup groups of room in the tail beyond what it holds: tokens leave it without a copy

    def __init__(
        self,
        config: QLLMConfig,
        heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        placement: Placement,
        rope: RotaryTables,
        attend: AttendFn,
        policy: LookupPolicy,
    ) -> None:
        self.config = config
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.rope, self.attend, self.policy = rope, attend, policy
        self.layout = BlockLayout.of(config)
        self.init_k = torch.empty((kv_heads, config.n_init, head_dim), dtype=dtype, device=device)
        self.init_v = torch.empty_like(self.init_k)
        self.init_len = 0
        # the window, a remainder short of a block, the groups appended at once (`APPEND_SPAN`) and the slack
        group = min(config.lookup_chunk, config.prefill_chunk)
        capacity = config.n_local + config.block_size + (self.APPEND_SPAN + self.TAIL_SLACK) * group
        self.tail_k = torch.empty((kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.tail_v = torch.empty_like(self.tail_k)
        self.tail_scores = torch.zeros((heads, capacity), dtype=torch.float32, device=device)
        self.tail_start = 0  # absolute position of the tail's first token
        self.seen = 0  # tokens appended so far = next absolute position
        self._base = 0  # absolute position of index 0 of the tail buffers
        self.store = BlockStore(
            kv_heads, config.block_size, head_dim, dtype, device, placement.device_limit,
            expected_blocks=placement.expected_blocks, fp8=config.kv_dtype == "float8_e4m3", gather=gather_op(device),
            store=store_op(device), far_set=far_set_op(device),
        )
        # a lookup group's far keys, values and positions: init, the blocks it looks up, the remainder; kept from group
        # to group (the init written once), grown when a group needs more room
        self._far_k = self._far_v = self._far_pos = None
        self._far_init = 0  # init tokens held in the far buffers
        # views of the tail and far buffers by their bounds, kept while the buffers are
        self._tail_slices: Recent[tuple[Tensor, Tensor, Tensor]] = Recent(64)
        self._far_slices: Recent[tuple[Tensor, ...]] = Recent(64)
        n_repr = max(placement.expected_blocks, 16)
        self.repr_keys = torch.empty((n_repr, heads, head_dim), dtype=dtype, device=device)
        self.question_vector: Tensor | None = None  # (heads, head_dim), far-rotated
        self._term_row: Tensor | None = None  # (1, heads, head_dim) float32: the policy's term query, if it has one
        self._term_pair: Tensor | None = None  # (1, 2, heads, head_dim): a group's query row, then the term row
        self.hits: Tensor | None = None  # (n_repr,) selections per block while counting
        self.pinned: Tensor | None = None  # blocks the last multi-token lookup group picked
        self.evidence: Tensor | None = None  # (1, m) blocks every lookup attends while answering, as laid out
        self.evidence_end = 0  # blocks that existed when the evidence was chosen; later ones join it
        self._evidence_buffer: EvidenceBuffer | None = None
        self._positions = torch.arange(capacity, device=device)
        self._first_block = self.layout.start(0) + self._arange(0, config.block_size)  # its token positions
        self._no_blocks = torch.zeros((1, 0), dtype=torch.int64, device=device)
        self._rotation: Tensor | None = None  # (head_dim, head_dim), see _far_rotation
        self._decode_rope: tuple[Tensor, ...] = ()  # cos, sin of the readied decode step
        self._decode_remainder = 0  # its remainder's length

    @property
    def n_blocks(self) -> int:
        return self.store.n_blocks

    @property
    def tail_len(self) -> int:
        return self.seen - self.tail_start

    # ---- question --------------------------------------------------------------------------------
    def set_question(self, question_vector: Tensor | None) -> None:
        """Bias later lookups towards `question_vector` (heads, head_dim); None removes the bias."""
        self.question_vector = question_vector
        term = self.policy.term_query(question_vector)  # its block terms are scored with every lookup
        self._term_pair = self._term_row = None
        if term is not None:  # a group's query, then the term query (one group's lookup writes its row in place)
            term = term.float().reshape(self.heads, self.head_dim)
            self._term_pair = torch.stack([torch.zeros_like(term), term])[None]
            self._term_row = self._term_pair[0, 1:]

    def count_hits(self, on: bool) -> None:
        self.hits = torch.zeros(self.repr_keys.shape[0], dtype=torch.int64, device=self.device) if on else None

    def set_evidence(self, blocks: Tensor | None) -> None:
        """Attend exactly `blocks` (m, laid out in this order) and every block made from now on in each lookup."""
        self.evidence = None if blocks is None else blocks.to(self.device)[None]
        self.evidence_end = self.n_blocks
        self._evidence_buffer = None

    # ---- the step --------------------------------------------------------------------------------
    def append_and_attend(self, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        """Append a chunk and attend its queries.

        query: (heads, n, head_dim); key, value: (kv_heads, n, head_dim), all un-rotated, absolute
        positions seen .. seen + n - 1.  Returns (n, heads, head_dim).
        """
        cfg = self.config
        n = query.shape[1]
        start = self.seen
        if start < cfg.n_init:  # the first n_init tokens are also kept as init
            take = min(cfg.n_init - start, n)
            self.init_k[:, start : start + take] = key[:, :take]
            self.init_v[:, start : start + take] = value[:, :take]
            self.init_len = start + take
        out = query.new_empty((n, self.heads, self.head_dim))
        far_queries = self._far_queries(query) if self.evidence is None and self.policy.uses_blocks else None
        appended = 0  # a group attends keys up to its own last query: later keys in the tail are not read yet
        for i, g0 in enumerate(range(0, n, cfg.lookup_chunk)):
            g1 = min(n, g0 + cfg.lookup_chunk)
            if g1 > appended:  # the keys of the next few groups join the tail in one copy
                appended = min(n, g0 + self.APPEND_SPAN * cfg.lookup_chunk)
                self._tail_append(key[:, g0:appended], value[:, g0:appended])
            far_query = None if far_queries is None else far_queries[i]
            self._attend_group(query[:, g0:g1], start + g0, scaling, far_query, out[g0:g1])
            self._retire(processed=start + g1)
        return out

    def _far_queries(self, query: Tensor, group: int | None = None) -> Tensor:
        """The mean query of each group of `group` (default: lookup_chunk) tokens, far-rotated, then the policy's term
        query if it has one: (n_groups, 1 or 2, heads, head_dim) float32, for a chunk's groups at once (a few launches,
        not a few a group)."""
        group = group or self.config.lookup_chunk
        whole = query.shape[1] // group * group
        means = [query[:, :whole].unflatten(1, (-1, group)).mean(dim=2, dtype=torch.float32)] if whole else []
        if whole < query.shape[1]:
            means.append(query[:, whole:].mean(dim=1, keepdim=True, dtype=torch.float32))
        means = means[0] if len(means) == 1 else torch.cat(means, dim=1)  # (heads, n_groups, head_dim)
        means = means.transpose(0, 1)  # (n_groups, heads, head_dim)
        if self._term_row is None:
            return (means @ self._far_rotation())[:, None]  # a new tensor: (heads, head_dim) rows dense
        if means.shape[0] == 1:
            torch.matmul(means, self._far_rotation(), out=self._term_pair[:, 0])
            return self._term_pair
        rows = (means @ self._far_rotation())[:, None]
        return torch.cat([rows, self._term_row.expand(rows.shape[0], 1, -1, -1)], dim=1)

    def _attend_group(self, query: Tensor, q_start: int, scaling: float, far_query: Tensor | None, out: Tensor
                      ) -> None:
        """Attend the group of `query` (heads, n_q, head_dim) at q_start.. into `out` (n_q, heads, head_dim); the
        probability its local keys received joins their scores (which choose representative keys)."""
        cfg = self.config
        n_q = query.shape[1]
        q_last = q_start + n_q - 1
        far_end = q_last - cfg.n_local + 1  # keys before this are far for at least the last query
        local_start = max(self.tail_start, q_start - cfg.n_local + 1)
        lo, hi = local_start - self._base, q_last + 1 - self._base
        n_init_far = min(self.init_len, max(far_end, 0))
        if self.evidence is not None and n_init_far == self.init_len:
            fk, fv, fp = self._evidence_far_set(far_end)
        else:
            fk, fv, fp = self._far_set(query, n_init_far, far_end, far_query)
        # ordered: far keys packed in document order so that the last one sits just before far_end
        far_origin = far_end - fp.shape[0] if cfg.far_positions == "ordered" else None
        cos, sin = self.rope.get(cfg.n_local + max(n_q, fp.shape[0]) + 1, self.device)
        local_k, local_v, local_scores = self._tail_slice(lo, hi)
        # answering from evidence looks nothing up: no scores to keep
        self.attend(
            query, q_start, local_k, local_v, local_start, fk, fv, fp, cos, sin, cfg.n_local, scaling,
            far_origin=far_origin, out=out, received=local_scores if self.evidence is None else None,
        )

    def _far_set(self, query: Tensor, n_init_far: int, far_end: int, far_query: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Far keys, values (kv_heads, n_far, head_dim) and positions (n_far,) of a lookup group: init, the
        blocks it looks up, the remainder; views of the far buffers, the blocks and the remainder written in one
        step (`BlockStore.gather_far_set`)."""
        cfg = self.config
        if not self.policy.uses_blocks:
            return self.init_k[:, :n_init_far], self.init_v[:, :n_init_far], self._arange(0, n_init_far)
        picked = self._no_blocks
        if self.n_blocks and cfg.topk:
            picked = self._lookup(query, far_query)
            if self.hits is not None and self.evidence is None:
                self.hits.index_add_(0, picked.flatten(), torch.ones_like(picked.flatten()))
        rem_start, n_rem = self._remainder(far_end)
        n_far = n_init_far + picked.shape[1] * cfg.block_size + n_rem
        far_k, far_v, far_pos = self._far_buffers(n_far, n_init_far)
        new = slice(n_init_far, n_far)
        views = self._far_slices.get((n_init_far, n_far), lambda: (
            far_k[:, new], far_v[:, new], far_pos[new], far_k[:, :n_far], far_v[:, :n_far], far_pos[:n_far]))
        if n_far > n_init_far:
            rem_k, rem_v, _ = self._tail_slice(rem_start - self._base, rem_start - self._base + n_rem)
            # per-KV-head picks differ by row; the first row's positions serve the mask (blocks are visible to all)
            self.store.gather_far_set(picked, *views[:3], rem_k, rem_v, self.layout.start(0), rem_start)
            self._far_init = min(self._far_init, n_init_far)  # init tokens after n_init_far were written over
        return views[3:]

    def _far_buffers(self, n_far: int, n_init_far: int) -> tuple[Tensor, Tensor, Tensor]:
        """The far buffers with room for n_far keys, holding the first n_init_far init tokens."""
        if self._far_k is None or self._far_k.shape[1] < n_far:
            cfg = self.config
            usual = cfg.n_init + (cfg.topk + 1) * cfg.block_size + min(cfg.lookup_chunk, cfg.prefill_chunk)
            room = max(n_far, 2 * (0 if self._far_k is None else self._far_k.shape[1]), usual)
            self._far_k = self.tail_k.new_empty((self.kv_heads, room, self.head_dim))
            self._far_v = torch.empty_like(self._far_k)
            self._far_pos = self._positions.new_empty(room)
            self._far_init = 0
            self._far_slices.clear()
        if self._far_init < n_init_far:  # the init tokens, written once
            n = self.init_len
            self._far_k[:, :n], self._far_v[:, :n] = self.init_k[:, :n], self.init_v[:, :n]
            self._far_pos[:n] = self._arange(0, n)
            self._far_init = n
        return self._far_k, self._far_v, self._far_pos

    def _evidence_far_set(self, far_end: int) -> tuple[Tensor, Tensor, Tensor]:
        """`_far_set` while answering from evidence: init and the evidence blocks (with those made since) are
        gathered once into a buffer, and each step only writes the remainder after them."""
        buf, n_rem = self._current_evidence(far_end)
        end = buf.fixed + n_rem
        return buf.k[:, :end], buf.v[:, :end], buf.pos[:end]

    def _current_evidence(self, far_end: int, leave_last: bool = False) -> tuple[EvidenceBuffer, int]:
        """The evidence buffer of a group whose far keys end before `far_end`, with the remainder written after the
        fixed part (but its last token with `leave_last`), and the remainder's length. One slot past the remainder
        stays free (`attend_decode_step` writes there when there is no remainder)."""
        rem_start, n_rem = self._remainder(far_end)
        buf = self._evidence_buffer
        if buf is None or (buf.n_blocks, buf.rem_start) != (self.n_blocks, rem_start) or \
                buf.fixed + n_rem >= buf.k.shape[1]:  # a new block, or out of room: gather again
            buf = self._evidence_buffer = self._gather_evidence(rem_start, n_rem, buf)
        upto = max(n_rem - 1, 0) if leave_last else n_rem
        if upto > buf.written:  # remainder tokens that left the window since the last step
            r0, w = rem_start - self._base, buf.written
            buf.k[:, buf.fixed + w : buf.fixed + upto] = self.tail_k[:, r0 + w : r0 + upto]
            buf.v[:, buf.fixed + w : buf.fixed + upto] = self.tail_v[:, r0 + w : r0 + upto]
            buf.written = upto
        return buf, n_rem

    def _gather_evidence(self, rem_start: int, n_rem: int, old: EvidenceBuffer | None) -> EvidenceBuffer:
        """The evidence buffer refilled: init and the evidence blocks gathered, positions written for room beyond;
        in `old`'s tensors where they have room (a decode graph keeps reading them), else in new ones."""
        blocks = self._evidence_blocks()
        block_k, block_v = self.store.gather(blocks)
        n_init = self.init_len
        fixed = n_init + block_k.shape[1]
        if old is not None and fixed + n_rem < old.k.shape[1]:
            k, v, pos = old.k, old.v, old.pos
        else:
            room = max(self.tail_k.shape[1], 2 * n_rem)  # the remainder lies in the tail
            shape = (self.kv_heads, fixed + room, self.head_dim)
            k, v = self.tail_k.new_empty(shape), self.tail_v.new_empty(shape)
            pos = self._positions.new_empty(fixed + room)
        k[:, :n_init], v[:, :n_init] = self.init_k[:, :n_init], self.init_v[:, :n_init]
        k[:, n_init:fixed], v[:, n_init:fixed] = block_k, block_v
        pos[:n_init], pos[n_init:fixed] = self._arange(0, n_init), self._block_positions(blocks[0])
        pos[fixed:] = self._arange(rem_start, rem_start + pos.shape[0] - fixed)
        return EvidenceBuffer(k, v, pos, self.n_blocks, fixed, rem_start)

    def _remainder(self, far_end: int) -> tuple[int, int]:
        """(first position, count) of the remainder: tail tokens out of the window of some query of the group,
        not yet in a block."""
        rem_start = max(self.tail_start, self.config.n_init)
        return rem_start, max(0, far_end - rem_start)

    def _evidence_blocks(self) -> Tensor:
        """(1, m): the evidence as laid out, then every block made since it was chosen, ascending."""
        return torch.cat([self.evidence, self._arange(self.evidence_end, self.n_blocks)[None]], dim=1)

    def _block_positions(self, blocks: Tensor) -> Tensor:
        """Positions (m * block_size,) of the tokens of `blocks` (m,), block by block: block 0's positions plus
        block_size times the block, in one launch."""
        return torch.add(self._first_block, blocks[:, None], alpha=self.config.block_size).flatten()

    def _lookup(self, query: Tensor, far_query: Tensor | None = None) -> Tensor:
        """Blocks the group of `query` (heads, n_q, head_dim) attends: (rows, m) indices, each row ascending
        (document order, which `ordered` far positions lay out), or the evidence; one row, or one per KV head.
        far_query: the group's mean query far-rotated (`_far_queries`) if already made."""
        cfg, n, k = self.config, self.n_blocks, self.config.topk
        if self.evidence is not None:
            return self._evidence_blocks()
        rows = self.kv_heads if cfg.lookup_heads == "kv_head" else 1
        answering = query.shape[1] == 1
        if n <= k:
            picked = self._arange(0, n).expand(rows, n)
        else:
            pinned = self.pinned if answering and cfg.pin_question_blocks else None
            # (1 or 2, heads, d): the group's query, then the term query if the policy has one
            far_q = self._far_queries(query, query.shape[1])[0] if far_query is None else far_query
            term_row = self._term_row is not None
            if rows > 1:  # row h keeps only the query heads of KV head h: its score sums over those heads
                owner = torch.arange(self.heads, device=self.device) // (self.heads // self.kv_heads)
                group_queries = far_q[0] * (owner == torch.arange(rows, device=self.device)[:, None])[..., None]
                if term_row:
                    group_queries = torch.cat([group_queries, self._term_row])
            else:
                group_queries = far_q
            if pinned is not None:  # the question's blocks + this token's best others: fixed size, no host sync
                want = min(n, k + pinned.shape[1])
                picked = self.policy.select(group_queries, self.repr_keys[:n], None, want, term_row=term_row)
                fresh = ~(picked[:, :, None] == pinned[:, None, :]).any(dim=-1)
                order = torch.argsort((~fresh).to(torch.int8), dim=-1, stable=True)
                own = picked.gather(1, order[:, : min(k, want - pinned.shape[1])])
                return torch.cat([pinned, own], dim=1).sort(dim=-1).values
            picked = self.policy.pick(group_queries, self.repr_keys[:n], None, k, term_row=term_row)  # ascending
        if not answering:  # a prompt (e.g. the question turn): its answer's tokens may keep these picks
            self.pinned = picked
        return picked

    def _far_rotation(self) -> Tensor:
        """RoPE to the far position n_local as a matrix (`rope_matrix`), made once."""
        if self._rotation is None:
            cos, sin = self.rope.get(self.config.n_local + 1, self.device)
            self._rotation = rope_matrix(cos[self.config.n_local], sin[self.config.n_local])
        return self._rotation

    def _arange(self, start: int, end: int) -> Tensor:
        """Positions start .. end-1 on the device, sliced from a cached arange (no allocation per call)."""
        if end > self._positions.shape[0]:
            self._positions = torch.arange(max(end, 2 * self._positions.shape[0]), device=self.device)
        return self._positions[start:end]

    # ---- one-token steps replayed from a CUDA graph (`qllm_runtime.decode_graph`) ---------------------------
    def prepare_decode_step(self) -> tuple[int, ...] | None:
        """Ready the next one-token step for `attend_decode_step`, which takes its positions from the device: returns
        them (tail slot, remainder source, remainder target, window offset, n_far, q_start, far_origin), or None when
        the step must go through `append_and_attend` (no evidence, the window not full yet, the tail out of room)."""
        cfg, p = self.config, self.seen
        far_end = p - cfg.n_local + 1  # the window is [far_end, p]
        if self.evidence is None or far_end < max(cfg.n_init, self.tail_start):
            return None
        if p + 1 - self._base > self.tail_k.shape[1]:
            self._compact_tail()
            if p + 1 - self._base > self.tail_k.shape[1]:
                return None
        buf, n_rem = self._current_evidence(far_end, leave_last=True)
        self._decode_rope = self.rope.get(cfg.n_local + buf.k.shape[1] + 1, self.device)
        self._decode_remainder = n_rem
        slot = p - self._base
        # the token that leaves the window joins the remainder; with no remainder the copy goes to the free slot
        source, target = (buf.rem_start + n_rem - 1 - self._base, buf.fixed + n_rem - 1) if n_rem else (
            slot, buf.k.shape[1] - 1)
        n_far = buf.fixed + n_rem
        return slot, source, target, far_end - self._base, n_far, p, far_end - n_far

    def attend_decode_step(self, query: Tensor, key: Tensor, value: Tensor, scaling: float, step: Tensor,
                           attend: DecodeAttendFn) -> Tensor:
        """The device work of the step `prepare_decode_step` readied, whose values `step` (7,) int64 holds on the
        device: the token into the tail, the remainder's newest token into the evidence buffer, the attention.
        Launches only (no host sync, no branch on positions), so a CUDA graph replays it. -> (1, heads, head_dim)"""
        slot = step[0:1]
        self.tail_k.index_copy_(1, slot, key)
        self.tail_v.index_copy_(1, slot, value)
        self.tail_scores.index_fill_(1, slot, 0.0)
        buf = self._evidence_buffer
        buf.k.index_copy_(1, step[2:3], self.tail_k.index_select(1, step[1:2]))
        buf.v.index_copy_(1, step[2:3], self.tail_v.index_select(1, step[1:2]))
        cos, sin = self._decode_rope
        return attend(query, self.tail_k, self.tail_v, buf.k, buf.v, buf.pos, cos, sin, self.config.n_local, scaling,
                      step[3:], ordered=self.config.far_positions == "ordered")

    def finish_decode_step(self) -> None:
        """After the step's device work: the token is read; blocks it completes are made (as `append_and_attend`)."""
        self.seen += 1
        self._evidence_buffer.written = self._decode_remainder
        self._retire(processed=self.seen)

    def decode_step_tensors(self) -> list[Tensor]:
        """What a step's device work reads and writes: a graph recorded over other tensors cannot be replayed."""
        buf = self._evidence_buffer
        return [self.tail_k, self.tail_v, self.tail_scores, buf.k, buf.v, buf.pos, *self._decode_rope]

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _retire(self, processed: int) -> None:
        """Move final tokens (every local query of theirs has run) out of the tail."""
        cfg = self.config
        final_end = processed - cfg.n_local + 1
        new_start = self.tail_start
        if new_start < cfg.n_init:  # init tokens leave the tail once final: they live in init
            new_start = min(cfg.n_init, max(new_start, final_end))
        if new_start >= cfg.n_init:
            if self.policy.uses_blocks:
                n_new = max(0, (final_end - new_start) // cfg.block_size)
                if n_new:
                    self._make_blocks(new_start - self._base, n_new)
                    new_start += n_new * cfg.block_size
            else:  # streaming: tokens that leave the window are dropped
                new_start = max(new_start, final_end)
        self.tail_start = new_start  # the tokens before it left the tail (no copy: see _tail_append)

    def _make_blocks(self, offset: int, count: int) -> None:
        """Turn tail buffer[offset : offset + count * block_size] into `count` new blocks."""
        cfg = self.config
        sl = slice(offset, offset + count * cfg.block_size)
        first = self.n_blocks
        if first + count > self.repr_keys.shape[0]:
            self._grow_repr(max(2 * self.repr_keys.shape[0], first + count))
        representatives = self.repr_keys[first : first + count]  # (count, heads, d), written with the blocks
        self.store.add(self._as_blocks(self.tail_k, offset, count), self._as_blocks(self.tail_v, offset, count),
                       (self.tail_scores[:, sl], cfg.repr_topk, representatives))

    def _as_blocks(self, buf: Tensor, offset: int, count: int) -> Tensor:
        """Tail buffer `buf` (kv_heads, capacity, d), tokens offset .. offset + count * block_size, as blocks: a
        (count, kv_heads, block_size, d) view, made in one op (the engine makes blocks for every lookup group)."""
        heads, tokens, dims = buf.stride()
        size = self.config.block_size
        return buf.as_strided((count, buf.shape[0], size, buf.shape[2]), (size * tokens, heads, tokens, dims),
                              buf.storage_offset() + offset * tokens)

    def _tail_slice(self, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
        """tail_k, tail_v, tail_scores [:, lo:hi] (buffer indices), as views kept for the next group that asks."""
        return self._tail_slices.get((lo, hi), lambda: (self.tail_k[:, lo:hi], self.tail_v[:, lo:hi],
                                                        self.tail_scores[:, lo:hi]))

    def _tail_append(self, key: Tensor, value: Tensor) -> None:
        n = key.shape[1]
        if self.seen + n - self._base > self.tail_k.shape[1]:
            self._compact_tail()
            if self.tail_len + n > self.tail_k.shape[1]:
                self._resize_tail(self.tail_len + n)
        i = self.seen - self._base
        self.tail_k.narrow(1, i, n).copy_(key)  # narrow + copy_: a few microseconds less host work than indexing
        self.tail_v.narrow(1, i, n).copy_(value)
        self.tail_scores.narrow(1, i, n).zero_()
        self.seen += n

    def _tail_view(self) -> tuple[Tensor, Tensor, Tensor]:
        """The tail's keys, values (kv_heads, tail_len, head_dim) and received attention (heads, tail_len)."""
        sl = slice(self.tail_start - self._base, self.seen - self._base)
        return self.tail_k[:, sl], self.tail_v[:, sl], self.tail_scores[:, sl]

    def _compact_tail(self) -> None:
        """Move the tail to index 0 of its buffers (through a copy only where the two overlap)."""
        offset, n = self.tail_start - self._base, self.tail_len
        if offset:
            for buf in (self.tail_k, self.tail_v, self.tail_scores):
                tail = buf.narrow(1, offset, n)
                buf.narrow(1, 0, n).copy_(tail if offset >= n else tail.clone())
            self._base = self.tail_start

    def _resize_tail(self, needed: int) -> None:
        capacity = max(needed, 2 * self.tail_k.shape[1])
        for name in ("tail_k", "tail_v", "tail_scores"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], capacity, *old.shape[2:]))
            new[:, : old.shape[1]] = old
            setattr(self, name, new)
        self._tail_slices.clear()

    def _grow_repr(self, capacity: int) -> None:
        for name in ("repr_keys", "hits"):
            old = getattr(self, name)
            if old is not None:
                new = old.new_zeros((capacity, *old.shape[1:]))
                new[: old.shape[0]] = old
                setattr(self, name, new)

    # ---- saved memories --------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        """The reading as tensors: init_k/v (kv_heads, init_len, head_dim); tail_k/v (kv_heads, tail_len,
        head_dim); tail_scores (heads, tail_len) float32; repr_keys (n_blocks, heads, head_dim); blocks_k/v
        (n_blocks, kv_heads, block_size, head_dim); positions [init_len, tail_start, seen]; pinned (rows, m)
        if set. Question-dependent state (block terms, hits) is not part of it."""
        tail_k, tail_v, tail_scores = self._tail_view()
        blocks_k, blocks_v = self.store.export()
        state = {
            "init_k": self.init_k[:, : self.init_len], "init_v": self.init_v[:, : self.init_len],
            "tail_k": tail_k, "tail_v": tail_v, "tail_scores": tail_scores,
            "repr_keys": self.repr_keys[: self.n_blocks], "blocks_k": blocks_k, "blocks_v": blocks_v,
            "positions": torch.tensor([self.init_len, self.tail_start, self.seen]),
        }
        return state if self.pinned is None else {**state, "pinned": self.pinned}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Fill this fresh layer memory from `state()`; blocks go where this memory's placement puts them."""
        self.init_len, self.tail_start, self.seen = state["positions"].tolist()
        self._base = self.tail_start
        self.init_k[:, : self.init_len] = state["init_k"]
        self.init_v[:, : self.init_len] = state["init_v"]
        self._far_init = 0
        n = self.tail_len
        if n > self.tail_k.shape[1]:
            self._resize_tail(n)
        self.tail_k[:, :n], self.tail_v[:, :n] = state["tail_k"], state["tail_v"]
        self.tail_scores[:, :n] = state["tail_scores"]
        repr_keys = state["repr_keys"]
        if repr_keys.shape[0] > self.repr_keys.shape[0]:
            self._grow_repr(repr_keys.shape[0])
        self.repr_keys[: repr_keys.shape[0]] = repr_keys
        self.store.add(state["blocks_k"], state["blocks_v"])
        pinned = state.get("pinned")
        self.pinned = None if pinned is None else pinned.to(self.device)

    # ---- read once, ask many ---------------------------------------------------------------------
    def snapshot(self) -> LayerSnapshot:
        tail_k, tail_v, tail_scores = (t.clone() for t in self._tail_view())
        return LayerSnapshot(
            self.init_len, self.tail_start, self.seen, self.n_blocks, tail_k, tail_v, tail_scores, self.pinned,
        )

    def restore(self, snap: LayerSnapshot) -> None:
        """Return to `snap`: drop blocks and tokens added since, the question bias and hit counts."""
        n = snap.seen - snap.tail_start
        self.init_len, self.tail_start, self.seen = snap.init_len, snap.tail_start, snap.seen
        self._base = snap.tail_start
        self._far_init = 0
        self.tail_k[:, :n] = snap.tail_k
        self.tail_v[:, :n] = snap.tail_v
        self.tail_scores[:, :n] = snap.tail_scores
        self.store.truncate(snap.n_blocks)
        self.pinned = snap.pinned
        self.set_question(None)
        self.set_evidence(None)
        self.count_hits(False)


class ModelMemory:
    """The block memories of all attention layers of one model: the attention state of a reading."""

    def __init__(
        self, config: QLLMConfig, rope: RotaryTables, placement: Placement, attend: AttendFn, policy: LookupPolicy
    ) -> None:
        self.config, self.rope, self.placement = config, rope, placement
        self.attend_fn, self.policy = attend, policy
        self.layers: dict[int, LayerMemory] = {}
        self._question: Question | None = None
        self._counting = False
        self._evidence_hits: Tensor | None = None  # (n_blocks,) int64 once evidence is chosen

    @property
    def seen(self) -> int:
        return next(iter(self.layers.values())).seen if self.layers else 0

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        layer = self.layers.get(layer_idx)
        if layer is None:
            heads, _, head_dim = query.shape
            layer = self._new_layer(layer_idx, heads, key.shape[0], head_dim, key.dtype, key.device)
        return layer.append_and_attend(query, key, value, scaling)

    def _new_layer(self, layer_idx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> LayerMemory:
        layer = LayerMemory(
            self.config, heads, kv_heads, head_dim, dtype, device, self.placement, self.rope, self.attend_fn,
            self.policy,
        )
        if self._question is not None:
            layer.set_question(self._question.vectors[layer_idx])
        layer.count_hits(self._counting)
        self.layers[layer_idx] = layer
        return layer

    def state(self) -> dict[int, dict[str, Tensor]]:
        """Every layer's `LayerMemory.state()`, by layer index."""
        return {idx: layer.state() for idx, layer in self.layers.items()}

    def load_state(self, states: dict[int, dict[str, Tensor]], device: torch.device) -> None:
        """Rebuild the layers of a fresh memory from `state()` on `device`."""
        for idx, state in sorted(states.items()):
            _, heads, head_dim = state["repr_keys"].shape
            kv_heads, dtype = state["init_k"].shape[0], state["init_k"].dtype
            self._new_layer(idx, heads, kv_heads, head_dim, dtype, device).load_state(state)

    def set_question(self, question: Question | None) -> None:
        """The question whose vectors bias every later lookup (and which `choose_evidence` uses); None: none."""
        self._question = question
        for idx, layer in self.layers.items():
            layer.set_question(None if question is None else question.vectors[idx])

    def choose_evidence(self, count: int) -> None:
        """Fix the `count` blocks every layer attends from now on, by the policy's evidence scores summed over
        layers (nothing changes when the policy has none). A block's hits become 1 + the number of layers that
        rank it among their own top-k."""
        per_layer = []
        for idx, layer in self.layers.items():
            question, header = (None, None) if self._question is None else (
                self._question.queries[idx], self._question.header_queries[idx])
            scores = self.policy.evidence_scores(question, header, layer.init_k[:, : layer.init_len], layer.store)
            if scores is None or not scores.numel():
                return
            per_layer.append(scores.to(per_layer[0].device) if per_layer else scores)
        if not per_layer:
            return
        scores = torch.stack(per_layer)  # (layers, n_blocks)
        blocks = choose_evidence(scores.sum(dim=0), count, self.config.evidence_neighbors, self.config.evidence_order)
        votes = torch.zeros_like(scores, dtype=torch.int64)
        votes.scatter_(1, scores.topk(min(self.config.topk, scores.shape[1]), dim=1).indices, 1)
        hits = torch.zeros(scores.shape[1], dtype=torch.int64, device=scores.device)
        hits[blocks] = 1 + votes.sum(dim=0)[blocks]
        self._evidence_hits = hits.cpu()
        for layer in self.layers.values():
            layer.set_evidence(blocks)

    def count_hits(self, on: bool) -> None:
        self._counting = on
        for layer in self.layers.values():
            layer.count_hits(on)

    def block_hits(self) -> Tensor | None:
        """Selections per block summed over layers (n_blocks,), or None when nothing was counted; with evidence,
        its hits (`choose_evidence`)."""
        if self._evidence_hits is not None:
            return self._evidence_hits
        counts = [layer.hits[: layer.n_blocks] for layer in self.layers.values() if layer.hits is not None]
        return torch.stack(counts).sum(dim=0).cpu() if counts else None

    def snapshot(self) -> dict[int, LayerSnapshot]:
        return {idx: layer.snapshot() for idx, layer in self.layers.items()}

    def restore(self, snap: dict[int, LayerSnapshot]) -> None:
        for idx, layer in self.layers.items():
            layer.restore(snap[idx])
        self._question, self._counting, self._evidence_hits = None, False, None

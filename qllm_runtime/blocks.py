"""BlockStore: where one layer's finished memory blocks live.

Blocks 0 .. device_limit-1 sit in a device pool; later blocks are offloaded to host memory (pinned when the device
is CUDA), one growing tensor per plane. A gather reads both kinds by index in one step (`GatherFn`): on CUDA the
`qllm_kernels` gather reads offloaded blocks in place from pinned memory (no host sync, no copy per block); the
reference, `gather_reference`, indexes each source and merges. `device_limit` = inf puts everything in the pool, 0
offloads everything. With `fp8` the blocks are kept as float8 e4m3 bits with a float32 scale per block and KV head
(the block's largest magnitude maps to e4m3's largest value) and come out de-quantised to `dtype`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# allocates host planes while the reading goes on: page-locking them costs ~1 ms per MB (3.6 s of host time in a
# 100K-token reading of the LLaMA-3-8B shape with a 2 GB pool, BENCHMARKS.md §1), now off the reading's thread
_BACKGROUND = ThreadPoolExecutor(max_workers=8, thread_name_prefix="quickllama-host-planes")


@dataclass
class Planes:
    """K and V as stored, and (fp8) their scales: for one block (kv_heads, block_size, head_dim) and (kv_heads,);
    the pool, the host planes and a gather hold the same with leading dimensions."""

    k: Tensor
    v: Tensor
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Planes:
        return Planes(*(None if t is None else fn(t) for t in self.tensors()))

    def tensors(self) -> list[Tensor | None]:
        return [self.k, self.v, self.k_scale, self.v_scale]  # named, not `fields()`: on every lookup's launch path

    def held(self) -> tuple[Tensor, ...]:
        """The planes it holds: (k, v), or (k, v, k_scale, v_scale) for float8 (the gather kernel's argument)."""
        return (self.k, self.v) if self.k_scale is None else (self.k, self.v, self.k_scale, self.v_scale)

    def copy_to(self, target: Planes, fn: Callable[[Tensor, Tensor], None]) -> None:
        """fn(target plane, own plane) for each plane both hold."""
        for mine, theirs in zip(self.tensors(), target.tensors(), strict=True):
            if mine is not None and theirs is not None:
                fn(theirs, mine)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: (..., block_size, head_dim) -> float8 e4m3 bits as uint8 (same shape) and float32 scales (...)."""
    # times the float32 reciprocal, not / 448: CUDA torch divides by a scalar that way, so every device agrees
    scale = x.float().abs().amax(dim=(-2, -1)).clamp_min(1e-30) * (1 / FP8_MAX)
    bits = (x.float() / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
    return bits, scale


def dequantize(bits: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of `quantize`, in `dtype`."""
    return (bits.view(FP8).float() * scale[..., None, None]).to(dtype)


GatherFn = Callable[[Planes, Planes, Tensor, int, torch.dtype], tuple[Tensor, Tensor]]
FarSetFn = Callable[[Planes, Planes, Tensor, int, Tensor, Tensor, Tensor, Tensor, Tensor, int, int], None]
Represent = tuple[Tensor, int, Tensor]  # (scores, repr_topk, out) of new blocks: see `store_reference`
StoreFn = Callable[[Tensor, Tensor, Planes, Represent | None], None]


def store_reference(k: Tensor, v: Tensor, target: Planes, represent: Represent | None = None) -> None:
    """Write blocks into `target` as it stores them: k, v (count, kv_heads, block_size, head_dim), any strides;
    target: planes of the same shape (uint8 float8 bits, with (count, kv_heads) float32 scales, or a float dtype),
    in device or pinned host memory. represent: None, or (scores, repr_topk, out): the blocks' representative keys
    are also written (`representatives_reference` of the keys k, block after block per KV head)."""
    if represent is not None:
        _represent_reference(k, represent)
    planes = Planes(k, v)
    if target.k_scale is not None:
        (k_bits, k_scale), (v_bits, v_scale) = quantize(k), quantize(v)
        planes = Planes(k_bits, v_bits, k_scale, v_scale)
    planes.copy_to(target, lambda dst, src: dst.copy_(src, non_blocking=True))


def _represent_reference(k: Tensor, represent: Represent) -> None:
    """`representatives_reference` of blocks k (count, kv_heads, block_size, head_dim), (scores, repr_topk, out)."""
    scores, repr_topk, out = represent
    representatives_reference(k.transpose(0, 1).flatten(1, 2), scores, repr_topk, out)


def representatives_reference(keys: Tensor, scores: Tensor, repr_topk: int, out: Tensor) -> None:
    """Each new block's representative key per query head: the mean of the `repr_topk` keys of the block that the
    head's queries attended most.

    keys: (kv_heads, count * block_size, head_dim); scores: (heads, count * block_size) float32, the attention
    each token received per query head; out: (count, heads, head_dim), written (query head h reads KV head
    h // (heads // kv_heads)). Ties in `scores` may pick either token.
    """
    count, heads, head_dim = out.shape
    kv_heads = keys.shape[0]
    top = scores.unflatten(1, (count, -1)).topk(repr_topk, dim=-1).indices  # (heads, count, r)
    per_head = keys.unflatten(1, (count, -1)).repeat_interleave(heads // kv_heads, dim=0)  # (heads, count, bs, d)
    chosen = per_head.gather(2, top[..., None].expand(-1, -1, -1, head_dim))  # (heads, count, r, d)
    out.copy_(chosen.float().mean(dim=2).transpose(0, 1))


def gather_reference(pool: Planes, host: Planes, indices: Tensor, device_limit: int, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor]:
    """K and V of the blocks `indices`, de-quantised to `dtype`, concatenated per KV head: (kv_heads, m * block_size,
    head_dim) on the indices' device.

    pool, host: planes (n, kv_heads, block_size, head_dim) (and scales (n, kv_heads)); block b < device_limit is
    pool[b], a later one host[b - device_limit]; either may have no rows, and rows past the blocks held are never
    used (a store passes its whole planes). indices: (1, m), the same blocks for
    every KV head, or (kv_heads, m), row h for KV head h.
    """
    kv_heads, head_dim = pool.k.shape[1], pool.k.shape[3]
    rows = indices.expand(kv_heads, indices.shape[1])
    heads = torch.arange(kv_heads, device=indices.device)[:, None]
    sources = [(rows < device_limit, pool, rows)] if pool.k.shape[0] else []
    if host.k.shape[0]:  # on CUDA, moving the indices to the host waits for the stream: offloaded blocks are written
        sources.append((rows >= device_limit, host, rows - device_limit))
    picked = []
    for chosen, planes, index in sources:
        index, where = index.clamp(0, planes.k.shape[0] - 1).to(planes.k.device), heads.to(planes.k.device)
        picked.append((chosen, planes.map(lambda t, i=index, h=where: t[i, h].to(indices.device))))
    (_, planes), *others = picked
    for chosen, other in others:  # (kv_heads, m) -> broadcast over each plane's trailing dims
        planes = Planes(*(None if mine is None else torch.where(chosen.view(*chosen.shape, *[1] * (mine.dim() - 2)),
                                                                 theirs, mine)
                          for mine, theirs in zip(planes.tensors(), other.tensors(), strict=True)))
    k, v = decode(planes, dtype)
    return k.reshape(kv_heads, -1, head_dim), v.reshape(kv_heads, -1, head_dim)


def gather_far_set_reference(pool: Planes, host: Planes, indices: Tensor, device_limit: int, out_k: Tensor,
                             out_v: Tensor, out_pos: Tensor, rem_k: Tensor, rem_v: Tensor, first_position: int,
                             rem_position: int) -> None:
    """A lookup group's far keys after its init tokens: the blocks `indices` as `gather_reference` reads them, then the
    remainder rem_k, rem_v (kv_heads, n_rem, head_dim), written into out_k, out_v (kv_heads, m * block_size + n_rem,
    head_dim) in their dtype; their positions into out_pos (m * block_size + n_rem,): first_position + b * block_size
    + t for token t of block b (by the first row of `indices`), then rem_position + j for remainder token j."""
    block_size = (pool if pool.k.shape[0] else host).k.shape[2]
    n = indices.shape[1] * block_size
    if n:
        out_k[:, :n], out_v[:, :n] = gather_reference(pool, host, indices, device_limit, out_k.dtype)
        tokens = torch.arange(block_size, device=out_pos.device)
        out_pos[:n] = (first_position + indices[0].to(out_pos.device, torch.int64)[:, None] * block_size
                       + tokens).flatten()
    out_k[:, n:], out_v[:, n:] = rem_k, rem_v
    out_pos[n:] = torch.arange(rem_position, rem_position + rem_k.shape[1], device=out_pos.device)


def decode(planes: Planes, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """K and V of `planes` in `dtype` (de-quantised when they hold float8 bits)."""
    if planes.k_scale is None or planes.v_scale is None:
        return planes.k.to(dtype), planes.v.to(dtype)
    return dequantize(planes.k, planes.k_scale, dtype), dequantize(planes.v, planes.v_scale, dtype)


class BlockStore:
    """K/V of full blocks: each block is (kv_heads, block_size, head_dim), stored in `dtype` or as float8."""

    def __init__(
        self,
        kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        device_limit: int,
        expected_blocks: int = 0,
        fp8: bool = False,
        gather: GatherFn = gather_reference,
        store: StoreFn = store_reference,
        far_set: FarSetFn = gather_far_set_reference,
    ) -> None:
        self.shape = (kv_heads, block_size, head_dim)
        self.dtype, self.device, self.fp8 = dtype, device, fp8
        self.device_limit, self.expected_blocks = device_limit, expected_blocks
        self.n_blocks = 0
        self._pool = self._empty(min(device_limit, max(expected_blocks, 16)), device)
        self._host = self._empty(0, torch.device("cpu"))  # grown when the first block is offloaded
        # the host room the reading is expected to need, allocated in the background while the pool fills
        ahead = expected_blocks - device_limit
        self._host_ahead: Future[Planes] | None = _BACKGROUND.submit(
            self._empty, ahead, torch.device("cpu")) if ahead > 0 else None
        self._gather, self._store, self._far_set = gather, store, far_set
        self._stage: Planes | None = None  # see _staging

    @property
    def offloaded(self) -> int:
        return max(0, self.n_blocks - self.device_limit)

    def _empty(self, n: int, device: torch.device) -> Planes:
        """Room for n blocks on `device` (host memory is pinned when the blocks' device is CUDA)."""
        pin = device.type == "cpu" and self.device.type == "cuda"

        def new(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)

        stored = torch.uint8 if self.fp8 else self.dtype
        planes = [new((n, *self.shape), stored), new((n, *self.shape), stored)]
        if self.fp8:
            planes += [new((n, self.shape[0]), torch.float32), new((n, self.shape[0]), torch.float32)]
        return Planes(*planes)

    def add(self, k: Tensor, v: Tensor, represent: Represent | None = None) -> None:
        """Append blocks. k, v: (count, kv_heads, block_size, head_dim), any strides, on the store's device or the
        CPU (a loaded memory's blocks). represent: their representative keys are written too, by the store's op (blocks
        made on the device: `store_reference` says how)."""
        first, count = self.n_blocks, k.shape[0]
        pooled = max(0, min(count, self.device_limit - first))
        if represent is not None and 0 < pooled < count:  # the blocks straddle the pool's end (once a reading)
            _represent_reference(k, represent)
            represent = None
        if pooled:
            if first + pooled > self._pool.k.shape[0]:
                self._pool = self._grown(self._pool, first, min(self.device_limit, max(2 * self._pool.k.shape[0],
                                                                                       first + pooled)), self.device)
            pool_k, pool_v = k, v  # blocks made on the device, all pooled: as they are (no view per add)
            if pooled < count or k.device != self.device:
                pool_k, pool_v = (t[:pooled].to(self.device, non_blocking=True) for t in (k, v))
            self._store(pool_k, pool_v, self._pool.map(lambda t: t[first : first + pooled]), represent)
        if count > pooled:  # device -> pinned host, ordered on the stream before any later gather
            start, end = self.offloaded, self.offloaded + count - pooled
            if self._host_ahead is not None and not start:  # the first offloaded block: take the room made ahead
                self._host, self._host_ahead = self._host_ahead.result(), None
            if end > self._host.k.shape[0]:  # beyond the room made ahead (the reading's expected size)
                self._host = self._grown(self._host, start, max(end, 2 * self._host.k.shape[0], 16),
                                         torch.device("cpu"))
            host = self._host.map(lambda t: t[start:end])
            if self.device.type == "cpu":
                self._store(k[pooled:], v[pooled:], host, represent)
            elif k.device.type == "cpu":  # loaded blocks: encoded where they are, never through the device
                store_reference(k[pooled:], v[pooled:], host, represent)
            else:  # encoded on the device, then one DMA copy per plane (not byte stores over the bus)
                staged = self._staging(end - start)
                self._store(k[pooled:], v[pooled:], staged, represent)
                staged.copy_to(host, lambda dst, src: dst.copy_(src, non_blocking=True))
        self.n_blocks += count

    def _staging(self, n: int) -> Planes:
        """Device room for n blocks on their way to host memory, kept for every later add (not one allocation per
        add). Reuse is safe in stream order: the next store into it runs after the copies out of it."""
        if self._stage is None or self._stage.k.shape[0] < n:
            self._stage = self._empty(max(n, 2 * (0 if self._stage is None else self._stage.k.shape[0])), self.device)
        return self._stage.map(lambda t: t[:n])

    def _grown(self, planes: Planes, held: int, capacity: int, device: torch.device) -> Planes:
        """The first `held` blocks of `planes` copied into room for `capacity` blocks on `device`."""
        if device.type == "cpu":
            self._settle()  # copies into the old host planes, and gathers from them, may still be under way
        grown = self._empty(capacity, device)
        planes.map(lambda t: t[:held]).copy_to(grown.map(lambda t: t[:held]), Tensor.copy_)
        return grown

    def _settle(self) -> None:
        """Wait for the device's queued work, before the host reads or frees offloaded blocks."""
        if self.device.type == "cuda" and self._host.k.shape[0]:
            torch.cuda.current_stream(self.device).synchronize()

    def _stored(self, start: int, end: int) -> Planes:
        """Stored planes of blocks start .. end-1, all pooled or all offloaded."""
        if end <= self.device_limit:
            return self._pool.map(lambda t: t[start:end])
        return self._host.map(lambda t: t[start - self.device_limit : end - self.device_limit])

    def export(self) -> tuple[Tensor, Tensor]:
        """K and V of every block, pooled and offloaded, in order, de-quantised:
        (n_blocks, kv_heads, block_size, head_dim)."""
        pooled = min(self.n_blocks, self.device_limit)
        k, v = decode(self._stored(0, pooled), self.dtype)
        if not self.offloaded:
            return k, v
        self._settle()
        host_k, host_v = decode(self._stored(self.device_limit, self.n_blocks), self.dtype)
        return torch.cat([k.cpu(), host_k]), torch.cat([v.cpu(), host_v])

    def key_chunks(self, per_chunk: int) -> Iterator[Tensor]:
        """Every block's keys in order, de-quantised, on the device, in chunks (c <= per_chunk, kv_heads,
        block_size, head_dim); offloaded blocks are copied over chunk by chunk."""
        pooled = min(self.n_blocks, self.device_limit)
        for start in range(0, pooled, per_chunk):
            yield decode(self._stored(start, min(pooled, start + per_chunk)), self.dtype)[0]
        for start in range(pooled, self.n_blocks, per_chunk):
            planes = self._stored(start, min(self.n_blocks, start + per_chunk))
            yield decode(planes.map(lambda t: t.to(self.device, non_blocking=True)), self.dtype)[0]

    def truncate(self, n_blocks: int) -> None:
        """Forget blocks n_blocks.. (restoring a memory after a question)."""
        self.n_blocks = n_blocks

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the given blocks, concatenated per KV head, de-quantised: (kv_heads, m * block_size, head_dim).

        indices: (1, m), the same blocks for every KV head, or (kv_heads, m), row h for KV head h.
        """
        return self._gather(self._pool, self._host, indices, self.device_limit, self.dtype)

    def gather_far_set(self, indices: Tensor, out_k: Tensor, out_v: Tensor, out_pos: Tensor, rem_k: Tensor,
                       rem_v: Tensor, first_position: int, rem_position: int) -> None:
        """The given blocks de-quantised, then the remainder rem_k, rem_v, written into out_k, out_v, with their
        positions into out_pos, in one step: `gather_far_set_reference` says how."""
        self._far_set(self._pool, self._host, indices, self.device_limit, out_k, out_v, out_pos, rem_k, rem_v,
                      first_position, rem_position)

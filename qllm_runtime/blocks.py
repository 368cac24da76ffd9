"""BlockStore: where one layer's finished memory blocks live.

Blocks 0 .. device_limit-1 sit in a device pool (gathered by index on the device, no host sync);
later blocks are offloaded to CPU (pinned when the device is CUDA) and served through a per-layer
device LRU cache of `max_cached` slots. `device_limit` = inf puts everything in the pool, 0 offloads
everything. With `fp8` the blocks are kept as float8 e4m3 bits with a float32 scale per block and KV head
(the block's largest magnitude maps to e4m3's largest value) and come out de-quantised to `dtype`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

@dataclass
class Planes:
    """K and V as stored, and (fp8) their scales: for one block (kv_heads, block_size, head_dim) and (kv_heads,);
    the pool, the cache and a gather hold the same with leading dimensions."""

    k: Tensor
    v: Tensor
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Planes:
        return Planes(*(None if t is None else fn(t) for t in self.tensors()))

    def tensors(self) -> list[Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def copy_to(self, target: Planes, fn: Callable[[Tensor, Tensor], None]) -> None:
        """fn(target plane, own plane) for each plane both hold."""
        for mine, theirs in zip(self.tensors(), target.tensors(), strict=True):
            if mine is not None and theirs is not None:
                fn(theirs, mine)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: (..., block_size, head_dim) -> float8 e4m3 bits as uint8 (same shape) and float32 scales (...)."""
    scale = x.float().abs().amax(dim=(-2, -1)).clamp_min(1e-30) / FP8_MAX
    bits = (x.float() / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
    return bits, scale


def dequantize(bits: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of `quantize`, in `dtype`."""
    return (bits.view(FP8).float() * scale[..., None, None]).to(dtype)


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
        max_cached: int,
        expected_blocks: int = 0,
        fp8: bool = False,
    ) -> None:
        self.shape = (kv_heads, block_size, head_dim)
        self.dtype, self.device, self.fp8 = dtype, device, fp8
        self.device_limit = device_limit
        self.n_blocks = 0
        self._pool = self._empty(min(device_limit, max(expected_blocks, 16)))
        self._host: list[Planes] = []  # offloaded blocks, index = block - device_limit
        self._pin = device.type == "cuda"
        self._cache = self._empty(max_cached)
        self._slots: OrderedDict[int, int] = OrderedDict()  # block -> cache slot, least recently used first
        self.cache_misses = 0

    @property
    def offloaded(self) -> int:
        return len(self._host)

    def _empty(self, n: int) -> Planes:
        """Room for n blocks on the device."""
        k = torch.empty((n, *self.shape), dtype=torch.uint8 if self.fp8 else self.dtype, device=self.device)
        if not self.fp8:
            return Planes(k, torch.empty_like(k))
        scales = torch.empty((n, self.shape[0]), dtype=torch.float32, device=self.device)
        return Planes(k, torch.empty_like(k), scales, torch.empty_like(scales))

    def _encode(self, k: Tensor, v: Tensor) -> Planes:
        if not self.fp8:
            return Planes(k, v)
        (k_bits, k_scale), (v_bits, v_scale) = quantize(k), quantize(v)
        return Planes(k_bits, v_bits, k_scale, v_scale)

    def _decode(self, planes: Planes) -> tuple[Tensor, Tensor]:
        if planes.k_scale is None or planes.v_scale is None:
            return planes.k, planes.v
        return dequantize(planes.k, planes.k_scale, self.dtype), dequantize(planes.v, planes.v_scale, self.dtype)

    def add(self, k: Tensor, v: Tensor) -> None:
        """Append blocks. k, v: (count, kv_heads, block_size, head_dim)."""
        first, count = self.n_blocks, k.shape[0]
        planes = self._encode(k, v)
        pooled = max(0, min(count, self.device_limit - first))
        if pooled:
            if first + pooled > self._pool.k.shape[0]:
                self._grow_pool(min(self.device_limit, max(2 * self._pool.k.shape[0], first + pooled)))
            planes.map(lambda t: t[:pooled]).copy_to(self._pool.map(lambda t: t[first : first + pooled]),
                                                      Tensor.copy_)
        for i in range(pooled, count):
            host = planes.map(lambda t: torch.empty(t.shape[1:], dtype=t.dtype, pin_memory=self._pin))
            planes.map(lambda t, i=i: t[i]).copy_to(host, Tensor.copy_)
            self._host.append(host)
        self.n_blocks += count

    def _pooled(self, start: int, end: int) -> Planes:
        return self._pool.map(lambda t: t[start:end])

    def _offloaded(self, start: int, end: int, device: torch.device) -> Planes:
        """Offloaded blocks start .. end-1 (of the offloaded ones), stacked, on `device`."""
        planes = zip(*(block.tensors() for block in self._host[start:end]), strict=True)  # per plane, every block
        return Planes(*(None if p[0] is None else torch.stack(p).to(device, non_blocking=True) for p in planes))

    def export(self) -> tuple[Tensor, Tensor]:
        """K and V of every block, pooled and offloaded, in order, de-quantised:
        (n_blocks, kv_heads, block_size, head_dim)."""
        k, v = self._decode(self._pooled(0, min(self.n_blocks, self.device_limit)))
        if not self._host:
            return k, v
        host_k, host_v = self._decode(self._offloaded(0, len(self._host), torch.device("cpu")))
        return torch.cat([k.cpu(), host_k]), torch.cat([v.cpu(), host_v])

    def key_chunks(self, per_chunk: int) -> Iterator[Tensor]:
        """Every block's keys in order, de-quantised, on the device, in chunks (c <= per_chunk, kv_heads,
        block_size, head_dim); offloaded blocks are copied over chunk by chunk."""
        pooled = min(self.n_blocks, self.device_limit)
        for start in range(0, pooled, per_chunk):
            yield self._decode(self._pooled(start, min(pooled, start + per_chunk)))[0]
        for start in range(0, len(self._host), per_chunk):
            yield self._decode(self._offloaded(start, start + per_chunk, self.device))[0]

    def truncate(self, n_blocks: int) -> None:
        """Forget blocks n_blocks.. (restoring a memory after a question)."""
        del self._host[max(0, n_blocks - self.device_limit) :]
        for block in [b for b in self._slots if b >= n_blocks]:
            del self._slots[block]
        self.n_blocks = n_blocks

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the given blocks, concatenated per KV head, de-quantised: (kv_heads, m * block_size, head_dim).

        indices: (1, m), the same blocks for every KV head, or (kv_heads, m), row h for KV head h.
        """
        kv_heads, block_size, head_dim = self.shape
        m = indices.shape[1]
        if self.n_blocks <= self.device_limit:  # all pooled: stays on the device, no host sync
            rows, heads = indices.expand(kv_heads, m), torch.arange(kv_heads, device=self.device)[:, None]
            planes = self._pool.map(lambda t: t[rows, heads])
        else:
            blocks = indices.tolist()  # host sync: offloaded blocks go through the LRU cache
            planes = self._cache.map(lambda t: t.new_empty((kv_heads, m, *t.shape[2:])))
            for h, row in enumerate(blocks):  # one row: the same blocks for every KV head, copied whole
                heads = slice(None) if len(blocks) == 1 else slice(h, h + 1)
                for i, block in enumerate(row):  # copy at once: a later miss may reuse this slot
                    for out, plane in zip(planes.tensors(), self._fetch(block).tensors(), strict=True):
                        if out is not None and plane is not None:
                            out[heads, i] = plane[heads]
        k, v = self._decode(planes)
        return k.reshape(kv_heads, m * block_size, head_dim), v.reshape(kv_heads, m * block_size, head_dim)

    def _fetch(self, block: int) -> Planes:
        """A block's stored planes on the device: from the pool, or through the LRU cache."""
        if block < self.device_limit:
            return self._pool.map(lambda t: t[block])
        slot = self._slots.get(block)
        if slot is None:
            self.cache_misses += 1
            if len(self._slots) < self._cache.k.shape[0]:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            self._host[block - self.device_limit].copy_to(self._cache.map(lambda t: t[slot]),
                                                          lambda dst, src: dst.copy_(src, non_blocking=True))
            self._slots[block] = slot
        else:
            self._slots.move_to_end(block)
        return self._cache.map(lambda t: t[slot])

    def _grow_pool(self, capacity: int) -> None:
        grown = self._empty(capacity)
        self._pool.copy_to(grown.map(lambda t: t[: self._pool.k.shape[0]]), Tensor.copy_)
        self._pool = grown

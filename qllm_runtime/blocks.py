"""BlockStore: where one layer's finished memory blocks live.

Blocks 0 .. device_limit-1 sit in a device pool (gathered by index on the device, no host sync);
later blocks are offloaded to CPU (pinned when the device is CUDA) and served through a per-layer
device LRU cache of `max_cached` slots. `device_limit` = inf puts everything in the pool, 0 offloads
everything. With `fp8` the blocks are kept as float8 e4m3 bits with a float32 scale per block and KV head
(the block's largest magnitude maps to e4m3's largest value) and come out de-quantised to `dtype`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

# A block's K and V as stored, and their scales ((kv_heads,) each; None unless fp8); the pool and the cache hold
# the same four planes with a leading block / slot dimension.
Planes = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


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
            return k, torch.empty_like(k), None, None
        scales = torch.empty((n, self.shape[0]), dtype=torch.float32, device=self.device)
        return k, torch.empty_like(k), scales, torch.empty_like(scales)

    def _encode(self, k: Tensor, v: Tensor) -> Planes:
        if not self.fp8:
            return k, v, None, None
        (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
        return k, v, k_scale, v_scale

    def _decode(self, planes: Planes) -> tuple[Tensor, Tensor]:
        k, v, k_scale, v_scale = planes
        if k_scale is None or v_scale is None:
            return k, v
        return dequantize(k, k_scale, self.dtype), dequantize(v, v_scale, self.dtype)

    def add(self, k: Tensor, v: Tensor) -> None:
        """Append blocks. k, v: (count, kv_heads, block_size, head_dim)."""
        first, count = self.n_blocks, k.shape[0]
        planes = self._encode(k, v)
        pooled = max(0, min(count, self.device_limit - first))
        if pooled:
            if first + pooled > self._pool[0].shape[0]:
                self._grow_pool(min(self.device_limit, max(2 * self._pool[0].shape[0], first + pooled)))
            for pool, new in zip(self._pool, planes, strict=True):
                if pool is not None:
                    pool[first : first + pooled] = new[:pooled]
        for i in range(pooled, count):
            host = []
            for plane in planes:
                if plane is None:
                    host.append(None)
                    continue
                host.append(torch.empty(plane.shape[1:], dtype=plane.dtype, pin_memory=self._pin))
                host[-1].copy_(plane[i])
            self._host.append(tuple(host))  # type: ignore[arg-type]
        self.n_blocks += count

    def _pooled(self, start: int, end: int) -> Planes:
        return tuple(None if p is None else p[start:end] for p in self._pool)  # type: ignore[return-value]

    def _offloaded(self, start: int, end: int, device: torch.device) -> Planes:
        """Offloaded blocks start .. end-1 (of the offloaded ones), stacked, on `device`."""
        host = self._host[start:end]
        return tuple(None if host[0][i] is None else torch.stack([b[i] for b in host]).to(device, non_blocking=True)
                     for i in range(4))  # type: ignore[return-value]

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
            planes = tuple(None if p is None else p[rows, heads] for p in self._pool)
        else:
            blocks = indices.expand(kv_heads, m).tolist()  # host sync: offloaded blocks go through the LRU cache
            planes = tuple(None if p is None else p.new_empty((kv_heads, m, *p.shape[2:])) for p in self._cache)
            for h, row in enumerate(blocks):
                for i, block in enumerate(row):  # copy at once: a later miss may reuse this slot
                    for out, plane in zip(planes, self._fetch(block), strict=True):
                        if out is not None:
                            out[h, i] = plane[h]
        k, v = self._decode(planes)  # type: ignore[arg-type]
        return k.reshape(kv_heads, m * block_size, head_dim), v.reshape(kv_heads, m * block_size, head_dim)

    def _fetch(self, block: int) -> Planes:
        """A block's stored planes on the device: from the pool, or through the LRU cache."""
        if block < self.device_limit:
            return tuple(None if p is None else p[block] for p in self._pool)  # type: ignore[return-value]
        slot = self._slots.get(block)
        if slot is None:
            self.cache_misses += 1
            if len(self._slots) < self._cache[0].shape[0]:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            for cache, host in zip(self._cache, self._host[block - self.device_limit], strict=True):
                if cache is not None:
                    cache[slot].copy_(host, non_blocking=True)
            self._slots[block] = slot
        else:
            self._slots.move_to_end(block)
        return tuple(None if p is None else p[slot] for p in self._cache)  # type: ignore[return-value]

    def _grow_pool(self, capacity: int) -> None:
        grown = self._empty(capacity)
        for old, new in zip(self._pool, grown, strict=True):
            if old is not None:
                new[: old.shape[0]] = old
        self._pool = grown

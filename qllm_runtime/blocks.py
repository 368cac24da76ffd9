"""BlockStore: where one layer's finished memory blocks live.

Blocks 0 .. device_limit-1 sit in a device pool (gathered by index on the device, no host sync);
later blocks are offloaded to CPU (pinned when the device is CUDA) and served through a per-layer
device LRU cache of `max_cached` slots. `device_limit` = inf puts everything in the pool, 0 offloads
everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import Tensor


class BlockStore:
    """K/V of full blocks: each block is (kv_heads, block_size, head_dim)."""

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
    ) -> None:
        self.shape = (kv_heads, block_size, head_dim)
        self.dtype, self.device = dtype, device
        self.device_limit = device_limit
        self.n_blocks = 0
        pool = min(device_limit, max(expected_blocks, 16))
        self._pool_k = torch.empty((pool, *self.shape), dtype=dtype, device=device)
        self._pool_v = torch.empty_like(self._pool_k)
        self._host_k: list[Tensor] = []  # offloaded blocks, index = block - device_limit
        self._host_v: list[Tensor] = []
        self._pin = device.type == "cuda"
        self._cache_k = torch.empty((max_cached, *self.shape), dtype=dtype, device=device)
        self._cache_v = torch.empty_like(self._cache_k)
        self._slots: OrderedDict[int, int] = OrderedDict()  # block -> cache slot, least recently used first
        self.cache_misses = 0

    @property
    def offloaded(self) -> int:
        return len(self._host_k)

    def add(self, k: Tensor, v: Tensor) -> None:
        """Append blocks. k, v: (count, kv_heads, block_size, head_dim)."""
        first, count = self.n_blocks, k.shape[0]
        pooled = max(0, min(count, self.device_limit - first))
        if pooled:
            if first + pooled > self._pool_k.shape[0]:
                self._grow_pool(min(self.device_limit, max(2 * self._pool_k.shape[0], first + pooled)))
            self._pool_k[first : first + pooled] = k[:pooled]
            self._pool_v[first : first + pooled] = v[:pooled]
        for i in range(pooled, count):
            host_k = torch.empty(self.shape, dtype=self.dtype, pin_memory=self._pin)
            host_v = torch.empty(self.shape, dtype=self.dtype, pin_memory=self._pin)
            host_k.copy_(k[i])
            host_v.copy_(v[i])
            self._host_k.append(host_k)
            self._host_v.append(host_v)
        self.n_blocks += count

    def export(self) -> tuple[Tensor, Tensor]:
        """K and V of every block, pooled and offloaded, in order: (n_blocks, kv_heads, block_size, head_dim)."""
        pooled = min(self.n_blocks, self.device_limit)
        if not self._host_k:
            return self._pool_k[:pooled], self._pool_v[:pooled]
        k = torch.cat([self._pool_k[:pooled].cpu(), torch.stack(self._host_k)])
        return k, torch.cat([self._pool_v[:pooled].cpu(), torch.stack(self._host_v)])

    def key_chunks(self, per_chunk: int) -> Iterator[Tensor]:
        """Every block's keys in order, on the device, in chunks (c <= per_chunk, kv_heads, block_size, head_dim);
        offloaded blocks are copied over chunk by chunk."""
        pooled = min(self.n_blocks, self.device_limit)
        for start in range(0, pooled, per_chunk):
            yield self._pool_k[start : min(pooled, start + per_chunk)]
        for start in range(0, len(self._host_k), per_chunk):
            yield torch.stack(self._host_k[start : start + per_chunk]).to(self.device, non_blocking=True)

    def truncate(self, n_blocks: int) -> None:
        """Forget blocks n_blocks.. (restoring a memory after a question)."""
        keep_host = max(0, n_blocks - self.device_limit)
        del self._host_k[keep_host:], self._host_v[keep_host:]
        for block in [b for b in self._slots if b >= n_blocks]:
            del self._slots[block]
        self.n_blocks = n_blocks

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of the given blocks, concatenated per KV head: (kv_heads, m * block_size, head_dim).

        indices: (1, m), the same blocks for every KV head, or (kv_heads, m), row h for KV head h.
        """
        kv_heads, block_size, head_dim = self.shape
        m = indices.shape[1]
        heads = torch.arange(kv_heads, device=self.device)[:, None]  # (kv_heads, 1)
        if self.n_blocks <= self.device_limit:  # all pooled: stays on the device, no host sync
            k, v = self._pool_k[indices.expand(kv_heads, m), heads], self._pool_v[indices.expand(kv_heads, m), heads]
        else:
            blocks = indices.expand(kv_heads, m).tolist()  # host sync: offloaded blocks go through the LRU cache
            k = torch.empty((kv_heads, m, block_size, head_dim), dtype=self.dtype, device=self.device)
            v = torch.empty_like(k)
            for h, row in enumerate(blocks):
                for i, block in enumerate(row):  # copy at once: a later miss may reuse this slot
                    block_k, block_v = self._fetch(block)
                    k[h, i], v[h, i] = block_k[h], block_v[h]
        return k.reshape(kv_heads, m * block_size, head_dim), v.reshape(kv_heads, m * block_size, head_dim)

    def _fetch(self, block: int) -> tuple[Tensor, Tensor]:
        if block < self.device_limit:
            return self._pool_k[block], self._pool_v[block]
        slot = self._slots.get(block)
        if slot is None:
            self.cache_misses += 1
            if len(self._slots) < self._cache_k.shape[0]:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            self._cache_k[slot].copy_(self._host_k[block - self.device_limit], non_blocking=True)
            self._cache_v[slot].copy_(self._host_v[block - self.device_limit], non_blocking=True)
            self._slots[block] = slot
        else:
            self._slots.move_to_end(block)
        return self._cache_k[slot], self._cache_v[slot]

    def _grow_pool(self, capacity: int) -> None:
        for name in ("_pool_k", "_pool_v"):
            old = getattr(self, name)
            new = torch.empty((capacity, *self.shape), dtype=self.dtype, device=self.device)
            new[: old.shape[0]] = old
            setattr(self, name, new)

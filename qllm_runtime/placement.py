"""Where a reading's memory blocks go: the first ones per layer in a device pool, the rest offloaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QLLMConfig
from .layout import BlockLayout

UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Placement:
    """Where blocks go: the first `device_limit` per layer in the device pool, the rest offloaded to host memory;
    `expected_blocks` (per layer, the whole reading) sizes the first allocations."""

    device_limit: int
    expected_blocks: int = 0


def plan_placement(config: QLLMConfig, n_tokens: int, device: torch.device, kv_bytes_per_token: int) -> Placement:
    """Placement for a reading of about `n_tokens` tokens. `kv_bytes_per_token`: one token's keys and
    values over all layers. `offload`: "device" pools everything, "cpu" nothing, "auto" as many blocks as
    fit `device_pool_gb` (None: half the free accelerator memory; unlimited on the CPU)."""
    expected = BlockLayout.of(config).count(n_tokens) + 1
    if config.offload == "device":
        limit = UNLIMITED
    elif config.offload == "cpu":
        limit = 0
    elif config.device_pool_gb is None and device.type != "cuda":
        limit = UNLIMITED
    else:
        budget = (config.device_pool_gb * 2**30 if config.device_pool_gb is not None
                  else 0.5 * torch.cuda.mem_get_info(device)[0])
        limit = int(budget // (kv_bytes_per_token * config.block_size))
    return Placement(limit, expected)

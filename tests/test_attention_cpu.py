"""The CPU fast path (`attention_cpu.attend_tiled`) against the reference attention, on random inputs."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime.attention import attend_reference
from qllm_runtime.attention_cpu import attend_tiled

from .test_kernels import ATTENTION_DIMS, ATTENTION_SHAPES, FAR_POSITIONS, _attention_case, attend_received

MANY_TILES = [  # prefill groups longer than a tile, windows shorter and longer than a tile
    pytest.param(6, 2, 64, 300, 400, 90, 128, id="gqa3-300q-window128"),
    pytest.param(4, 4, 32, 257, 300, 40, 200, id="mha-257q-window200"),
    pytest.param(9, 3, 64, 512, 1023, 700, 512, id="smollm2-shape-512q"),
]


@FAR_POSITIONS
@pytest.mark.parametrize("tile", [128, 7])
@pytest.mark.parametrize(ATTENTION_DIMS, ATTENTION_SHAPES + MANY_TILES)
def test_tiled_attention_matches_reference(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, ordered, tile):
    case = _attention_case(heads, kv_heads, head_dim, n_q, n_loc, n_far, n_local, torch.float32, ordered=ordered)
    out, received = attend_received(attend_tiled, **case, tile=tile)
    ref_out, ref_received = attend_received(attend_reference, **case)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and received.shape == ref_received.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received, ref_received, rtol=1e-5, atol=1e-5)


def test_tiled_attention_keeps_the_query_dtype():
    case = _attention_case(4, 2, 64, 19, 50, 40, 32, torch.bfloat16, seed=1, ordered=True)
    out, received = attend_received(attend_tiled, **case)
    ref_out, ref_received = attend_received(attend_reference, **case)
    assert out.dtype == torch.bfloat16 and received.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(received, ref_received, rtol=1e-4, atol=1e-4)

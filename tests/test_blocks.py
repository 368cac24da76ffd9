"""Block storage: float8 blocks come back as their de-quantised values on every path (pool, offload, export)."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.blocks import FP8_MAX, BlockStore, dequantize, quantize, representatives_reference
from tests.conftest import TINY_WINDOWS, random_ids, session_logits, tiny_model

SHAPE = (2, 8, 16)  # kv_heads, block_size, head_dim


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, n * SHAPE[0]).view(n, SHAPE[0], 1, 1)  # blocks and heads of any magnitude
    return torch.randn(n, *SHAPE, generator=g) * scale


def test_quantize_keeps_e4m3_precision_per_block_and_head():
    x = blocks(6)
    bits, scale = quantize(x)
    assert bits.dtype == torch.uint8 and scale.shape == (6, SHAPE[0])
    back = dequantize(bits, scale, torch.float32)
    # 3 mantissa bits: at most half a step (1/16 relative) off, or the subnormal step near zero
    bound = x.abs() / 16 + scale[..., None, None] * 2.0**-9
    assert ((back - x).abs() <= bound).all()
    assert torch.allclose(back.abs().amax(dim=(-2, -1)), x.abs().amax(dim=(-2, -1)))  # the peak maps exactly
    assert (back != x).any()  # it does quantise
    assert torch.equal(quantize(back)[0], bits)  # stable: a saved and re-loaded memory keeps its values
    assert (bits.view(torch.float8_e4m3fn).float().abs() <= FP8_MAX).all()


@pytest.mark.parametrize("device_limit", [100, 3, 0])
def test_fp8_store_gathers_what_it_stored_on_every_path(device_limit):
    x_k, x_v = blocks(7, seed=1), blocks(7, seed=2)
    store = BlockStore(*SHAPE, torch.float32, torch.device("cpu"), device_limit, fp8=True)
    store.add(x_k[:4], x_v[:4])
    store.add(x_k[4:], x_v[4:])
    want_k, want_v = (dequantize(*quantize(x), torch.float32) for x in (x_k, x_v))
    k, v = store.export()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert torch.equal(torch.cat(list(store.key_chunks(3))), want_k)
    per_head = torch.tensor([[6, 0, 3], [2, 5, 5]])  # pooled and offloaded, repeats, any order
    k, v = store.gather(per_head)
    for h in range(SHAPE[0]):
        assert torch.equal(k[h].view(3, *SHAPE[1:]), want_k[per_head[h], h])
        assert torch.equal(v[h].view(3, *SHAPE[1:]), want_v[per_head[h], h])
    store.truncate(5)
    store.add(x_k[:1], x_v[:1])
    assert torch.equal(store.gather(torch.tensor([[5, 4]]))[0][0].view(2, *SHAPE[1:]), want_k[[0, 4], 0])


@pytest.mark.parametrize("device_limit", [100, 5, 3, 0], ids=["pooled", "straddling", "after-pool", "offloaded"])
def test_blocks_added_with_their_representatives_on_every_path(device_limit):
    """`add(..., represent)` writes the blocks' representative keys wherever the blocks go (the pool, the host, or
    both in one add), as `representatives_reference` of their keys; the blocks are stored as without them."""
    x_k, x_v = blocks(7, seed=5), blocks(7, seed=6)
    heads, repr_topk = 4, 3
    scores = torch.randperm(heads * 4 * SHAPE[1], generator=torch.Generator().manual_seed(7)).float().view(heads, -1)
    store = BlockStore(*SHAPE, torch.float32, torch.device("cpu"), device_limit, fp8=True)
    got = torch.full((7, heads, SHAPE[2]), float("nan"))
    store.add(x_k[:3], x_v[:3])
    store.add(x_k[3:], x_v[3:], (scores, repr_topk, got[3:]))
    want = torch.full_like(got, float("nan"))
    representatives_reference(x_k[3:].transpose(0, 1).flatten(1, 2), scores, repr_topk, want[3:])
    assert torch.allclose(got, want, equal_nan=True)
    assert not got[3:].isnan().any() and got[:3].isnan().all()
    assert torch.equal(store.export()[0], dequantize(*quantize(x_k), torch.float32))


@pytest.mark.parametrize("fp8", [False, True], ids=["stored", "fp8"])
def test_offloaded_blocks_outgrow_their_first_room(fp8):
    """More offloaded blocks than the reading was expected to make (a long answer): the host planes grow, every
    block keeps its values, and a truncated store takes new blocks where the dropped ones were."""
    x_k, x_v = blocks(45, seed=3), blocks(45, seed=4)
    store = BlockStore(*SHAPE, torch.float32, torch.device("cpu"), 3, expected_blocks=5, fp8=fp8)
    for start in range(0, 40, 7):  # uneven chunks, the first one split between pool and host
        store.add(x_k[start : min(40, start + 7)], x_v[start : min(40, start + 7)])
    assert store.n_blocks == 40 and store.offloaded == 37 and store._host.k.shape[0] >= 37
    stored = (lambda x: dequantize(*quantize(x), torch.float32)) if fp8 else (lambda x: x)
    want_k, want_v = stored(x_k), stored(x_v)
    assert torch.equal(store.export()[0], want_k[:40])
    picked = torch.tensor([[39, 0, 2, 3, 17]])
    k, v = store.gather(picked)
    assert torch.equal(k.view(2, 5, *SHAPE[1:]).transpose(0, 1), want_k[picked[0]])
    assert torch.equal(v.view(2, 5, *SHAPE[1:]).transpose(0, 1), want_v[picked[0]])
    store.truncate(10)
    store.add(x_k[40:], x_v[40:])
    assert torch.equal(store.export()[0], torch.cat([want_k[:10], want_k[40:]]))
    assert torch.equal(torch.cat(list(store.key_chunks(4))), torch.cat([want_k[:10], want_k[40:]]))


def test_fp8_pool_takes_a_quarter_of_float32():
    def pool_bytes(fp8: bool) -> int:
        store = BlockStore(*SHAPE, torch.float32, torch.device("cpu"), 100, expected_blocks=64, fp8=fp8)
        return sum(p.numel() * p.element_size() for p in store._pool.tensors() if p is not None)

    assert pool_bytes(True) < 0.26 * pool_bytes(False)


def test_fp8_blocks_every_attention_path_agrees(tokenizer, monkeypatch):
    model = tiny_model("qwen2", len(tokenizer))
    ids = random_ids(600, len(tokenizer))
    fp8 = QLLMConfig(kv_dtype="float8_e4m3", **TINY_WINDOWS)
    fast = session_logits(QLLMEngine(model, tokenizer, fp8), ids, 4)
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")  # the PyTorch reference attention over the same blocks
    reference = session_logits(QLLMEngine(model, tokenizer, fp8), ids, 4)
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_blocks_change_the_logits_little(tokenizer, arch):
    """Every block selected, so both runs attend the same blocks (with top-k a near tie may flip one lookup)."""
    model = tiny_model(arch, len(tokenizer))
    ids = random_ids(600, len(tokenizer))
    windows = {**TINY_WINDOWS, "topk": 100}
    auto = session_logits(QLLMEngine(model, tokenizer, QLLMConfig(**windows)), ids, 4)
    fp8 = session_logits(QLLMEngine(model, tokenizer, QLLMConfig(kv_dtype="float8_e4m3", **windows)), ids, 4)
    for a, f in zip(auto, fp8, strict=True):
        assert (a - f).abs().max() < 0.03 * a.std()
        assert a.argmax() == f.argmax()
    assert all(not torch.equal(a, f) for a, f in zip(auto, fp8, strict=True))


def test_recent_makes_each_result_once_and_forgets_at_its_limit():
    """`Recent` (the views a lookup group takes again): a key's result is made once and returned as that object, until
    `limit` keys are held, when all are forgotten, or until `clear`."""
    from qllm_runtime.recent import Recent

    made = []
    recent = Recent(2)

    def get(key):
        return recent.get(key, lambda: made.append(key) or [key])

    first = get("a")
    assert get("a") is first and made == ["a"]
    get("b")
    get("c")  # the limit: "a" and "b" forgotten
    assert get("a") is not first and made == ["a", "b", "c", "a"]
    recent.clear()
    get("a")
    assert made == ["a", "b", "c", "a", "a"]

"""Block memory against ordinary attention: a covering window is exactly full attention for every registered
policy, and `ordered` far positions with every block looked up are exactly full attention at any window."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.policies import POLICIES

from .conftest import COVERING, random_ids, session_logits

FAR_POSITIONS = ["shared", "ordered"]


def assert_same_logits(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("far_positions", FAR_POSITIONS)
@pytest.mark.parametrize("mode", sorted(POLICIES))
def test_covering_window_equals_full_attention(tiny, mode, far_positions):
    _, model, tokenizer = tiny
    ids = random_ids(150, len(tokenizer), seed=1)
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    ours = QLLMEngine(model, tokenizer, QLLMConfig(mode=mode, far_positions=far_positions, **COVERING))
    assert_same_logits(session_logits(ours, ids, 5), session_logits(full, ids, 5))


@pytest.mark.parametrize("window", [(0, 16, 8, 16, 64), (4, 32, 8, 5, 40), (3, 9, 5, 1, 7)],
                         ids=lambda w: "init{}-local{}-bs{}-lookup{}-prefill{}".format(*w))
@pytest.mark.parametrize("lookup_heads", ["all", "kv_head"])
def test_ordered_with_every_block_looked_up_is_full_attention(tiny, window, lookup_heads):
    """With every block selected, the ordered far set is the whole past in order: the same sequence as full
    attention, whatever the window, block and chunk sizes (prefill and decode)."""
    _, model, tokenizer = tiny
    n_init, n_local, block_size, lookup_chunk, prefill_chunk = window
    ids = random_ids(150, len(tokenizer), seed=2)
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    ordered = QLLMEngine(model, tokenizer, QLLMConfig(
        mode="infllm", far_positions="ordered", n_init=n_init, n_local=n_local, block_size=block_size, topk=1000,
        repr_topk=1, lookup_chunk=lookup_chunk, prefill_chunk=prefill_chunk, lookup_heads=lookup_heads,
    ))
    assert_same_logits(session_logits(ordered, ids, 6), session_logits(full, ids, 6))


def test_shared_with_every_block_looked_up_is_not_full_attention(tiny):
    """The check above can fail: shared far positions differ from full attention even with every block."""
    _, model, tokenizer = tiny
    ids = random_ids(150, len(tokenizer), seed=2)
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    shared = QLLMEngine(model, tokenizer, QLLMConfig(mode="infllm", far_positions="shared", n_init=4, n_local=32,
                                                     block_size=8, topk=1000))
    assert not torch.allclose(session_logits(shared, ids, 0)[0], session_logits(full, ids, 0)[0], atol=1e-4)


def test_ordered_same_greedy_answer_as_full_attention(tiny):
    _, model, tokenizer = tiny
    context = "Tiny models say odd things. " * 20
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full")).ask(context, "What?", max_new_tokens=12)
    config = QLLMConfig(mode="qllm", far_positions="ordered", n_init=4, n_local=32, block_size=8, topk=1000)
    ours = QLLMEngine(model, tokenizer, config).ask(context, "What?", max_new_tokens=12)
    assert ours.text == full.text
    assert ours.usage.generated_tokens == full.usage.generated_tokens


def test_covering_window_same_greedy_answer(tiny):
    _, model, tokenizer = tiny
    context = "Tiny models say odd things. " * 20
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full")).ask(context, "What?", max_new_tokens=12)
    ours = QLLMEngine(model, tokenizer, QLLMConfig(mode="qllm", **COVERING)).ask(context, "What?", max_new_tokens=12)
    assert ours.text == full.text
    assert ours.usage.generated_tokens == full.usage.generated_tokens


def test_small_window_differs_from_full(tiny):
    """The covering check can fail: with a small window the logits do move away from full attention."""
    _, model, tokenizer = tiny
    ids = random_ids(150, len(tokenizer), seed=1)
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    small = QLLMEngine(model, tokenizer, QLLMConfig(**{**COVERING, "n_local": 32}))
    assert not torch.allclose(session_logits(full, ids, 0)[0], session_logits(small, ids, 0)[0], atol=1e-4)


def test_model_left_usable_for_plain_generate(tiny):
    """An engine call must leave the shared model as it found it."""
    _, model, tokenizer = tiny
    before = model.config._attn_implementation
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    QLLMEngine(model, tokenizer, QLLMConfig(**COVERING)).ask("Some context. " * 10, "Why?", max_new_tokens=3)
    assert model.config._attn_implementation == before
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), reference)

"""Block memory against ordinary attention: a covering window is exactly full attention for every registered
policy, and `ordered` far positions with every block looked up are exactly full attention at any window."""

from __future__ import annotations

import sys

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
        full_within_window=False,
    ))
    assert_same_logits(session_logits(ordered, ids, 6), session_logits(full, ids, 6))


def test_shared_with_every_block_looked_up_is_not_full_attention(tiny):
    """The check above can fail: shared far positions differ from full attention even with every block."""
    _, model, tokenizer = tiny
    ids = random_ids(150, len(tokenizer), seed=2)
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    shared = QLLMEngine(model, tokenizer, QLLMConfig(mode="infllm", far_positions="shared", n_init=4, n_local=32,
                                                     block_size=8, topk=1000, full_within_window=False))
    assert not torch.allclose(session_logits(shared, ids, 0)[0], session_logits(full, ids, 0)[0], atol=1e-4)


def test_ordered_same_greedy_answer_as_full_attention(tiny):
    _, model, tokenizer = tiny
    context = "Tiny models say odd things. " * 20
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full")).ask(context, "What?", max_new_tokens=12)
    config = QLLMConfig(mode="qllm", far_positions="ordered", n_init=4, n_local=32, block_size=8, topk=1000,
                        full_within_window=False)
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
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**COVERING))
    first = engine.ask("Some context. " * 10, "Why?", max_new_tokens=3)
    assert model.config._attn_implementation == before
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), reference)
    # the user switches the model's implementation between calls: the engine restores theirs, answers the same
    model.set_attn_implementation("eager")
    try:
        assert engine.ask("Some context. " * 10, "Why?", max_new_tokens=3).text == first.text
        assert model.config._attn_implementation == "eager"
        assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
    finally:
        model.set_attn_implementation(before)


def test_identity_rope_is_skipped_inside_engine_forwards_only(tiny, monkeypatch):
    """At position 0 the model's RoPE is the identity: inside the engine's forwards its apply_rotary_pos_emb hands
    q and k back untouched (no passes over them), outside them (a plain forward) it rotates as before. Not where
    position 0 scales them (YaRN's attention scaling): that still runs."""
    _, model, tokenizer = tiny
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**COVERING))
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotated = []
    rotate_half = module.rotate_half
    monkeypatch.setattr(module, "rotate_half", lambda x: rotated.append(x.shape) or rotate_half(x))
    session_logits(engine, random_ids(40, len(tokenizer)), 2)
    assert (not rotated) == (engine._rope.attention_scaling == 1.0)
    rotated.clear()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert len(rotated) == 2 * model.config.num_hidden_layers  # q and k of every layer


# ---- full_within_window: a reading that fits the model's trained window is held with full attention ----------
WINDOW = 1500  # a tiny qwen2's trained window for these tests (its RoPE does not depend on it)
NEAR = dict(n_init=4, n_local=32, block_size=8, topk=2, lookup_chunk=16, prefill_chunk=64)


def assert_same_answer(got, expected) -> None:
    assert (got.text, got.blocks, got.usage, got.full_attention) == (
        expected.text, expected.blocks, expected.usage, expected.full_attention)


@pytest.fixture
def windowed(tokenizer):
    from .conftest import tiny_model

    model = tiny_model("qwen2", len(tokenizer), seed=5)
    model.config.max_position_embeddings = WINDOW
    return model, tokenizer


def test_within_window_single_shot_is_full_attention_and_beyond_it_block_memory(windowed):
    model, tokenizer = windowed
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full"))
    within = QLLMEngine(model, tokenizer, QLLMConfig(**NEAR))
    blocks = QLLMEngine(model, tokenizer, QLLMConfig(**NEAR, full_within_window=False))
    short = "Tiny models say odd things. " * 30  # ~180 tokens + question + 12 generated < WINDOW
    answer = within.ask(short, "What?", max_new_tokens=12)
    assert answer.full_attention and not answer.blocks
    assert answer.text == full.ask(short, "What?", max_new_tokens=12).text
    assert not blocks.ask(short, "What?", max_new_tokens=12).full_attention
    offloaded = QLLMEngine(model, tokenizer, QLLMConfig(**NEAR, offload="cpu"))  # blocks kept off the device:
    assert not offloaded.ask(short, "What?", max_new_tokens=12).full_attention  # so is the reading
    long = "Tiny models say odd things. " * 300  # ~1.8K tokens: past the window, so block memory as configured
    answer = within.ask(long, "What?", max_new_tokens=12)
    assert not answer.full_attention and answer.blocks
    assert_same_answer(answer, blocks.ask(long, "What?", max_new_tokens=12))


def test_read_once_within_window_then_extended_past_it_reads_again_as_block_memory(windowed, tmp_path):
    model, tokenizer = windowed
    within = QLLMEngine(model, tokenizer, QLLMConfig(**NEAR))
    blocks = QLLMEngine(model, tokenizer, QLLMConfig(**NEAR, full_within_window=False))
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full"))
    first, more = "Tiny models say odd things. " * 30, " Other lines follow here." * 80  # ~180, then ~400 tokens
    memory, reference = within.read(first), full.read(first)
    assert memory.ask("What?", max_new_tokens=8).full_attention
    assert memory.ask("What?", max_new_tokens=8).text == reference.ask("What?", max_new_tokens=8).text
    loaded = within.load_memory(memory.save(tmp_path / "full.qmem"))  # a full reading loads as one
    assert loaded.ask("What?", max_new_tokens=8).text == reference.ask("What?", max_new_tokens=8).text
    # a question and answer longer than the window holds: answered from the same tokens read as block memory, as
    # an engine without the option answers; the memory itself stays a full reading
    big = memory.ask("What?", max_new_tokens=WINDOW)
    assert not big.full_attention and big.usage.cached_tokens == 0
    expected = blocks.read(first)
    assert big.text == expected.ask("What?", max_new_tokens=WINDOW).text
    assert memory.ask("What?", max_new_tokens=8).full_attention
    memory.extend(more)  # the memory grows past the window: it becomes block memory
    expected.extend(more)
    assert_same_answer(memory.ask("Why?", max_new_tokens=8), expected.ask("Why?", max_new_tokens=8))

"""With a window covering the whole sequence, block memory must be exactly ordinary attention."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine

COVERING = dict(n_init=8, n_local=4096, block_size=16, topk=2, lookup_chunk=16, prefill_chunk=64)


def feed_logits(engine: QLLMEngine, ids: list[int], decode_steps: int) -> list[torch.Tensor]:
    """Logits after a chunked prefill of `ids`, then after each of `decode_steps` single-token steps."""
    session = engine._new_session(len(ids) + decode_steps)
    logits = [session.feed(ids)]
    for step in range(decode_steps):
        logits.append(session.feed([ids[step]]))
    return logits


@pytest.mark.parametrize("mode", ["qllm", "infllm", "streaming"])
def test_covering_window_equals_full_attention(tiny, mode):
    _, model, tokenizer = tiny
    ids = torch.randint(0, len(tokenizer), (150,), generator=torch.Generator().manual_seed(1)).tolist()
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    ours = QLLMEngine(model, tokenizer, QLLMConfig(mode=mode, **COVERING))
    expected, got = feed_logits(full, ids, 5), feed_logits(ours, ids, 5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_covering_window_same_greedy_answer(tiny):
    _, model, tokenizer = tiny
    context = "Tiny models say odd things. " * 20
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full")).ask(context, "What?", max_new_tokens=12)
    ours = QLLMEngine(model, tokenizer, QLLMConfig(mode="qllm", **COVERING)).ask(context, "What?", max_new_tokens=12)
    assert ours.text == full.text
    assert ours.usage.generated_tokens == full.usage.generated_tokens


def test_small_window_differs_from_full(tiny):
    """The check above can fail: with a small window the logits do move away from full attention."""
    _, model, tokenizer = tiny
    ids = torch.randint(0, len(tokenizer), (150,), generator=torch.Generator().manual_seed(1)).tolist()
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))
    small = QLLMEngine(model, tokenizer, QLLMConfig(**{**COVERING, "n_local": 32}))
    assert not torch.allclose(feed_logits(full, ids, 0)[0], feed_logits(small, ids, 0)[0], atol=1e-4)


def test_model_left_usable_for_plain_generate(tiny):
    """An engine call must leave the shared model as it found it."""
    _, model, tokenizer = tiny
    before = model.config._attn_implementation
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    QLLMEngine(model, tokenizer, QLLMConfig(**COVERING)).ask("Some context. " * 10, "Why?", max_new_tokens=3)
    assert model.config._attn_implementation == before
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), reference)

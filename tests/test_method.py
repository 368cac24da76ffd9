"""Properties of the method on a tiny random Llama: exact-once attention, β = 0 is InfLLM, memory restore."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import qllm_runtime.engine as engine_module
from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.attention import attend_reference
from qllm_runtime.memory import LayerMemory, ModelMemory
from qllm_runtime.rope import RotaryTables

from .conftest import BLOCK_MODES, TINY_WINDOWS, random_ids, tiny_model


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_model("llama", len(tokenizer)), tokenizer


class AttendedPositions:
    """Wraps the reference attention and records, per layer call order, which key positions each query saw."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[int, Counter]] = {}  # layer -> query position -> attended key counts
        self.layer = -1

    def op(self, device, head_dim):
        return self.attend

    def wrap(self, layer_attend):
        def attend(memory, layer_idx, *args):
            self.layer = layer_idx
            return layer_attend(memory, layer_idx, *args)

        return attend

    def attend(self, query, q_start, local_k, local_v, local_start, far_k, far_v, far_pos, cos, sin, n_local,
               scaling, far_origin=None, received=None, out=None):
        record = self.seen.setdefault(self.layer, {})
        for q in range(q_start, q_start + query.shape[1]):
            counts = record.setdefault(q, Counter())
            counts.update(k for k in range(local_start, local_start + local_k.shape[1]) if 0 <= q - k < n_local)
            counts.update(k for k in far_pos.tolist() if q - k >= n_local)
        return attend_reference(query, q_start, local_k, local_v, local_start, far_k, far_v, far_pos, cos, sin,
                                n_local, scaling, far_origin=far_origin, received=received, out=out)


def run_recorded(model, tokenizer, config: QLLMConfig, ids: list[int], decode: int, monkeypatch):
    recorder = AttendedPositions()
    monkeypatch.setattr(engine_module, "attention_op", recorder.op)
    monkeypatch.setattr(ModelMemory, "attend", recorder.wrap(ModelMemory.attend))
    engine = QLLMEngine(model, tokenizer, config)
    session = engine._new_session(len(ids))
    session.feed(ids)
    for token in ids[:decode]:
        session.feed([token])
    layers = [session.memory.layers[i] for i in sorted(session.memory.layers)]
    return recorder, layers


WINDOWS = [  # n_init, n_local, block_size, lookup_chunk, prefill_chunk
    (4, 32, 8, 16, 64),
    (8, 20, 7, 5, 33),
    (0, 16, 4, 16, 16),
    (16, 24, 8, 40, 40),
    (3, 9, 5, 1, 7),
]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "init{}-local{}-bs{}-lookup{}-prefill{}".format(*w))
@pytest.mark.parametrize("topk", [1000, 2])
@pytest.mark.parametrize("mode", BLOCK_MODES)
def test_every_key_attended_exactly_once(llama, window, topk, mode, monkeypatch):
    model, tokenizer = llama
    n_init, n_local, block_size, lookup_chunk, prefill_chunk = window
    config = QLLMConfig(mode=mode, n_init=n_init, n_local=n_local, block_size=block_size, topk=topk, repr_topk=1,
                        lookup_chunk=lookup_chunk, prefill_chunk=prefill_chunk, far_positions="ordered",
                        full_within_window=False)
    ids = random_ids(157, len(tokenizer), seed=3)
    recorder, layers = run_recorded(model, tokenizer, config, ids, decode=12, monkeypatch=monkeypatch)
    total = len(ids) + 12
    assert len(recorder.seen) == len(layers) == model.config.num_hidden_layers
    for record in recorder.seen.values():
        assert sorted(record) == list(range(total))  # every query ran once
        for q, counts in record.items():
            twice = [k for k, c in counts.items() if c > 1]
            assert not twice, f"query {q} attended keys twice: {twice}"
            missing = set(range(q + 1)) - set(counts)
            if topk >= 1000:
                assert not missing, f"query {q} missed keys {sorted(missing)}"
                continue
            assert all(k <= q for k in counts)
            # only whole blocks may be left out, and never the window or init
            assert all(k >= n_init and q - k >= n_local for k in missing)
            blocks_missing = Counter((k - n_init) // block_size for k in missing)
            assert all(n == block_size for n in blocks_missing.values())
    assert all(layer.n_blocks > 2 for layer in layers)


def test_infllm_is_qllm_with_zero_question_weight_and_no_evidence(llama):
    model, tokenizer = llama
    windows = TINY_WINDOWS
    context = " ".join(f"Fact {i}: the box {i} holds {i * 7 % 13} coins." for i in range(40))
    infllm = QLLMEngine(model, tokenizer, QLLMConfig(mode="infllm", **windows)).ask(context, "Box 7?", max_new_tokens=8)
    zero_config = QLLMConfig(mode="qllm", question_weight=0, evidence_tokens=None, **windows)
    zero = QLLMEngine(model, tokenizer, zero_config).ask(context, "Box 7?", max_new_tokens=8)
    assert (infllm.text, infllm.blocks) == (zero.text, zero.blocks)
    heavy = QLLMEngine(model, tokenizer, QLLMConfig(mode="qllm", question_weight=1e4, **windows)).ask(
        context, "Box 7?", max_new_tokens=8
    )
    assert heavy.blocks != infllm.blocks  # the question term does move the lookups


def test_read_once_ask_twice_restores_memory(llama):
    model, tokenizer = llama
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**TINY_WINDOWS))
    context = " ".join(f"Sentence number {i} is here." for i in range(60))
    memory = engine.read(context)
    before = memory.session.snapshot()
    n_blocks = {i: layer.n_blocks for i, layer in memory.session.memory.layers.items()}
    first = memory.ask("Which sentence?", max_new_tokens=40)
    second = memory.ask("Which sentence?", max_new_tokens=40)
    assert (first.text, first.blocks, first.usage) == (second.text, second.blocks, second.usage)
    assert first.usage.cached_tokens == memory.n_tokens
    after = memory.session.snapshot()
    for i, layer in memory.session.memory.layers.items():
        assert layer.n_blocks == n_blocks[i]
        assert layer.question_vector is None
        for name in ("tail_k", "tail_v", "tail_scores"):
            assert torch.equal(getattr(before[i], name), getattr(after[i], name))
    # a different question in between does not change the answer to the first one
    memory.ask("Something else entirely?", max_new_tokens=20)
    assert memory.ask("Which sentence?", max_new_tokens=40).text == first.text


def test_read_once_equals_single_shot_without_question_bias(llama):
    model, tokenizer = llama
    engine = QLLMEngine(model, tokenizer, QLLMConfig(mode="infllm", **TINY_WINDOWS))
    context = " ".join(f"Line {i} says {i * 3}." for i in range(50))
    single = engine.ask(context, "What does line 9 say?", max_new_tokens=10)
    reread = engine.read(context).ask("What does line 9 say?", max_new_tokens=10)
    assert (single.text, single.blocks) == (reread.text, reread.blocks)


def test_offloaded_blocks_give_the_same_answer(llama):
    """Blocks offloaded to host memory (all of them, or all but a few) must not change the result."""
    model, tokenizer = llama
    windows = {**TINY_WINDOWS, "topk": 3}
    context = " ".join(f"Item {i} costs {i * 11 % 17} euros." for i in range(50))
    pooled = QLLMEngine(model, tokenizer, QLLMConfig(offload="device", **windows))
    offloaded = QLLMEngine(model, tokenizer, QLLMConfig(offload="cpu", **windows))
    mixed = QLLMEngine(model, tokenizer, QLLMConfig(offload="auto", device_pool_gb=1e-5, **windows))
    expected = pooled.ask(context, "Item 4?", max_new_tokens=10)
    for engine in (offloaded, mixed):
        got = engine.ask(context, "Item 4?", max_new_tokens=10)
        assert (got.text, got.blocks) == (expected.text, expected.blocks)


def test_the_tail_holds_a_few_lookup_groups_beyond_the_window(llama, monkeypatch):
    """A prefill chunk of many lookup groups appends a few groups' keys at a time (`APPEND_SPAN`), before the first
    of them attends, so a layer's tail never needs more than the window, a block and those groups (plus a fixed
    slack, so tokens leave it without a copy): a larger prefill_chunk costs no memory per layer."""
    model, tokenizer = llama
    grown = []
    monkeypatch.setattr(LayerMemory, "_resize_tail", lambda self, needed: grown.append(needed))
    session = QLLMEngine(model, tokenizer, QLLMConfig(**{**TINY_WINDOWS, "prefill_chunk": 256}))._new_session(1000)
    session.feed(random_ids(1000, len(tokenizer)))
    for token in random_ids(20, len(tokenizer)):
        session.feed([token])
    assert not grown
    room = 32 + 8 + 16 * (LayerMemory.APPEND_SPAN + LayerMemory.TAIL_SLACK)  # window, block, groups, slack
    assert {layer.tail_k.shape[1] for layer in session.memory.layers.values()} == {room}


def test_question_vector_pools_the_most_attended_question_tokens(llama):
    """question_topk=k averages, per head, the k question tokens that received the most attention (per
    query that could see them); k >= the question's length is the plain mean (question_topk=None)."""
    from qllm_runtime.attention import apply_rope
    from qllm_runtime.question import QuestionProbe

    model, _ = llama
    rope = RotaryTables(model, torch.device("cpu"))
    torch.manual_seed(0)
    heads, kv_heads, n, d, start, end, n_local = 4, 2, 12, 16, 3, 10, 32
    query, key, value = torch.randn(heads, n, d), torch.randn(kv_heads, n, d), torch.randn(kv_heads, n, d)
    pooled = {}
    for topk in (None, end - start, 2):
        probe = QuestionProbe(rope, start, end, n_local, topk)
        out = probe.attend(0, query, key, value, d**-0.5)
        pooled[topk] = probe.question.vectors[0]
    cos, sin = rope.get(n_local + 1)
    assert out.shape == (n, heads, d)
    torch.testing.assert_close(pooled[None], apply_rope(query[:, start:end].mean(1), cos[n_local], sin[n_local]))
    torch.testing.assert_close(pooled[end - start], pooled[None])
    # recompute the received attention by hand and check the two picked tokens per head
    q, k = apply_rope(query, cos[:n], sin[:n]), apply_rope(key, cos[:n], sin[:n]).repeat_interleave(2, dim=0)
    probs = (q @ k.transpose(1, 2) * d**-0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    received = probs.softmax(-1).sum(1) / torch.arange(n, 0, -1)
    top = received[:, start:end].topk(2).indices + start
    expected = torch.stack([query[h, top[h]].mean(0) for h in range(heads)])
    torch.testing.assert_close(pooled[2], apply_rope(expected, cos[n_local], sin[n_local]))
    assert not torch.allclose(pooled[2], pooled[None])


def test_pinned_question_blocks_stay_attended_while_answering(llama, monkeypatch):
    """With pin_question_blocks, every generated token attends the blocks its question turn looked up."""
    model, tokenizer = llama
    config = QLLMConfig(mode="infllm", pin_question_blocks=True, far_positions="ordered", **TINY_WINDOWS)
    recorder = AttendedPositions()
    monkeypatch.setattr(engine_module, "attention_op", recorder.op)
    monkeypatch.setattr(ModelMemory, "attend", recorder.wrap(ModelMemory.attend))
    context, turn = random_ids(200, len(tokenizer), seed=4), random_ids(10, len(tokenizer), seed=5)
    session = QLLMEngine(model, tokenizer, config)._new_session(230)
    session.feed(context)
    blocks_end = {i: config.n_init + layer.n_blocks * config.block_size for i, layer in session.memory.layers.items()}
    session.feed(turn)
    for token in random_ids(8, len(tokenizer), seed=6):
        session.feed([token])
    question_end = len(context) + len(turn) - 1
    for layer, record in recorder.seen.items():
        looked_up = {k for k in record[question_end] if config.n_init <= k < blocks_end[layer]}
        assert looked_up and len(looked_up) < blocks_end[layer] - config.n_init  # a real subset was picked
        for q in range(question_end + 1, question_end + 9):
            assert looked_up <= set(record[q]), f"layer {layer}, token {q} dropped the question's blocks"


def test_standardized_question_term_is_scale_free():
    """question_scale='standardized' ranks by z(query term) + beta * z(question term): scaling either term's
    inputs changes nothing, beta 0 is InfLLM, and a large beta follows the question alone."""
    from qllm_runtime.policies import POLICIES

    gen = torch.Generator().manual_seed(0)
    queries, repr_keys = torch.randn(3, 4, 16, generator=gen), torch.randn(40, 4, 16, generator=gen)
    question = torch.randn(4, 16, generator=gen)

    def picks(beta: float, u: torch.Tensor, mode: str = "qllm") -> torch.Tensor:
        config = QLLMConfig(mode=mode, question_weight=beta, question_scale="standardized")
        policy = POLICIES[mode](config, torch.device("cpu"))
        return policy.select(queries, repr_keys, policy.block_terms(u, repr_keys), 5).sort().values

    assert torch.equal(picks(1.0, question), picks(1.0, 100 * question))
    assert torch.equal(picks(0.0, question), picks(0.0, question, mode="infllm"))
    by_question = (repr_keys.flatten(1) @ question.flatten()).topk(5).indices.sort().values
    assert all(torch.equal(row, by_question) for row in picks(1e6, question))
    assert not torch.equal(picks(1.0, question), picks(0.0, question))


def test_per_kv_head_lookup_scores_each_head_group_on_its_own(llama):
    """lookup_heads='kv_head': KV head h attends the top-k blocks by the query heads that share it, and the
    gathered keys of row h come from those blocks (pooled and offloaded alike)."""
    from qllm_runtime.attention import apply_rope

    model, tokenizer = llama
    ids = random_ids(300, len(tokenizer), seed=7)
    query = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(8))  # (heads, n_q, head_dim)
    gathered = []
    for offload in ("device", "cpu"):
        config = QLLMConfig(mode="infllm", lookup_heads="kv_head", offload=offload, **TINY_WINDOWS)
        session = QLLMEngine(model, tokenizer, config)._new_session(len(ids))
        session.feed(ids)
        layer = session.memory.layers[0]
        with torch.inference_mode():  # memory tensors are inference tensors
            picked = layer._lookup(query)  # (kv_heads, topk)
            gathered.append(layer.store.gather(picked)[0])
            block_keys = layer.store.gather(picked[1:2])[0]  # the blocks of row 1 for every head
        cos, sin = layer.rope.get(config.n_local + 1)
        far_q = apply_rope(query.mean(1), cos[config.n_local], sin[config.n_local])
        repr_keys = layer.repr_keys[: layer.n_blocks].float()
        for h in range(2):
            scores = (repr_keys[:, 2 * h : 2 * h + 2] * far_q[2 * h : 2 * h + 2]).sum(dim=(1, 2))
            assert picked[h].tolist() == sorted(scores.topk(config.topk).indices.tolist())
        assert not torch.equal(picked[0], picked[1])  # the two KV heads chose differently here
        torch.testing.assert_close(gathered[-1][1], block_keys[1])
    torch.testing.assert_close(gathered[0], gathered[1])


@pytest.mark.parametrize("mode", [m for m in BLOCK_MODES if m != "random"])
def test_follow_blocks_brings_the_blocks_after_a_hit(mode):
    """follow_blocks=f: block b scores max(s[b-f .. b]), so the best block comes with the f blocks after it."""
    from qllm_runtime.policies import POLICIES

    repr_keys = torch.zeros(12, 2, 4)
    repr_keys[5] = 1.0  # only block 5 matches the query
    repr_keys[9] = 0.5  # the runner-up
    queries = torch.ones(1, 2, 4)
    for follow, expected in ((0, [5, 9]), (1, [5, 6]), (2, [5, 6, 7])):
        policy = POLICIES[mode](QLLMConfig(mode=mode, follow_blocks=follow), torch.device("cpu"))
        assert policy.select(queries, repr_keys, None, len(expected))[0].sort().values.tolist() == expected


def test_rope_matrix_rotates_like_apply_rope():
    """x @ rope_matrix(cos, sin) is apply_rope(x, cos, sin) for one position: the lookup's far rotation as one
    matrix product."""
    from qllm_runtime.attention import apply_rope, rope_matrix

    gen = torch.Generator().manual_seed(0)
    for head_dim in (8, 64):
        angles = torch.rand(head_dim // 2, generator=gen) * 1000
        cos, sin = torch.cat([angles, angles]).cos(), torch.cat([angles, angles]).sin()
        x = torch.randn(5, 3, head_dim, generator=gen)
        assert torch.allclose(x @ rope_matrix(cos, sin), apply_rope(x, cos, sin), atol=1e-6)


def test_rotary_tables_that_do_not_repeat_their_first_half_are_told_apart(llama):
    """The kernels read half of each RoPE table row (rotate-half RoPE repeats it); `repeats_half` tells a rotary
    module that does not apart, and the engine refuses one on CUDA."""

    class InterleavedRotaryEmbedding(torch.nn.Module):
        inv_freq = torch.ones(4)

        def forward(self, x, positions):
            angles = positions[..., None].float() * torch.arange(1, 9)  # 8 distinct frequencies, no repeat
            return angles.cos(), angles.sin()

    model, _ = llama
    assert RotaryTables(model, torch.device("cpu")).repeats_half()
    odd = torch.nn.Module()
    odd.rotary_emb = InterleavedRotaryEmbedding()
    assert not RotaryTables(odd, torch.device("cpu")).repeats_half()

"""Evidence blocks: while a question is answered, every layer attends one set of blocks chosen by the attention
the question adds to them (`QLLMConfig.evidence_tokens`)."""

from __future__ import annotations

import pytest
import torch

import qllm_runtime.engine as engine_module
from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.attention import attend_reference
from qllm_runtime.lookup import choose_evidence, question_attention
from qllm_runtime.memory import ModelMemory

from .conftest import TINY_WINDOWS, random_ids, session_logits, tiny_model
from .test_method import AttendedPositions


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_model("llama", len(tokenizer)), tokenizer


def test_question_attention_is_the_attention_the_question_adds():
    """Per head: the most any question token pays a block (one softmax over init + every key, keys shared by
    the query heads of a KV head), less the header tokens' mean; summed over heads. Chunking changes nothing."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, m, n_header, d, block_size, n_blocks, n_init = 4, 2, 5, 3, 8, 3, 7, 2
    question, header = torch.randn(heads, m, d, generator=gen), torch.randn(heads, n_header, d, generator=gen)
    init, keys = torch.randn(kv_heads, n_init, d, generator=gen), torch.randn(n_blocks, kv_heads, block_size, d,
                                                                               generator=gen)
    expected = torch.zeros(n_blocks)
    for h in range(heads):
        every_key = torch.cat([init[h // 2], keys[:, h // 2].reshape(-1, d)])
        def block_share(q, k=every_key):
            return (k @ q).softmax(0)[n_init:].view(n_blocks, block_size).sum(1)
        expected += torch.stack([block_share(q) for q in question[h]]).amax(0)
        expected -= torch.stack([block_share(q) for q in header[h]]).mean(0)
    got = question_attention(question, header, init, [keys[:3], keys[3:5], keys[5:]])
    torch.testing.assert_close(got, expected)
    # without a header the score is the question's own attention; without init tokens only blocks compete
    no_header = question_attention(question, header[:, :0], init[:, :0], [keys])
    assert torch.all(no_header > 0) and not torch.allclose(no_header, got)


def test_choose_evidence_brings_neighbours_and_keeps_document_order():
    scores = torch.tensor([0.0, 5, 1, 0, 0, 3, 0, 0, 0, 0])
    assert choose_evidence(scores, 3, 0).tolist() == [1, 2, 5]
    assert choose_evidence(scores, 3, 1).tolist() == [0, 1, 2]  # the best block with the blocks around it first
    assert choose_evidence(scores, 6, 1).tolist() == [0, 1, 2, 4, 5, 6]
    assert choose_evidence(scores, 50, 1).tolist() == list(range(10))


def test_evidence_by_relevance_lays_the_best_run_last():
    """order="relevance": the same blocks, runs of adjacent ones kept whole and in document order, from the run
    with the lowest best score to the highest (nearest the question); equal runs keep document order."""
    scores = torch.tensor([0.0, 5, 1, 0, 0, 3, 0, 0, 0, 0])
    assert choose_evidence(scores, 3, 0, "relevance").tolist() == [5, 1, 2]
    assert choose_evidence(scores, 6, 1, "relevance").tolist() == [4, 5, 6, 0, 1, 2]
    assert choose_evidence(scores, 50, 1, "relevance").tolist() == list(range(10))  # one run
    tied = torch.tensor([2.0, 0, 0, 2, 0, 0, 1])
    assert choose_evidence(tied, 3, 0, "relevance").tolist() == [6, 0, 3]
    assert choose_evidence(scores[:1], 1, 1, "relevance").tolist() == [0]


def test_every_layer_attends_the_evidence_while_answering(llama, monkeypatch):
    """From the question turn on, each query of every layer attends exactly once: init, the evidence blocks (the
    same in every layer) and every token after the blocks that existed when the evidence was chosen (the turn and
    the answer so far, in blocks made since, the remainder or the window); nothing else."""
    model, tokenizer = llama
    config = QLLMConfig(mode="qllm", evidence_tokens=4 * TINY_WINDOWS["block_size"], **TINY_WINDOWS)
    recorder = AttendedPositions()
    monkeypatch.setattr(engine_module, "attention_op", recorder.op)
    monkeypatch.setattr(ModelMemory, "attend", recorder.wrap(ModelMemory.attend))
    engine = QLLMEngine(model, tokenizer, config)
    context, turn = random_ids(300, len(tokenizer), seed=4), random_ids(10, len(tokenizer), seed=5)
    session = engine._new_session(400)
    session.set_question(engine._question("Which number comes after the word apple?"))
    session.feed(context)
    session.choose_evidence(engine._evidence_blocks())
    layers = session.memory.layers
    evidence = {i: layer.evidence[0].tolist() for i, layer in layers.items()}
    assert len(set(map(tuple, evidence.values()))) == 1 and len(evidence[0]) == 4  # one set, of the budget
    assert evidence[0] != list(range(4))  # chosen, not the first blocks
    blocks_end = config.n_init + layers[0].n_blocks * config.block_size
    chosen = {config.n_init + b * config.block_size + j for b in evidence[0] for j in range(config.block_size)}
    session.feed(turn)
    answer = random_ids(40, len(tokenizer), seed=6)  # long enough to make blocks of its own
    for token in answer:
        session.feed([token])
    assert layers[0].n_blocks > layers[0].evidence_end
    for layer, record in recorder.seen.items():
        for q in range(len(context), len(context) + len(turn) + len(answer)):
            expected = set(range(config.n_init)) | chosen | set(range(blocks_end, q + 1))
            assert record[q] == dict.fromkeys(expected, 1), f"layer {layer}, position {q}"


def test_evidence_of_every_block_is_full_attention(tiny):
    """Ordered far positions with every block read and chosen as evidence: full attention's answer, on every
    architecture; a small budget does change the logits (the check can fail)."""
    _, model, tokenizer = tiny
    context = "Tiny models say odd things. " * 20
    full = QLLMEngine(model, tokenizer, QLLMConfig(mode="full")).ask(context, "What?", max_new_tokens=10)
    windows = dict(n_init=4, n_local=32, block_size=8, topk=1000, full_within_window=False)
    every = QLLMEngine(model, tokenizer, QLLMConfig(evidence_tokens=1 << 16, **windows))
    assert every.ask(context, "What?", max_new_tokens=10).text == full.text
    ids = random_ids(150, len(tokenizer), seed=3)
    small = QLLMEngine(model, tokenizer, QLLMConfig(evidence_tokens=16, **windows))
    for engine in (every, small):  # evidence needs a question: choose it after the read, then decode
        session = engine._new_session(160)
        session.set_question(engine._question("What?"))
        session.feed(ids)
        session.choose_evidence(engine._evidence_blocks())
        engine.logits = [session.feed([token]).float() for token in ids[:3]]
    reference = session_logits(QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64)), ids, 3)[1:]
    for got, want in zip(every.logits, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(small.logits[0], reference[0], atol=1e-3)


def test_evidence_by_relevance_is_attended_in_its_layout(llama, monkeypatch):
    """evidence_order="relevance": each step of the question turn attends the init tokens, then the evidence blocks
    in the order `choose_evidence` lays them out (at consecutive virtual positions); they are the document
    layout's blocks, and the turn's logits change with the layout (the check can fail)."""
    model, tokenizer = llama
    ids, turn = random_ids(400, len(tokenizer), seed=11), random_ids(6, len(tokenizer), seed=12)
    n_init, block = TINY_WINDOWS["n_init"], TINY_WINDOWS["block_size"]
    far_sets = []

    def attend(*args, **kwargs):
        far_sets.append((args[7].tolist(), kwargs["far_origin"]))  # far_pos
        return attend_reference(*args, **kwargs)

    monkeypatch.setattr(engine_module, "attention_op", lambda device, head_dim: attend)
    evidence, logits = {}, {}
    for order in ("document", "relevance"):
        engine = QLLMEngine(model, tokenizer, QLLMConfig(evidence_tokens=6 * block, evidence_neighbors=0,
                                                        evidence_order=order, **TINY_WINDOWS))
        session = engine._new_session(len(ids) + len(turn))
        session.set_question(engine._question("Which number comes after the word apple?"))
        session.feed(ids)
        session.choose_evidence(engine._evidence_blocks())
        evidence[order] = session.memory.layers[0].evidence[0].tolist()
        logits[order] = session.feed(turn).float()
        far_pos, far_origin = far_sets[-1]  # the last layer of the turn's last group
        laid_out = [p for b in evidence[order] for p in range(n_init + b * block, n_init + (b + 1) * block)]
        assert far_origin is not None and far_pos[: n_init + len(laid_out)] == [*range(n_init), *laid_out]
    assert sorted(evidence["relevance"]) == evidence["document"] != evidence["relevance"]
    assert not torch.allclose(logits["relevance"], logits["document"], atol=1e-4)


def test_read_once_ask_many_equals_single_shot_with_evidence(llama):
    """Evidence is chosen after the reading either way: without the question's bias on the reading (beta 0),
    a memory's answer and passages equal the single-shot ones, and a second question leaves it unchanged."""
    model, tokenizer = llama
    engine = QLLMEngine(model, tokenizer, QLLMConfig(question_weight=0.0, evidence_tokens=32, **TINY_WINDOWS))
    context = " ".join(f"Line {i} says {i * 3}." for i in range(50))
    single = engine.ask(context, "What does line 9 say?", max_new_tokens=10)
    memory = engine.read(context)
    first = memory.ask("What does line 9 say?", max_new_tokens=10)
    memory.ask("Something else?", max_new_tokens=5)
    again = memory.ask("What does line 9 say?", max_new_tokens=10)
    assert (single.text, single.blocks) == (first.text, first.blocks) == (again.text, again.blocks)
    assert 0 < len(first.blocks) <= 4  # the budget: 32 tokens = 4 blocks of 8
    assert all(layer.evidence is None for layer in memory.session.memory.layers.values())


def test_passages_are_the_evidence_most_favoured_first(llama):
    model, tokenizer = llama
    context = " ".join(f"Fact {i}: the box {i} holds {i * 7 % 13} coins." for i in range(40))
    answer = QLLMEngine(model, tokenizer, QLLMConfig(evidence_tokens=48, **TINY_WINDOWS)).ask(
        context, "Box 7?", max_new_tokens=4)
    hits = [b.hits for b in answer.blocks]
    assert 0 < len(hits) <= 6 and min(hits) >= 1 and hits == sorted(hits, reverse=True)


def test_random_policy_draws_random_evidence_of_the_same_size(llama):
    model, tokenizer = llama
    ids = random_ids(300, len(tokenizer), seed=9)
    picked = {}
    for mode in ("qllm", "random"):
        engine = QLLMEngine(model, tokenizer, QLLMConfig(mode=mode, evidence_tokens=48, **TINY_WINDOWS))
        session = engine._new_session(len(ids))
        session.set_question(engine._question("Box 7?"))
        session.feed(ids)
        session.choose_evidence(engine._evidence_blocks())
        picked[mode] = session.memory.layers[0].evidence[0].tolist()
    assert len(picked["random"]) == len(picked["qllm"]) == 6 and picked["random"] != picked["qllm"]


def test_without_evidence_answers_look_blocks_up_per_token(llama):
    """evidence_tokens=None and infllm: no evidence is chosen (InfLLM's answer-time lookups); `auto` is half
    the model's trained window."""
    model, tokenizer = llama
    context = " ".join(f"Line {i} says {i * 3}." for i in range(50))
    for config in (QLLMConfig(evidence_tokens=None, **TINY_WINDOWS), QLLMConfig(mode="infllm", **TINY_WINDOWS)):
        engine = QLLMEngine(model, tokenizer, config)
        memory = engine.read(context)
        session = memory.session
        session.set_question(engine._question("Line 9?"))
        if (count := engine._evidence_blocks()) is not None:
            session.choose_evidence(count)
        assert all(layer.evidence is None for layer in session.memory.layers.values())
    auto = QLLMEngine(model, tokenizer, QLLMConfig(**TINY_WINDOWS))
    assert auto._evidence_blocks() == model.config.max_position_embeddings // 2 // TINY_WINDOWS["block_size"]
    model.config.max_position_embeddings = 1 << 17  # a 128K window: capped at 4K tokens
    try:
        assert auto._evidence_blocks() == 4096 // TINY_WINDOWS["block_size"]
    finally:
        model.config.max_position_embeddings = 4096

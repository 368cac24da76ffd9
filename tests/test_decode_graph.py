"""Answer steps with their positions on the device (`qllm_runtime.decode_graph`): the launches a CUDA graph records
and replays equal the ordinary steps. On the CPU they run without a graph, the attention kernel interpreted;
tests/test_gpu.py records and replays them on CUDA."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.decode_graph import DecodeGraph

from .conftest import TINY_WINDOWS, random_ids, tiny_model

qk = pytest.importorskip("qllm_kernels")


def _answer(engine: QLLMEngine, context: list[int], turn: list[int], answer: list[int], graph: bool):
    """Logits after the question turn and after each answer token, the steps the device path took, the session and
    the evidence buffer's first capacity."""
    session = engine._new_session(len(context) + len(turn) + len(answer))
    session.set_question(engine._question("Which number comes after the word apple?"))
    session.feed(context)
    session.choose_evidence(engine._evidence_blocks())
    logits = [session.feed(turn)]
    capacity = session.memory.layers[0]._evidence_buffer.k.shape[1]
    decoder = DecodeGraph(engine.model, session.memory, engine.device, attend=partial(qk.decode_attention),
                          record=False) if graph else None
    taken = 0
    for token in answer:
        out = decoder.step(token) if decoder is not None else None
        taken += out is not None
        logits.append(out if out is not None else session.feed([token]))
    return logits, taken, session, capacity


def test_device_position_steps_equal_the_ordinary_steps(tokenizer):
    """Every answer step takes the device path (blocks made as the answer fills them, the tail compacted, the
    evidence buffer gathered again in place and, once full, anew) and gives the ordinary steps' logits and
    memory. Ordered far positions (the default; shared ones differ only inside the kernel, tests/test_kernels.py)."""
    if not qk.triton_available("cpu"):
        pytest.skip("runs on the CPU with the Triton interpreter; on CUDA the recorded graph is tested below")
    model = tiny_model("llama", len(tokenizer), hidden_size=128)  # head_dim 32: the kernel's smallest
    windows = {**TINY_WINDOWS, "lookup_chunk": 4}  # a short tail: compacted every few steps
    config = QLLMConfig(mode="qllm", evidence_tokens=4 * TINY_WINDOWS["block_size"], **windows)
    engine = QLLMEngine(model, tokenizer, config)
    ids = [random_ids(n, len(tokenizer), seed=seed) for n, seed in ((200, 1), (10, 2), (72, 3))]
    expected, _, ordinary, _ = _answer(engine, *ids, graph=False)
    got, taken, stepped, capacity = _answer(engine, *ids, graph=True)
    assert taken == len(ids[2])
    layer = stepped.memory.layers[0]
    assert layer.n_blocks >= layer.evidence_end + 8 and layer._base > 200  # blocks made, the tail compacted
    assert layer._evidence_buffer.k.shape[1] > capacity  # gathered anew once full
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for idx, state in ordinary.memory.state().items():
        for name, tensor in stepped.memory.layers[idx].state().items():
            torch.testing.assert_close(tensor, state[name], msg=name)


def test_steps_without_evidence_take_the_ordinary_path(tokenizer):
    model = tiny_model("llama", len(tokenizer), hidden_size=128)
    engine = QLLMEngine(model, tokenizer, QLLMConfig(mode="qllm", evidence_tokens=None, **TINY_WINDOWS))
    session = engine._new_session(400)
    session.feed(random_ids(300, len(tokenizer)))
    decoder = DecodeGraph(model, session.memory, engine.device, attend=partial(qk.decode_attention), record=False)
    assert decoder.step(5) is None and session.seen == 300


GPU_WINDOWS = dict(n_init=8, n_local=64, block_size=16, topk=3, lookup_chunk=32, prefill_chunk=256,
                   full_within_window=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("offload", "kv_dtype", "far_positions"), [
    ("device", "auto", "ordered"), ("cpu", "auto", "ordered"), ("device", "float8_e4m3", "ordered"),
    ("device", "auto", "shared")])
def test_recorded_steps_replay_as_the_ordinary_steps(tokenizer, dtype, offload, kv_dtype, far_positions):
    """On CUDA the session records one graph for the answer and replays it for every later step (blocks made
    meanwhile, the evidence buffer refilled in place): the logits of the ordinary steps."""
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda", dtype)  # head_dim 64
    ids = [random_ids(n, len(tokenizer), seed=seed) for n, seed in ((700, 1), (12, 2), (100, 3))]

    def run(graphs: bool):
        config = QLLMConfig(decode_graphs=graphs, evidence_tokens=64, offload=offload, kv_dtype=kv_dtype,
                            far_positions=far_positions, **GPU_WINDOWS)
        engine = QLLMEngine(model, tokenizer, config)
        session = engine._new_session(sum(map(len, ids)))
        session.set_question(engine._question("Which number comes after the word apple?"))
        session.feed(ids[0])
        session.choose_evidence(engine._evidence_blocks())
        logits, recorded = [session.feed(ids[1])], set()
        for token in ids[2]:
            logits.append(session.feed([token]))
            if session.decode_graph is not None and session.decode_graph._graph is not None:
                recorded.add(id(session.decode_graph._graph))
        return logits, recorded, session.memory.layers[0]

    expected, _, _ = run(False)
    got, recorded, layer = run(True)
    assert len(recorded) == 1 and layer.n_blocks >= layer.evidence_end + 5
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_a_step_that_cannot_be_recorded_falls_back_to_the_ordinary_path(tokenizer, caplog):
    """A model whose forward syncs the host (here a hook on its last norm) cannot be recorded: the step that tried
    answers from its real run, a warning says why, later steps take the ordinary path with the same logits, and
    random draws on the device still work."""
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda")
    ids = [random_ids(n, len(tokenizer), seed=seed) for n, seed in ((700, 1), (12, 2), (20, 3))]

    def syncs_while_recording(module, args):
        if torch.cuda.is_current_stream_capturing():
            args[0].sum().item()

    def run(graphs: bool):
        config = QLLMConfig(decode_graphs=graphs, evidence_tokens=64, **GPU_WINDOWS)
        engine = QLLMEngine(model, tokenizer, config)
        session = engine._new_session(sum(map(len, ids)))
        session.set_question(engine._question("Which number comes after the word apple?"))
        session.feed(ids[0])
        session.choose_evidence(engine._evidence_blocks())
        return [session.feed(ids[1]), *(session.feed([t]) for t in ids[2])], session

    expected, _ = run(False)
    hook = model.model.norm.register_forward_pre_hook(syncs_while_recording)
    try:
        got, session = run(True)
    finally:
        hook.remove()
    assert session.decode_graph.failed and "CUDA graph failed" in caplog.text
    torch.randn(2, device="cuda")  # the failed capture let go of the device's random generator
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

"""The CUDA fast path (Triton kernels, device block pool, offload) gives the reference path's answers."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine

from .conftest import random_ids, session_logits, tiny_model

pytestmark = pytest.mark.gpu
WINDOWS = dict(n_init=8, n_local=64, block_size=16, topk=3, lookup_chunk=32, prefill_chunk=256,
               full_within_window=False)


@pytest.mark.parametrize("far_positions", ["shared", "ordered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", ["device", "cpu"])
def test_kernel_path_matches_reference_path(tokenizer, dtype, offload, far_positions, monkeypatch):
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda", dtype)  # head_dim 64: kernel path
    ids = random_ids(700, len(tokenizer))
    # bf16: the kernels round rotated keys to bf16 where the reference keeps float32, which can flip a near-tied
    # top-k lookup (then the runs attend different blocks); every block selected leaves the arithmetic to compare
    windows = WINDOWS if dtype == torch.float32 else {**WINDOWS, "topk": 64}
    config = QLLMConfig(offload=offload, far_positions=far_positions, **windows)
    fast = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")
    reference = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("offload", ["device", "cpu"])
def test_fp8_blocks_kernel_path_matches_reference_path(tokenizer, offload, monkeypatch):
    """float8 blocks, de-quantised on the GPU from the pool or read in place from pinned host memory by the gather
    kernel, read by the kernels = read by the reference ops."""
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda")
    ids = random_ids(700, len(tokenizer))
    config = QLLMConfig(offload=offload, kv_dtype="float8_e4m3", **WINDOWS)
    fast = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")
    reference = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-3, atol=1e-3)


def test_a_reading_reuses_its_compiled_launches(tokenizer):
    """`Launcher` keys a launch by what Triton specialises on: a reading of a few thousand tokens launches each
    kernel with a handful of keys, not one per lookup group (an argument that changes with every group, such as the
    block count or a row stride of the scores, must not be specialised on, or every launch goes through the JIT)."""
    from qllm_kernels._common import _FAST_LAUNCH
    from qllm_kernels.attention import _attn_fwd_kernel, _received_kernel
    from qllm_kernels.block_score import _score_and_rank_kernel
    from qllm_kernels.gather import _gather_kernel
    from qllm_kernels.store import _store_kernel

    if not _FAST_LAUNCH:
        pytest.skip("Launcher is off with this Triton")
    kernels = [_attn_fwd_kernel, _received_kernel, _score_and_rank_kernel, _gather_kernel, _store_kernel]
    for kernel in kernels:
        kernel._compiled.clear()
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda", torch.bfloat16)
    engine = QLLMEngine(model, tokenizer, QLLMConfig(kv_dtype="float8_e4m3", **{**WINDOWS, "prefill_chunk": 128}))
    session = engine._new_session(3000)
    session.set_question(engine._question("Which number comes after the word apple?"))
    session.feed(random_ids(2900, len(tokenizer)))
    counts = {kernel.kernel.fn.__name__: len(kernel._compiled) for kernel in kernels}
    assert all(1 <= count <= 4 for count in counts.values()), counts  # ~90 lookup groups a layer


def test_gpu_answer_equals_cpu_answer(default_model):
    model, tokenizer = default_model
    context = "The vault code is 7. " + "Filler sentence about nothing. " * 300
    config = QLLMConfig(n_init=64, n_local=128, block_size=32, topk=4, lookup_chunk=64, full_within_window=False)
    cpu = QLLMEngine(model, tokenizer, config).ask(context, "What is the vault code?", max_new_tokens=10)
    gpu_model = model.to("cuda")
    try:
        gpu = QLLMEngine(gpu_model, tokenizer, config).ask(context, "What is the vault code?", max_new_tokens=10)
    finally:
        model.to("cpu")
    assert gpu.text == cpu.text
    # the same evidence; hit counts (votes of the layers' own top-k) may tie differently across devices
    assert {b.start for b in gpu.blocks} == {b.start for b in cpu.blocks}


def test_evidence_answer_with_kernels_equals_reference(tokenizer, monkeypatch):
    """Evidence blocks (chosen once, gathered once into a buffer) through the Triton kernels."""
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda")
    context = " ".join(f"Fact {i}: the box {i} holds {i * 7 % 13} coins." for i in range(120))
    config = QLLMConfig(evidence_tokens=128, **WINDOWS)
    fast = QLLMEngine(model, tokenizer, config).ask(context, "Box 7?", max_new_tokens=12)
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")
    reference = QLLMEngine(model, tokenizer, config).ask(context, "Box 7?", max_new_tokens=12)
    assert (fast.text, fast.blocks) == (reference.text, reference.blocks)


def _split_across_two_gpus(model):
    """The model with its first half of layers on cuda:0 and the rest on cuda:1 (accelerate's dispatch)."""
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 0}
    device_map.update({f"model.layers.{i}": int(i >= n // 2) for i in range(n)})
    return dispatch_model(model, device_map=device_map)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_model_split_across_two_gpus_answers_as_on_one(default_model):
    """Each layer's block memory, RoPE tables and kernel launches on that layer's GPU: the same answer and
    looked-up passages as the whole model on one GPU."""
    import copy

    model, tokenizer = default_model
    context = "The vault code is 7. " + "Filler sentence about nothing. " * 300
    config = QLLMConfig(n_init=64, n_local=128, block_size=32, topk=4, lookup_chunk=64, evidence_tokens=512,
                        full_within_window=False)
    one = copy.deepcopy(model).to("cuda:0")
    expected = QLLMEngine(one, tokenizer, config).ask(context, "What is the vault code?", max_new_tokens=10)
    split = _split_across_two_gpus(copy.deepcopy(model))
    engine = QLLMEngine(split, tokenizer, config)
    got = engine.ask(context, "What is the vault code?", max_new_tokens=10)
    assert (got.text, [b.start for b in got.blocks]) == (expected.text, [b.start for b in expected.blocks])
    memory = engine.read(context)
    devices = {layer.store.device.index for layer in memory.session.memory.layers.values()}
    assert devices == {0, 1}


@pytest.mark.parametrize("offload", ["device", "cpu"])
@pytest.mark.parametrize("kv_dtype", ["auto", "float8_e4m3"])
def test_memory_saved_on_gpu_loads_and_answers_as_saved(tokenizer, kv_dtype, offload, tmp_path):
    """A saved memory's blocks come back from the CPU into the device pool or pinned host planes through the
    store kernel (the Ray replicas load every memory this way)."""
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda")
    context = " ".join(f"Fact {i}: the box {i} holds {i * 7 % 13} coins." for i in range(120))
    engine = QLLMEngine(model, tokenizer, QLLMConfig(kv_dtype=kv_dtype, offload=offload, **WINDOWS))
    memory = engine.read(context)
    loaded = engine.load_memory(memory.save(tmp_path / "doc.qmem"))
    first, second = memory.ask("Box 7?", max_new_tokens=8), loaded.ask("Box 7?", max_new_tokens=8)
    assert (first.text, first.blocks) == (second.text, second.blocks)

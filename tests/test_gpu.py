"""The CUDA fast path (Triton kernels, device block pool, offload) gives the reference path's answers."""

from __future__ import annotations

import pytest
import torch

from qllm_runtime import QLLMConfig, QLLMEngine

from .conftest import random_ids, session_logits, tiny_model

pytestmark = pytest.mark.gpu
WINDOWS = dict(n_init=8, n_local=64, block_size=16, topk=3, lookup_chunk=32, prefill_chunk=256)


@pytest.mark.parametrize("far_positions", ["shared", "ordered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", ["device", "cpu"])
def test_kernel_path_matches_reference_path(tokenizer, dtype, offload, far_positions, monkeypatch):
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda", dtype)  # head_dim 64: kernel path
    ids = random_ids(700, len(tokenizer))
    config = QLLMConfig(offload=offload, max_cached_blocks=4, far_positions=far_positions, **WINDOWS)
    fast = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    monkeypatch.setenv("QUICKLLAMA_KERNELS", "0")
    reference = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f, r, rtol=tol, atol=tol)


def test_gpu_answer_equals_cpu_answer(default_model):
    model, tokenizer = default_model
    context = "The vault code is 7. " + "Filler sentence about nothing. " * 300
    config = QLLMConfig(n_init=64, n_local=128, block_size=32, topk=4, lookup_chunk=64)
    cpu = QLLMEngine(model, tokenizer, config).ask(context, "What is the vault code?", max_new_tokens=10)
    gpu_model = model.to("cuda")
    try:
        gpu = QLLMEngine(gpu_model, tokenizer, config).ask(context, "What is the vault code?", max_new_tokens=10)
    finally:
        model.to("cpu")
    assert gpu.text == cpu.text
    assert [b.start for b in gpu.blocks[:4]] == [b.start for b in cpu.blocks[:4]]

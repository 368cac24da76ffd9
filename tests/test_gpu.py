"""The CUDA fast path (Triton kernels, device block pool, offload) gives the reference path's answers."""

from __future__ import annotations

import pytest
import torch

import qllm_runtime.engine as engine_module
from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.attention import attend_reference
from qllm_runtime.memory import reference_scorer

from .conftest import tiny_model

pytestmark = pytest.mark.gpu
WINDOWS = dict(n_init=8, n_local=64, block_size=16, topk=3, lookup_chunk=32, prefill_chunk=256)


def session_logits(engine: QLLMEngine, ids: list[int], steps: int) -> list[torch.Tensor]:
    session = engine._new_session(len(ids) + steps)
    out = [session.feed(ids)]
    out += [session.feed([t]) for t in ids[:steps]]
    return [o.float().cpu() for o in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", ["device", "cpu"])
def test_kernel_path_matches_reference_path(tokenizer, dtype, offload, monkeypatch):
    model = tiny_model("llama", len(tokenizer), hidden_size=256).to("cuda", dtype)  # head_dim 64: kernel path
    ids = torch.randint(0, len(tokenizer), (700,), generator=torch.Generator().manual_seed(0)).tolist()
    config = QLLMConfig(offload=offload, max_cached_blocks=4, **WINDOWS)
    fast = session_logits(QLLMEngine(model, tokenizer, config), ids, 8)
    monkeypatch.setattr(engine_module, "attention_ops", lambda *_: (attend_reference, reference_scorer))
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

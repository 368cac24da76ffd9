"""Shared fixtures: tiny random-weight models of real architectures and the embedded default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU; must precede its import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qllm_runtime import EMBEDDED_MODEL_CONFIG, QLLMConfig, QLLMEngine
from qllm_runtime.loading import default_gguf_path, load
from qllm_runtime.policies import POLICIES

# the embedded model's settings with small windows, so ~4K tokens need lookups
SMALL_WINDOWS = QLLMConfig(**{**EMBEDDED_MODEL_CONFIG.model_dump(), **dict(
    n_init=128, n_local=256, block_size=64, topk=8, lookup_chunk=128, prefill_chunk=1024)})
# windows for the tiny models: a few hundred tokens fill several blocks; COVERING holds any test sequence
# (block memory at every length: a tiny model's 4096-token window would hold every test reading in full attention)
TINY_WINDOWS = dict(n_init=4, n_local=32, block_size=8, topk=2, lookup_chunk=16, prefill_chunk=64,
                    full_within_window=False)
COVERING = dict(n_init=8, n_local=4096, block_size=16, topk=2, lookup_chunk=16, prefill_chunk=64,
                full_within_window=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct on the CPU, float32."""
    return load(default_gguf_path(), device="cpu")


@pytest.fixture(scope="session")
def default_engine(default_model):
    """The embedded model with small windows (n_local 256, blocks of 64, top-8), so ~4K tokens need lookup."""
    model, tokenizer = default_model
    return QLLMEngine(model, tokenizer, SMALL_WINDOWS)


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


def tiny_model(arch: str, vocab_size: int, seed: int = 0, hidden_size: int = 64):
    """A randomly initialised model of a real architecture, small enough for exact CPU checks."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    configs = {
        "llama": lambda: LlamaConfig(**common, rope_theta=10000.0),
        "llama3-scaled": lambda: LlamaConfig(
            **common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 512},
        ),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),
        "yarn": lambda: Qwen2Config(
            **common, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 1024},
        ),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[arch](), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


ARCHS = ["llama", "llama3-scaled", "mistral", "qwen2", "qwen3", "yarn"]


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tokenizer):
    """(arch, model, tokenizer) for each architecture."""
    return request.param, tiny_model(request.param, len(tokenizer)), tokenizer


BLOCK_MODES = sorted(name for name, policy in POLICIES.items() if policy.uses_blocks)


def session_logits(engine: QLLMEngine, ids: list[int], decode_steps: int) -> list[torch.Tensor]:
    """Logits after a chunked read of `ids`, then after each of `decode_steps` single-token steps (feeding
    ids[0], ids[1], ...), on the CPU in float32. Reaches into the engine: no public call returns logits."""
    session = engine._new_session(len(ids) + decode_steps)
    logits = [session.feed(ids)]
    logits += [session.feed([token]) for token in ids[:decode_steps]]
    return [out.float().cpu() for out in logits]


def random_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

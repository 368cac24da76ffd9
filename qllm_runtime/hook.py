"""Attach to stock transformers models through their attention interface, for one forward at a time.

The engine calls the model with all position ids 0 (so its RoPE is the identity) and a
`quickllama_state` keyword, which transformers forwards to the attention function registered here.
The model's previous attention implementation is restored after every forward, also on error, so
another engine or a plain `model.generate` sharing the model is not affected. Where the identity is exact
(no attention scaling), the model's own rotation is skipped inside those forwards (`skip_identity_rope`); on CUDA
its RMSNorms run as one kernel each there (`norms.fuse_rms_norms`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import wraps
from typing import Protocol
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

ATTENTION_NAME = "quickllama"
STATE_KWARG = "quickllama_state"


class AttentionState(Protocol):
    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        """query: (heads, n, head_dim), key/value: (kv_heads, n, head_dim) -> (n, heads, head_dim)."""
        ...


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    state: AttentionState | None = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} only runs inside a QuickLLaMA engine call; "
            "set the model's attention implementation back (e.g. model.set_attn_implementation('sdpa'))"
        )
    if query.shape[0] != 1:
        raise ValueError(f"QuickLLaMA runs batch size 1, got a batch of {query.shape[0]}")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = state.attend(module.layer_idx, query[0], key[0], value[0], scaling)
    return out[None], None


def register() -> None:
    """Make the attention function known to transformers (idempotent). No mask function is registered: QuickLLaMA
    masks by absolute positions inside its attention, and for an implementation without one transformers returns
    no mask at once (with one, it first checks the position ids for packed sequences: a host sync, which a CUDA
    graph cannot hold)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)


_CONFIGS: WeakKeyDictionary[nn.Module, list[PretrainedConfig]] = WeakKeyDictionary()


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """The distinct configs of the model's modules (one for a decoder LM), in module order, found once per model."""
    if model not in _CONFIGS:
        found = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
        _CONFIGS[model] = list(found.values())
    return _CONFIGS[model]


@contextmanager
def quickllama_attention(model: nn.Module) -> Iterator[None]:
    """Run the model with QuickLLaMA attention inside the block; restore its own afterwards (each config's, also on
    error). Sets the implementation on the model's configs, as `set_attn_implementation` does, without walking every
    module each forward (~0.5 ms for 32 layers). The engine checks once that the model takes an attention function."""
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = ATTENTION_NAME
        yield
    finally:  # in module order, so a config restored after its parent (which sets its sub-configs) keeps its own
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation = implementation


_RUNNING: ContextVar[nn.Module | None] = ContextVar("quickllama_running", default=None)  # the model in run_model
_SKIPS_ROPE: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()


def engine_forward_running() -> bool:
    """Whether this thread is inside a `run_model` forward (where the engine's changes to the model apply)."""
    return _RUNNING.get() is not None


def skip_identity_rope(model: nn.Module, attention_scaling: float) -> None:
    """Inside `run_model` forwards of `model`, its attention layers' `apply_rotary_pos_emb` returns q and k as they
    are, where at position 0 it is exactly the identity (`attention_scaling` 1): elementwise passes over every query
    and key of every layer that change nothing. Wraps the function in the modeling modules that define the layers,
    once; outside those forwards (plain SDPA calls, other threads) the wrapper calls the original."""
    wrapped = False
    if attention_scaling == 1.0:
        for name in {type(m).__module__ for m in model.modules() if hasattr(m, "layer_idx")}:
            module = sys.modules.get(name)
            original = getattr(module, "apply_rotary_pos_emb", None)
            if callable(original):
                if not getattr(original, "_quickllama", False):
                    module.apply_rotary_pos_emb = _identity_inside_quickllama(original)
                wrapped = True
    _SKIPS_ROPE[model] = wrapped


def _identity_inside_quickllama(apply: Callable) -> Callable:
    @wraps(apply)
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        model = _RUNNING.get()
        return (q, k) if model is not None and _SKIPS_ROPE.get(model, False) else apply(q, k, *args, **kwargs)

    apply_rotary_pos_emb._quickllama = True
    return apply_rotary_pos_emb


def run_model(model: nn.Module, input_ids: Tensor, state: AttentionState) -> Tensor:
    """One forward of `input_ids` (1, n) through QuickLLaMA attention; logits of the last token (vocab,)."""
    positions = torch.zeros_like(input_ids)
    running = _RUNNING.set(model)
    try:
        with torch.inference_mode(), quickllama_attention(model):
            out = model(
                input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1, **{STATE_KWARG: state}
            )
    finally:
        _RUNNING.reset(running)
    return out.logits[0, -1]

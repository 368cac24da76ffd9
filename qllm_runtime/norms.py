"""The model's RMSNorms as one kernel each, inside the engine's forwards.

Eager PyTorch runs a Llama-family RMSNorm as seven elementwise kernels over the hidden states; twice a layer at
every token that is read, that is about 0.3 s of GPU time at 100K tokens on an 8B model. `fuse_rms_norms` has
each RMSNorm module of the model whose forward computes `rms_norm_reference` (checked once per class on random
input, so a norm of another form, e.g. Gemma's 1 + weight, keeps its own) run the `qllm_kernels` kernel instead,
inside `run_model` forwards (the engine passes the kernel on CUDA only); outside them (a plain `model.generate`,
other threads) the module runs its own forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .hook import engine_forward_running

log = logging.getLogger("quickllama")

RMSNormFn = Callable[[Tensor, Tensor, float], Tensor]  # (x, weight, eps) -> normalised x, as rms_norm_reference


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., hidden) normalised by its root mean square, in float32, rounded to x's dtype, times weight (hidden,):
    transformers' `LlamaRMSNorm` (and the Qwen2, Qwen3, Mistral, Phi-3 ones that copy it)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fuse_rms_norms(model: nn.Module, rms_norm: RMSNormFn | None, device_type: str = "cuda") -> int:
    """Inside the engine's forwards, run each RMSNorm of `model` that computes `rms_norm_reference` as `rms_norm`
    (None: leave them all), where its weight and the hidden states are on a device of `device_type` (where
    `rms_norm` runs; a module offloaded elsewhere keeps its own forward). Idempotent; returns how many modules run
    fused."""
    if rms_norm is None:
        return 0
    same: dict[type, bool] = {}  # per class: does its forward compute the reference?
    fused = 0
    for module in model.modules():
        if not _candidate(module) or module.weight.device.type != device_type:
            continue
        if not getattr(module.forward, "_quickllama", False):
            kind = type(module)
            if kind not in same:
                same[kind] = _computes_reference(module, rms_norm)
                if not same[kind]:
                    log.info("%s does not compute a Llama RMSNorm: it keeps its own forward", kind.__name__)
            if not same[kind]:
                continue
            module.forward = _fused_inside_engine(module, rms_norm, device_type)
        fused += 1
    return fused


def _candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, Tensor) and weight.dim() == 1 and \
        isinstance(getattr(module, "variance_epsilon", None), float)


def _computes_reference(module: nn.Module, rms_norm: RMSNormFn) -> bool:
    """Whether the module's forward gives `rms_norm`'s result on random rows: the normalised rows one unit in their
    last place off at most (the kernel sums the squares in another order), which the weight carries, the output one
    more."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn((4, weight.shape[0]), generator=gen)).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            theirs = module.forward(x)
            ours = rms_norm(x, weight, module.variance_epsilon)
        except Exception:  # a forward that does not take plain hidden states (or a weight the kernel cannot read)
            return False
    if not isinstance(theirs, Tensor) or theirs.dtype != ours.dtype or theirs.shape != ours.shape:
        return False
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(ours.dtype, 1e-6)
    return torch.allclose(ours.float(), theirs.float(), rtol=2 * ulp, atol=1e-6)


def _fused_inside_engine(module: nn.Module, rms_norm: RMSNormFn, device_type: str) -> Callable[..., Tensor]:
    own = module.forward

    def forward(hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or not engine_forward_running() or hidden_states.device.type != device_type:
            return own(hidden_states, *args, **kwargs)  # e.g. the model moved to the CPU since
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    forward._quickllama = True
    return forward

"""RoPE tables taken from the model's own rotary module, so `rope_scaling` (llama3, YaRN, ...) is honoured."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError
from .recent import Recent


def find_rotary(model: nn.Module) -> nn.Module:
    """The model's rotary-embedding module (Llama, Mistral, Qwen2, Qwen3 keep one on the base model)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary position embedding: QuickLLaMA needs a RoPE decoder "
        "(Llama, Mistral, Qwen2, Qwen3 families)."
    )


class RotaryTables:
    """cos/sin for positions 0 .. n-1, shape (n, head_dim), float32, without attention scaling.

    The model is run with all position ids 0, where its rotary module has already multiplied q and k
    by `attention_scaling` once; dividing it out here keeps it from being applied twice. Tables are computed
    where the rotary module lives and kept on every device asked for (a model split across GPUs); `device` is
    the default one.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.rotary = find_rotary(model)
        self.device = device
        self.tables: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._cuts: Recent[tuple[Tensor, Tensor]] = Recent(16)  # get's results (views), asked for every lookup group

    @property
    def attention_scaling(self) -> float:
        """What the rotary module multiplies cos and sin by (1 for most models; YaRN and others scale)."""
        return float(getattr(self.rotary, "attention_scaling", 1.0))

    def get(self, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin (n, head_dim) on `device` (default: the engine's)."""
        device = self.device if device is None else device
        return self._cuts.get((device, n), lambda: self._cut(n, device))

    def _cut(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """`get`'s views, the tables made (or grown) first where they are short."""
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or cos.shape[0] < n:
            size = max(n, 2 * (0 if cos is None else cos.shape[0]))
            home = self.rotary.inv_freq.device
            positions = torch.arange(size, device=home)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=home)
            with torch.no_grad():
                cos, sin = self.rotary(probe, positions)
            scale = self.attention_scaling
            cos, sin = (cos[0].float() / scale).to(device), (sin[0].float() / scale).to(device)
            self.tables[device] = cos, sin  # the views cut from the old tables stay valid
        return cos[:n], sin[:n]

    def repeats_half(self, n: int = 64) -> bool:
        """Whether each table row repeats its first half (rotate-half RoPE, as the families above make it; the
        kernels read only that half), checked over the first `n` positions."""
        cos, sin = self.get(n)
        half = cos.shape[1] // 2
        return all(torch.equal(t[:, :half], t[:, half:]) for t in (cos, sin))

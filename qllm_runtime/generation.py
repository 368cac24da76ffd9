"""Token sampling and text assembly (incremental decoding, stop strings)."""

from __future__ import annotations

import torch
from torch import Tensor


class Sampler:
    """Greedy when temperature is 0, else temperature + nucleus (top_p) sampling from a private generator
    (seeded with `seed`, or randomly), so torch's global random stream is never touched. The settings are
    validated by GenerationSettings."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: torch.device) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor) -> Tensor:
        """logits: (vocab,) -> next token id, a 1-element int64 tensor on the logits' device."""
        if self.generator is None:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self.generator)


class TextAssembler:
    """Decode generated ids incrementally; hold back text that may still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # final text so far (stop strings trimmed)
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the new text that is safe to show."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text
        safe = len(text) if self.stopped else len(text) - self._pending_stop_prefix(text)
        return self._emit(safe)

    def finish(self) -> str:
        """Everything not yet shown."""
        return self._emit(len(self.text))

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-n:]):
                    longest = n
                    break
        return longest

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta

"""Q-LLM (arXiv 2406.07528): the question, given apart from the context, biases every lookup."""

from __future__ import annotations

from torch import Tensor

from ..lookup import question_scores_reference
from .base import LookupPolicy, register_policy


@register_policy("qllm")
class QLLMPolicy(LookupPolicy):
    """score(B) = InfLLM's score + beta * sum_h < u_h, r_B,h >, with u the layer's question vector
    (`QLLMConfig.question_weight` = beta; with beta 0 this is exactly InfLLM)."""

    @classmethod
    def uses_question(cls, config) -> bool:
        return config.question_weight > 0

    def block_terms(self, question_vector: Tensor | None, repr_keys: Tensor) -> Tensor | None:
        if question_vector is None or not self.uses_question(self.config):
            return None
        return self.config.question_weight * question_scores_reference(question_vector, repr_keys)

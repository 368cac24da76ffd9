"""Q-LLM (arXiv 2406.07528): the question, given apart from the context, biases every lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..lookup import question_attention
from .base import LookupPolicy, register_policy

if TYPE_CHECKING:
    from ..blocks import BlockStore


@register_policy("qllm")
class QLLMPolicy(LookupPolicy):
    """score(B) = InfLLM's score + beta * sum_h < u_h, r_B,h >, with u the layer's question vector and beta
    `QLLMConfig.question_weight` (beta 0 is exactly InfLLM).

    `question_scale="standardized"`: both terms are first standardised over the layer's blocks (zero mean,
    unit deviation), so beta weighs the two rankings against each other whatever the model's score scales.

    While answering (`evidence_tokens`), every layer attends the same evidence: the blocks to which the question
    adds the most attention, over the whole memory, summed over heads and layers (`lookup.question_attention`).
    """

    @classmethod
    def uses_question(cls, config) -> bool:
        return config.question_weight > 0 or config.evidence_tokens is not None

    def evidence_scores(
        self, question_queries: Tensor | None, header_queries: Tensor | None, init_keys: Tensor, store: BlockStore
    ) -> Tensor | None:
        if question_queries is None or header_queries is None or self.config.evidence_tokens is None:
            return None
        heads, m = question_queries.shape[0], question_queries.shape[1] + header_queries.shape[1]
        chunks = store.key_chunks(max(1, 2**25 // (heads * m * store.shape[1])))  # logits under ~32M floats a chunk
        return question_attention(question_queries, header_queries, init_keys, chunks)

    def term_query(self, question_vector: Tensor | None) -> Tensor | None:
        """The question vector: the question term is <u, r_B> summed over heads."""
        return None if question_vector is None or self.config.question_weight == 0 else question_vector

    def weighting(self) -> tuple[float, bool]:
        """beta = `question_weight`; standardised: z(query term) + beta * z(question term), the ranking of
        `lookup.add_question_scores`."""
        return self.config.question_weight, self.config.question_scale == "standardized"

"""The lookup method as one object: a `LookupPolicy` scores a layer's memory blocks for each lookup group and
picks the far blocks its queries attend; policies register under the `QLLMConfig.mode` that selects them.

Shapes: group_queries (n_groups, heads, head_dim), the mean far-rotated query of each lookup group;
repr_keys (n_blocks, heads, head_dim), one representative key per block and query head; block_terms
(n_blocks,) float32, a per-block constant of the policy (e.g. the question term): the scores of its `term_query`,
scored with every lookup as one more query row.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..lookup import add_question_scores, block_scores_reference, select_blocks
from ..ops import kernels

if TYPE_CHECKING:
    from ..blocks import BlockStore
    from ..config import QLLMConfig

POLICIES: dict[str, type[LookupPolicy]] = {}


def register_policy(name: str):
    """Class decorator: make a policy selectable as `QLLMConfig(mode=name)`."""

    def add(cls: type[LookupPolicy]) -> type[LookupPolicy]:
        if name in POLICIES or name == "full":
            raise ValueError(f"lookup policy {name!r} is already registered")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return add


class LookupPolicy:
    """Scores blocks by <group query, representative key> summed over heads, plus `block_terms`; takes top-k.

    Subclasses change `term_query`, how they weigh (`weighting`) or `scores`; selection lives here: a block also
    scores as high as the `follow_blocks` blocks before it (so a hit brings the text after it along: a fact cut by a
    block boundary stays whole), then the top-k are taken. The Triton kernels are used where they run (CUDA: the
    whole lookup in one to three launches, `qllm_kernels.top_blocks`); the PyTorch reference elsewhere, with the same
    results.
    """

    name: ClassVar[str]
    uses_blocks: ClassVar[bool] = True  # False: init + local window only, nothing is kept or looked up

    def __init__(self, config: QLLMConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        module = kernels(device)
        # the engine's inputs are valid by construction: no validation on the host per lookup
        self._kernel = partial(module.block_score, check=False) if module is not None else None
        self._top = partial(module.top_blocks, check=False, scratch=module.Scratch()) if module is not None else None
        self._top_max_k = module.TOP_MAX_K if module is not None else 0

    @classmethod
    def uses_question(cls, config: QLLMConfig) -> bool:
        """Whether this policy reads the question (`term_query`, `evidence_scores`); the engine computes it only
        then."""
        return False

    def term_query(self, question_vector: Tensor | None) -> Tensor | None:
        """The per-block term as a query (heads, head_dim): a block's term is <term_query, r_B> summed over heads,
        scored with every lookup as one more row beside its group queries (on CUDA in the same launch). None: no
        term."""
        return None

    def block_terms(self, question_vector: Tensor | None, repr_keys: Tensor) -> Tensor | None:
        """The per-block term of `term_query`: (n_blocks,) float32, or None for no term."""
        term = self.term_query(question_vector)
        return None if term is None else block_scores_reference(term[None], repr_keys, None, 0.0)[0]

    def evidence_scores(
        self, question_queries: Tensor | None, header_queries: Tensor | None, init_keys: Tensor, store: BlockStore
    ) -> Tensor | None:
        """(n_blocks,) float32, how strongly this layer's question favours each of the `store`'s blocks; summed
        over layers, they choose the evidence blocks every layer attends while the question is answered
        (`evidence_tokens`). None: no evidence, each answer token looks blocks up itself (InfLLM).
        question_queries, header_queries: this layer's `Question.queries` and `Question.header_queries`, or None
        without a question; init_keys: (kv_heads, n_init, head_dim)."""
        return None

    def weighting(self) -> tuple[float, bool] | None:
        """How `scores` adds the block terms: (beta, standardized) for <query, repr> + beta * block_terms, each term
        first divided by its deviation over the blocks when standardized; None when the scores are something else
        (then `pick` takes the general path)."""
        return 1.0, False

    def scores(self, group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None) -> Tensor:
        """(n_groups, n_blocks) float32: <group query, representative key> summed over heads, + the weighted
        block_terms (`weighting`)."""
        beta, standardized = self.weighting()
        if self._kernel is None:
            return block_scores_reference(group_queries, repr_keys, block_terms, beta, standardized)
        if standardized and block_terms is not None and beta != 0.0:
            return add_question_scores(self._kernel(group_queries, repr_keys, None, 0.0, None)[0], block_terms, beta,
                                       standardized=True)
        return self._kernel(group_queries, repr_keys, block_terms, beta, None)[0]  # the top-k is `select`'s

    def select(self, group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None, k: int, *,
               term_row: bool = False) -> Tensor:
        """Indices (n_groups, k) of the blocks each group attends, best first, k < n_blocks, on the device.
        term_row: the last row of group_queries is the `term_query`, whose scores are the block terms (block_terms is
        then None)."""
        if term_row:
            block_terms = self.scores(group_queries[-1:], repr_keys, None)[0]
            group_queries = group_queries[:-1]
        scores = self.scores(group_queries, repr_keys, block_terms)
        for _ in range(self.config.follow_blocks):  # block b scores max(s[b], s[b-1], ..., s[b-follow])
            scores = torch.cat([scores[:, :1], torch.maximum(scores[:, 1:], scores[:, :-1])], dim=1)
        return select_blocks(scores, k)

    def pick(self, group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None, k: int, *,
             term_row: bool = False) -> Tensor:
        """The blocks of `select`, ascending (document order): (n_groups, k). On CUDA one fused lookup, which breaks
        ties towards the lower index (and scores the term row in the same launch as the group queries)."""
        weighting = self.weighting()
        if self._top is None or weighting is None or self.config.follow_blocks or k > self._top_max_k:
            return self.select(group_queries, repr_keys, block_terms, k, term_row=term_row).sort(dim=-1).values
        beta, standardized = weighting
        return self._top(group_queries, repr_keys, block_terms, beta, k, standardized=standardized, term_row=term_row)


def make_policy(config: QLLMConfig, device: torch.device) -> LookupPolicy:
    """The policy `config.mode` names (not `full`, which attends everything and looks nothing up)."""
    return POLICIES[config.mode](config, device)

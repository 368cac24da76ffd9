"""QLLMConfig: every knob of the engine, validated, with its default in one place."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .lookup import EvidenceOrder
from .policies import POLICIES

FarPositions = Literal["shared", "ordered"]
QuestionScale = Literal["raw", "standardized"]
LookupHeads = Literal["all", "kv_head"]
Offload = Literal["auto", "device", "cpu"]


class QLLMConfig(BaseModel):
    """How the engine reads and looks up context.

    Window sizes are in tokens. `mode` names a registered lookup policy (`qllm_runtime.policies`): `qllm`
    (question-aware lookup), `infllm` (the same with question_weight 0), `streaming` (init + local window
    only), `random` (random blocks, a control), or `full` (ordinary attention, no block memory).
    `far_positions`: where far keys (init, looked-up blocks, remainder) sit for RoPE: `shared` = all at
    distance n_local from the query (InfLLM / Q-LLM); `ordered` = in document order at consecutive
    positions just before the local window (with every block looked up this is full attention).
    """

    # strict: no bools or strings as numbers (topk=True); floats must be finite (question_weight=inf)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)

    mode: str = "qllm"
    far_positions: FarPositions = "ordered"
    n_init: int = Field(128, ge=0, description="attention-sink tokens at the start, always attended")
    n_local: int = Field(512, ge=1, description="sliding window of recent tokens, ordinary RoPE")
    block_size: int = Field(64, ge=1, description="tokens per memory block")
    topk: int = Field(32, ge=0, description="blocks looked up per lookup group")
    repr_topk: int = Field(4, ge=1, description="most-attended tokens averaged into a block's representative key")
    lookup_chunk: int = Field(512, ge=1, description="prefill queries that share one lookup (at most prefill_chunk)")
    prefill_chunk: int = Field(4096, ge=1, description="tokens per model forward while reading")
    question_weight: float = Field(1.0, ge=0.0, description="beta: weight of the question term in lookup")
    question_topk: int | None = Field(
        None, ge=1, description="question tokens pooled per head into the question vector: the most-attended "
        "ones, as Q-LLM's code does (4); None = the mean over every question token"
    )
    question_scale: QuestionScale = Field(
        "standardized", description="how the question term meets the query term: `raw` = score + beta * <u, r_B> "
        "(Q-LLM); `standardized` = each term standardised over the layer's blocks first, so beta is their ratio"
    )
    follow_blocks: int = Field(
        0, ge=0, description="a looked-up block brings this many following blocks along (each block scores at "
        "least as high as the ones before it), so a fact cut by a block boundary is read whole"
    )
    lookup_heads: LookupHeads = Field(
        "all", description="`all`: one lookup per group, scores summed over every head (InfLLM / Q-LLM); `kv_head`: "
        "each KV head (with the query heads that share it) looks up its own top-k blocks"
    )
    evidence_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="while answering, every layer attends the same evidence blocks, chosen once by the "
        "question (the blocks to which it adds the most attention, over all layers), up to this many tokens; "
        "`auto` = half the model's trained window, at most 4K; None = each answer token looks blocks up itself "
        "(InfLLM)"
    )
    evidence_neighbors: int = Field(
        1, ge=0, description="an evidence block brings the blocks this close to it, so a passage cut by a block "
        "boundary is read whole"
    )
    evidence_order: EvidenceOrder = Field(
        "document", description="how the evidence is laid out for ordered far positions (with shared ones the order "
        "has no effect, and `relevance` is refused): `document` = in document order; `relevance` = runs of adjacent "
        "evidence blocks (each in document order) from the least to the most relevant, so the passage the question "
        "singles out sits nearest it (better for a question one passage answers, worse where the order of facts "
        "matters: BENCHMARKS.md §9 K, L)"
    )
    pin_question_blocks: bool = Field(
        True, description="without evidence: keep attending the blocks the question turn looked up (besides each "
        "generated token's own picks), so an answer does not lose its evidence mid-copy"
    )
    full_within_window: bool = Field(
        True, description="a reading that fits the model's trained window (max_position_embeddings: the context, "
        "question turn and answer) uses the model's own full attention, exact, where its keys and values fit the "
        "device as the blocks would (offload, device_pool_gb); block memory takes over beyond it (False: block "
        "memory at every length)"
    )
    kv_dtype: Literal["auto", "float8_e4m3"] = Field(
        "auto", description="how blocks are stored: auto = in the model's dtype; float8_e4m3 = one byte per value "
        "with a float32 scale per block and KV head (half of bf16's memory), de-quantised when gathered"
    )
    offload: Offload = Field(
        "auto", description="block placement: device pool, pinned CPU memory read in place, or auto"
    )
    device_pool_gb: float | None = Field(
        None, gt=0, description="auto: bytes of blocks (all layers) kept on the device before offloading; "
        "None = half the free accelerator memory, unlimited on CPU"
    )
    decode_graphs: bool = Field(
        True, description="on CUDA, each answer token read from evidence replays one recorded CUDA graph of the "
        "model's step (its positions written on the device) instead of launching its kernels from Python"
    )
    max_context_tokens: int = Field(
        1 << 20, ge=1, description="most tokens one reading holds (context, question turn and answer); "
        "longer input is refused before reading; advertised to frameworks"
    )

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode != "full" and mode not in POLICIES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {sorted([*POLICIES, 'full'])}")
        return mode

    @model_validator(mode="after")
    def _check_consistency(self) -> QLLMConfig:
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk ({self.repr_topk}) must be <= block_size ({self.block_size})")
        if self.lookup_chunk > self.prefill_chunk and "lookup_chunk" in self.model_fields_set:  # default: capped
            raise ValueError(f"lookup_chunk ({self.lookup_chunk}) must be <= prefill_chunk ({self.prefill_chunk}): "
                             "a lookup group never spans two forwards, so a larger one has no effect")
        if self.evidence_order == "relevance" and self.far_positions == "shared":
            raise ValueError("evidence_order='relevance' lays the evidence out for far_positions='ordered': with "
                             "shared far positions every far key sits at one distance, so their order has no effect")
        return self


# The embedded SmolLM2-135M (8K-trained, weak) reads a single fact from far blocks better with InfLLM's shared
# far positions and top-8 than with the ordered top-32 that models which can read need (BENCHMARKS.md §4, §5;
# evidence blocks help it too, 7 / 8 against 6 / 8); and within its own 8K window it reads the pass-key from
# block memory, not with full attention (8K: 100 % against 0 %, BENCHMARKS.md §3), so block memory at every length:
# what QLLMEngine.default(), the CLI and the adapters use for it when no config is given.
EMBEDDED_MODEL_CONFIG = QLLMConfig(far_positions="shared", topk=8, full_within_window=False)

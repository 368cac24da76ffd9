"""InfLLM (arXiv 2402.04617): blocks ranked by the current queries alone."""

from .base import LookupPolicy, register_policy


@register_policy("infllm")
class InfLLMPolicy(LookupPolicy):
    """score(B) = sum_h < mean far-rotated query of the group, r_B,h >."""

"""StreamingLLM (arXiv 2309.17453): attention sinks + the local window; older tokens are dropped."""

from .base import LookupPolicy, register_policy


@register_policy("streaming")
class StreamingPolicy(LookupPolicy):
    """Keeps no blocks, so nothing is scored or selected."""

    uses_blocks = False

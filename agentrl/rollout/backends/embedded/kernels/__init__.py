"""GPU kernels of the built-in engine, each with the torch reference it is tested against."""

from agentrl.rollout.backends.embedded.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    write_kv,
    write_kv_reference,
)

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "write_kv",
    "write_kv_reference",
]

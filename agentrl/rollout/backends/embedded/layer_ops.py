"""The pieces of a decoder layer in plain PyTorch, one function per feature of the architecture table.

Each computes what the family's Hugging Face code computes, with the same roundings in half
precision (where HF rounds an intermediate to the model dtype, so does this), so the engine
samples from the distribution the trainer recomputes. On CUDA the model runner uses the fused
Triton kernels instead where they implement the feature (`kernels/fused_ops.py`,
`kernels/rotary.py`); everything else runs here, on any device.

Letters: N tokens, H hidden size, K a normalised width, R rotary dims (<= D, the head dim),
I MLP width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentrl.rollout.backends.embedded.architectures import ArchSpec
from agentrl.rollout.backends.embedded.kernels.fused_ops import add_rms_norm, silu_and_mul


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """RMSNorm over the last dim ([*, K] -> [*, K]) as the family computes it (see `ArchSpec.norm`).

    Gemma's `1 + w` is computed here, from the live weight, in float32 as HF does: nothing derived
    from a weight outlives a step, so `update_weights` cannot leave a stale copy.
    """
    scale = (1.0 + weight.float()) if kind == "offset" else weight
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), scale, eps)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "round_then_scale":
        return weight * normed.to(x.dtype)
    return (normed * scale).to(x.dtype)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
             kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(`x + delta`, its RMSNorm) for x, delta [N, H]; with no weight the second is the sum itself.

    Llama-style norms go through the fused residual-add + norm kernel on CUDA.
    """
    if weight is None:
        x = x if delta is None else x + delta
        return x, x
    if kind == "round_then_scale":
        return add_rms_norm(x, delta, weight, eps)
    x = x if delta is None else x + delta
    return x, rms_norm(x, weight, eps, kind)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary on the first R dims of each head: x [N, h, D], cos / sin_signed [N, 1, R] -> [N, h, D].

    `sin_signed` is `[-sin_lo, sin_hi]`, so `roll(x, R/2) * sin_signed == rotate_half(x) * sin`.
    A table in float32 (OLMo 2's) promotes the products; the result is rounded back like HF does.
    """
    R = cos.shape[-1]
    rot = x if R == x.shape[-1] else x[..., :R]
    out = (rot * cos + rot.roll(R // 2, -1) * sin_signed).to(x.dtype)
    return out if R == x.shape[-1] else torch.cat([out, x[..., R:]], -1)


def activation(kind: str):
    """The elementwise activation named by `ArchSpec.activation`."""
    if kind == "silu":
        return F.silu
    if kind == "gelu":
        return F.gelu
    return lambda t: F.gelu(t, approximate="tanh")


def gated(gate_up: torch.Tensor, kind: str) -> torch.Tensor:
    """`act(gate) * up` for gate_up = [gate | up] of shape [N, 2I]; returns [N, I] (fused kernel for SiLU on CUDA)."""
    if kind == "silu":
        return silu_and_mul(gate_up)
    inter = gate_up.shape[-1] // 2
    return activation(kind)(gate_up[:, :inter]) * gate_up[:, inter:]


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(x / cap)` in HF's order of operations."""
    return torch.tanh(x / cap) * cap


def moe(h: torch.Tensor, router_w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        spec: ArchSpec) -> torch.Tensor:
    """Top-k routed experts (Qwen3-MoE), h [N, H] -> [N, H].

    Routing as HF: router logits in the model dtype, softmax in float32, the k largest (optionally
    renormalised), cast back. Each expert runs on the rows routed to it, and contributions are
    added into zeros in increasing expert order, HF's order of summation. Grouping the rows needs
    their counts on the host (one sync per layer), so an MoE model runs without CUDA graphs.

    Args:
        router_w: [E, H]; gate_up: [E, 2I, H]; down: [E, H, I].
    """
    k = spec.moe.top_k
    logits = F.linear(h, router_w)  # [N, E]
    weights, experts = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), k, dim=-1)  # [N, k]
    if spec.moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(logits.dtype).reshape(-1)  # [N k]
    order = torch.argsort(experts.reshape(-1), stable=True)  # [N k] (token, slot) pairs grouped by expert
    counts = torch.bincount(experts.reshape(-1), minlength=router_w.shape[0]).tolist()
    act = activation(spec.activation)
    out = torch.zeros_like(h)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        pairs = order[start:start + count]
        start += count
        rows = pairs // k
        gate, up = F.linear(h.index_select(0, rows), gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        y = F.linear(act(gate) * up, down[e]) * weights.index_select(0, pairs).unsqueeze(-1)  # [n, H]
        out.index_add_(0, rows, y.to(out.dtype))
    return out

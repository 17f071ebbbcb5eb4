"""Per-token logprobs (and entropy) of packed sequences, with the vocabulary projection in chunks.

Letters: N packed tokens, E hidden size, V vocabulary, C chunk size.
The [N, V] logits never exist at once: each chunk of C hidden states is projected, reduced to two
float32 numbers per token (logprob of the next token, entropy), and dropped. The backward pass
recomputes the chunk's logits and writes d(loss)/d(logits) in closed form,

    d logp_t / dz = onehot_t - p,        dH / dz = -p * (log p + H),

instead of replaying autograd through log_softmax, exp, multiply and sum over [C, V] float32
tensors (the replay was the largest cost of a training step on the H100; docs/benchmarks.md).
When nothing depends on the entropy its gradient term is skipped. With `compiled=True` (CUDA) the
two [C, V] kernels are fused by torch.compile.

Some families change the logits after the head, inside their `*ForCausalLM.forward`, which this
path does not call: Granite divides by `logits_scaling`, Gemma 2 caps with `final_logit_softcapping`.
`LogitTransform` applies the same (scale, then cap) here, in forward and backward; a config
attribute of that kind that it does not know is refused (`logit_transform`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agentrl.errors import TrainerError
from agentrl.trainer.packing import PackedBatch

# Config attributes by which some transformers families rescale or cap logits after the head.
# The first two are implemented; a model whose config sets another one is refused.
_KNOWN_LOGIT_ATTRS = ("logits_scaling", "final_logit_softcapping")
_OTHER_LOGIT_ATTRS = ("logit_scale", "output_multiplier_scale", "logits_soft_cap", "lm_head_multiplier",
                      "mup_width_scale", "logit_softcapping")


@dataclass(frozen=True)
class LogitTransform:
    """What a model's head output goes through before the softmax: `cap * tanh(scale * z / cap)`.

    `scale` 1 and `cap` 0 (off) is the identity, the case of most families.
    """

    scale: float = 1.0
    cap: float = 0.0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        return z

    def grad(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(raw logits) from d(loss)/d(transformed logits) `g`; `z` are the raw logits."""
        if self.cap:
            t = torch.tanh(z.float() * (self.scale / self.cap))
            g = (g.float() * (1.0 - t * t)).to(g.dtype)
        return g * self.scale if self.scale != 1.0 else g


def logit_transform(config) -> LogitTransform:
    """The `LogitTransform` a Hugging Face config asks for; refuses attributes it does not implement."""
    for name in _OTHER_LOGIT_ATTRS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, 0, 0.0, False):
            raise TrainerError(f"{type(config).__name__}.{name}={value!r} changes the logits in a way agentrl's "
                               "trainer does not implement; its logprobs would be wrong. Supported: "
                               f"{', '.join(_KNOWN_LOGIT_ATTRS)} (see docs/architectures.md)")
    scaling = getattr(config, "logits_scaling", None) or 1.0
    cap = getattr(config, "final_logit_softcapping", None) or 0.0
    return LogitTransform(scale=1.0 / float(scaling), cap=float(cap))


def forward_hidden(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Final hidden states of a packed batch: [N, E]."""
    return _hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)


def _hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
            cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[N, E] final hidden states (a peft wrapper is looked through)."""
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    out = causal_lm.base_model(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
        use_cache=False,
    )
    return out.last_hidden_state[0]


def _stats(logits: torch.Tensor, targets: torch.Tensor, inv_t: float):
    """logits [C, V] -> (lse [C], logp [C], entropy [C]) of softmax(logits * inv_t), in float32."""
    z = logits.float() * inv_t  # [C, V]
    lse = torch.logsumexp(z, -1)  # [C]
    entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return lse, logp, entropy


def _grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
          g_logp: torch.Tensor, g_ent: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    """d(loss)/d(logits) [C, V] from the per-token upstream gradients g_logp, g_ent [C]."""
    logp_all = logits.float() * inv_t - lse.unsqueeze(-1)  # [C, V]
    coef = g_logp.unsqueeze(-1)
    if g_ent is not None:
        coef = coef + g_ent.unsqueeze(-1) * (logp_all + entropy.unsqueeze(-1))
    g = (-torch.exp(logp_all) * coef).scatter_add(-1, targets.unsqueeze(-1), g_logp.unsqueeze(-1))
    return (g * inv_t).to(logits.dtype)


@functools.cache
def _kernels(compiled: bool):
    if not compiled:
        return _stats, _grad
    return torch.compile(_stats, dynamic=True), torch.compile(_grad, dynamic=True)


class _ChunkLogprobs(torch.autograd.Function):
    """(logp [C], entropy [C]) of one chunk; saves only per-token numbers, recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, compiled, transform=LogitTransform()):
        ctx.set_materialize_grads(False)
        stats = _kernels(True)[0] if compiled else _stats
        logits = transform.apply(F.linear(hidden, weight, bias))  # [C, V]
        lse, logp, entropy = stats(logits, targets, inv_t)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_t, ctx.compiled, ctx.transform = inv_t, compiled, transform
        # Autocast is not active during backward: remember the dtype the projection ran in (bf16 under
        # autocast over float32 master weights) so the recomputation and both gradient matmuls run in it
        # too, instead of three float32 [C, V] x E matmuls per chunk (the largest cost of a bf16 step).
        ctx.compute_dtype = logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        grad = _kernels(True)[1] if ctx.compiled else _grad
        dt = ctx.compute_dtype
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        raw = F.linear(hidden, weight, bias)  # [C, V], recomputed as forward computed it
        g = grad(ctx.transform.apply(raw), targets, lse, entropy, g_logp, g_ent, ctx.inv_t)  # [C, V]
        g = ctx.transform.grad(raw, g)
        g_hidden = g @ weight if ctx.needs_input_grad[0] else None
        g_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        g_bias = g.sum(0, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        return g_hidden, g_weight, g_bias, None, None, None, None


def token_stats(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, targets: torch.Tensor, inv_temperature: float,
                chunk_size: int, compiled: bool = False) -> torch.Tensor:
    """Stacked (logprob [N], entropy [N]) of the next tokens `targets` [N]: the whole forward pass.

    One function from token ids to per-token numbers, so that FSDP2 can treat it as the root
    module's forward (see `agentrl.trainer.fsdp.shard_policy`): the root's parameters (embeddings,
    final norm, lm_head) are gathered around it and their gradients reduced after backward.
    """
    hidden = _hidden(model, input_ids, position_ids, cu_seqlens, max_seqlen)  # [N, E]
    head = model.get_output_embeddings()
    transform = logit_transform(model.config)
    parts = [_ChunkLogprobs.apply(hidden[s:s + chunk_size], head.weight, head.bias, targets[s:s + chunk_size],
                                  inv_temperature, compiled, transform)
             for s in range(0, hidden.shape[0], chunk_size)]
    return torch.stack([torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])])  # [2, N]


def token_logprobs(
    model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0, chunk_size: int = 2048,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each next token and the entropy of each next-token distribution.

    Args:
        model: A causal LM (plain, peft-wrapped or FSDP2-sharded).
        packed: The packed sequences.
        temperature: Logits are divided by it (as the engine did when sampling); 0 means 1.
        chunk_size: Tokens per chunk of the vocabulary projection.
        compiled: Fuse the [C, V] kernels with torch.compile (worth it on CUDA; first call compiles).

    Returns:
        (logprobs [N], entropy [N]) in float32; position j scores token j+1 of its own sequence.
        The last position of every sequence (no next token) holds 0 in both.
    """
    targets, valid = packed.next_token_targets()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    run = getattr(model, "agentrl_token_stats", None)  # set on FSDP2-sharded policies
    args = (packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen, targets, inv_t, chunk_size,
            compiled)
    stats = run(*args) if run is not None else token_stats(model, *args)
    stats = stats.masked_fill(~valid, 0.0)  # [2, N]
    return stats[0], stats[1]


def shift_to_next_token(row: list[float] | list[int], fill: float | int = 0) -> list:
    """Re-index a per-token row so position j holds the value of token j+1 (matching `token_logprobs`)."""
    return list(row[1:]) + [fill]

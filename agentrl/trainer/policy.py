"""The trained policy as a module: loading (optionally with LoRA adapters and activation
checkpointing), the plain weights the rollout engine needs, and Hugging Face export.

With LoRA (through peft) only the adapters train; the engine still receives full merged weights
(`W + scale * B @ A`, computed without touching W, so nothing drifts), and the export is a normal
Hugging Face model directory that loads without peft.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agentrl.errors import ConfigError, TrainerError

_PEFT_PREFIX = "base_model.model."
# Largest |logprob| difference between the packed path and transformers' own forward that the
# load-time check accepts: float32 agrees to ~1e-6 on CPU (TF32 matmuls on GPUs to ~1e-3); an
# ignored option (a sliding window, a logit cap or scale) is off by 0.1 to several nats.
PACKED_CHECK_TOLERANCE = {torch.float32: 2e-2, torch.bfloat16: 0.25, torch.float16: 0.1}



def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpoints).

    transformers renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` after 5.17
    (the GPU machines' version) and warns on the old name since; use whichever the installed one has.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

def load_policy(path: str, *, dtype: torch.dtype, device: str, attn_implementation: str,
                lora_rank: int = 0, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                lora_targets: tuple[str, ...] = (), gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A causal LM from a local directory, ready to train."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if attn_implementation == "agentrl_varlen":
        check_packed_forward(model.to(device))
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("model.lora.rank > 0 needs peft: pip install 'agentrl[lora]'") from None
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(lora_targets), task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. target modules the model does not have
            raise ConfigError(f"model.lora: {exc}") from None
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model.to(device).eval()


@torch.no_grad()
def check_packed_forward(model: torch.nn.Module, lengths: tuple[int, ...] = (11, 6)) -> float:
    """Compare the trainer's packed logprobs with transformers' own forward, once, at load.

    The packed path calls the backbone and the head itself and attends with its own kernel, so a
    family that computes something else in its `*ForCausalLM.forward` or passes an attention option
    agentrl does not know would train on wrong logprobs. The families of docs/architectures.md are
    tested against transformers one by one; this check covers every other model a user brings: two
    short random sequences, packed, against an eager per-sequence forward. Returns the largest
    difference; raises `TrainerError` when it is beyond rounding.
    """
    from agentrl.trainer.actor import token_logprobs
    from agentrl.trainer.packing import pack_sequences

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    packed, _ = token_logprobs(model, pack_sequences(seqs, device=device), chunk_size=8)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        worst, offset = 0.0, 0
        for s in seqs:
            logp = torch.log_softmax(model(torch.tensor([s], device=device)).logits[0].float(), -1)  # [n, V]
            want = logp[:-1].gather(-1, torch.tensor(s[1:], device=device).unsqueeze(-1)).squeeze(-1)
            worst = max(worst, (packed[offset:offset + len(s) - 1] - want).abs().max().item())
            offset += len(s)
    finally:
        model.set_attn_implementation(implementation)
    tol = PACKED_CHECK_TOLERANCE.get(next(model.parameters()).dtype, 0.25)
    if not worst <= tol:
        raise TrainerError(
            f"{type(model).__name__} ({model.config.model_type}): the trainer's packed forward differs from "
            f"transformers' own by {worst:.3g} nats (tolerance {tol:g}), so it would train on wrong logprobs. "
            "This model family does something agentrl's trainer does not implement; see docs/architectures.md "
            "for the supported families, and open an issue with the model's config.json")
    return worst


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` every decoder block in place (fuses HF's eager norms, rotary and SwiGLU).

    Dynamic shapes, since packed micro-batches differ in length; the first steps pay the compile.
    """
    from agentrl.trainer.fsdp import decoder_blocks

    for block in decoder_blocks(backbone_model(model)):
        block.compile(dynamic=True)
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def backbone_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF `*ForCausalLM` inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain HF parameter names -> tensors, with LoRA deltas folded in (a fresh tensor per adapted weight)."""
    if not is_peft(model):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            deltas[f"{name}.base_layer.weight"] = delta
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        merged = value + deltas[key].to(value.dtype) if key in deltas else value
        plain = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        out[plain] = merged
    return out


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a Hugging Face model directory (safetensors + config + tokenizer) of the policy.

    `state_dict` (full, plain names) is used when given, e.g. gathered from FSDP shards; LoRA is
    merged, so the result loads with `AutoModelForCausalLM.from_pretrained` alone.
    """
    out = Path(out_dir)
    base = backbone_model(model)
    weights = state_dict if state_dict is not None else merged_state_dict(model)
    base.save_pretrained(out, state_dict={k: v.detach().cpu().contiguous() for k, v in weights.items()})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out

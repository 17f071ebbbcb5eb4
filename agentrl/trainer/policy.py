"""The trained policy as a module: loading (optionally with LoRA adapters and activation
checkpointing), the plain weights the rollout engine needs, and Hugging Face export.

With LoRA (through peft) only the adapters train; the engine still receives full merged weights
(`W + scale * B @ A`, computed without touching W, so nothing drifts), and the export is a normal
Hugging Face model directory that loads without peft.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agentrl.errors import ConfigError

_PEFT_PREFIX = "base_model.model."


def load_policy(path: str, *, dtype: torch.dtype, device: str, attn_implementation: str,
                lora_rank: int = 0, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                lora_targets: tuple[str, ...] = (), gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A causal LM from a local directory, ready to train."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

"""The one source of configuration: frozen pydantic models with bounds and descriptions.

YAML files hold only overrides of these defaults, and `dotted.key=value` arguments on the command
line override the YAML. Unknown keys are errors with a "did you mean". Values derived from the
config (paths, counts) live in the code that uses them, never in a second copy of the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentrl.errors import ConfigError, did_you_mean


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraConfig(_Frozen):
    rank: int = Field(0, ge=0, le=1024, description="LoRA rank; 0 trains all weights (needs peft when > 0).")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="Names of the linear layers that get adapters.")


class ModelConfig(_Frozen):
    path: str = Field(description="Local directory of a Hugging Face causal LM with a chat-template tokenizer.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Rollout-engine dtype, and the trainer's parameter dtype unless "
        "train.mixed_precision is bf16 (then the trainer keeps float32 master weights).")
    device: str = Field("cpu", description="Device of the trainer and the embedded engine (cpu, cuda).")
    lora: LoraConfig = LoraConfig()


class EnvConfig(_Frozen):
    id: str = Field(description="Registered environment id, e.g. calculator-v0 (see `agentrl envs`).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the env constructor.")
    train_split: str = Field("train", description="Split that training tasks are drawn from.")


class RolloutConfig(_Frozen):
    engine: Literal["embedded"] = Field("embedded", description="Inference backend.")
    prompts_per_step: int = Field(16, ge=1, le=100_000, description="Tasks per training step.")
    samples_per_prompt: int = Field(8, ge=1, le=1024, description="Episodes per task (the GRPO group size).")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens_per_turn: int = Field(64, ge=1, description="Most tokens the model may write in one turn.")
    max_turns: int = Field(4, ge=1, le=1000, description="Most model turns per episode.")
    max_total_tokens: int = Field(512, ge=8, description="Most tokens per episode, prompt and observations included.")
    lockstep: Literal["auto", "on", "off"] = Field(
        "auto", description="Submit each turn of all episodes together so batches, and results, are reproducible "
        "bit for bit (exact --resume); auto: on for CPU, off elsewhere (where tool time overlaps generation).")


class AlgorithmConfig(_Frozen):
    advantage: str = Field("grpo", description="Advantage estimator (agentrl.trainer.algos).")
    policy_loss: str = Field("ppo_clip", description="Policy loss (agentrl.trainer.algos).")
    agg_mode: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = Field(
        "token_mean", description="How per-token losses are reduced.")
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="PPO ratio clip below 1.")
    clip_high: float = Field(0.2, ge=0.0, le=10.0, description="PPO ratio clip above 1 (DAPO clip-higher).")
    norm_by_std: bool = Field(True, description="GRPO: divide group-centred scores by the group std.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Weight of the entropy bonus.")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        "rollout", description="Ratio denominator: the engine's sampled logprobs, or a trainer forward pass "
        "before the update (use recompute when engine and trainer numerics differ).")
    kl_coef: float = Field(0.0, ge=0.0, description="Weight of KL(policy || reference); the reference is the "
                           "starting policy. 0 loads no reference.")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (Schulman's k1, k2, k3).")
    kl_mode: Literal["loss", "reward"] = Field(
        "loss", description="Add the KL as a loss term, or subtract kl_coef x summed KL from each episode's score.")
    tis: Literal["none", "token", "sequence"] = Field(
        "none", description="Truncated importance sampling with the engine's logprobs (needs old_logprobs=recompute).")
    tis_cap: float = Field(2.0, gt=0.0, description="Truncation of the TIS weight pi_old / pi_rollout.")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: drop groups whose rewards are all "
                                   "equal and sample more tasks to refill the batch.")
    max_sampling_rounds: int = Field(3, ge=1, le=100, description="Most rollout rounds per step when refilling.")


class OptimConfig(_Frozen):
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup, in optimizer steps.")


class TrainConfig(_Frozen):
    steps: int = Field(20, ge=0, description="RL steps (one rollout batch and one update each).")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per rollout batch.")
    micro_batch_tokens: int = Field(8192, ge=64, description="Token budget of one packed micro-batch.")
    seed: int = Field(0, ge=0, description="Seed of the data order, sampling and initialisation.")
    logprob_chunk: int = Field(2048, ge=16, description="Tokens per chunk of the vocabulary projection.")
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward (less memory).")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: float32 master weights, bfloat16 compute (on GPUs).")
    compile: bool = Field(False, description="torch.compile each decoder block and the logprob kernels "
                          "(on GPUs: faster steps after a one-time compile).")
    checkpoint_every: int = Field(
        10, ge=0, description="Save a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop the run after this many consecutive steps with a non-finite loss or gradient.")


class EvalConfig(_Frozen):
    split: str = Field("test", description="Held-out split to evaluate on.")
    num_tasks: int = Field(200, ge=0, description="Tasks evaluated (seeds 0..num_tasks-1 of the split).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature at evaluation.")
    before: bool = Field(True, description="Evaluate before training.")
    after: bool = Field(True, description="Evaluate after training.")
    seed: int = Field(1234, ge=0, description="Sampling seed at evaluation.")


class Config(_Frozen):
    """A whole training run."""

    model: ModelConfig
    env: EnvConfig
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str = Field("runs/default", description="Where metrics, checkpoints and the final model go.")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.algorithm.advantage in ("grpo", "rloo", "dr_grpo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"advantage {self.algorithm.advantage!r} compares samples of one task, so "
                             "rollout.samples_per_prompt must be at least 2")
        if self.algorithm.tis != "none" and self.algorithm.old_logprobs != "recompute":
            raise ValueError("algorithm.tis corrects the trainer's old logprobs towards the engine's, so it needs "
                             "algorithm.old_logprobs=recompute (with 'rollout' every weight would be exactly 1)")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.steps=5", "model.path=x"]` -> [("train.steps", 5), ("model.path", "x")] (YAML-typed values)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        out.append((key.strip(), value))
    return out


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent: Any = model
            for p in e["loc"][:-1]:
                field = parent.model_fields.get(str(p)) if isinstance(parent, type) else None
                parent = field.annotation if field is not None else None
            if isinstance(parent, type) and issubclass(parent, BaseModel):
                msg = f"unknown key.{did_you_mean(str(e['loc'][-1]), parent.model_fields)} Known: {', '.join(parent.model_fields)}"
        lines.append(f"  {loc or '(top)'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file of overrides, apply `key=value` overrides, and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, Config)) from None

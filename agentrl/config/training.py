"""Config sections of the trainer and the run around it: algorithm, critic, optimiser, training, evaluation, cluster, metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from agentrl.errors import did_you_mean
from agentrl.config.base import MAX_SEED, MAX_TOKENS, _registered, _Frozen

# Tool errors a policy causes by what it writes (the others are the tool's or the service's doing).
POLICY_TOOL_ERRORS = ("parse", "unknown_tool", "invalid_arguments", "runtime", "timeout", "output_too_large")


class AlgorithmConfig(_Frozen):
    advantage: str = Field(
        "grpo", description="Advantage estimator: one of agentrl.trainer.algos.ADVANTAGE_ESTIMATORS (outcome "
        "rewards: grpo, dr_grpo, rloo, reinforce_pp), turn_rloo (per-turn returns against the group, no critic) or "
        "gae (PPO with a learned critic; see the critic section). See docs/training.md, Credit assignment.")
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
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount: per model token for gae, per turn for "
                         "turn_rloo (observation tokens never count).")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda (gae only).")
    whiten_advantages: bool = Field(True, description="gae: whiten the advantages over the batch's model tokens "
                                    "(zero mean, unit std), as PPO implementations do.")
    tool_error_penalty: float = Field(
        0.0, ge=0.0, le=1e6, description="Subtracted from a turn's reward for each tool error of the kinds in "
        "tool_error_kinds that the turn's calls met (lands on the turn's last token; also lowers the score).")
    truncation_penalty: float = Field(
        0.0, ge=0.0, le=1e6, description="Subtracted from the reward of an episode that a token budget cut short "
        "(rollout.max_tokens_per_turn or max_total_tokens), on its last token. Where env steps cost reward, a "
        "policy would otherwise learn never to finish a turn (an unfinished turn never reaches the env).")
    tool_error_kinds: tuple[str, ...] = Field(
        ("parse", "unknown_tool", "invalid_arguments"), description="Tool error kinds tool_error_penalty applies "
        f"to; any of {', '.join(POLICY_TOOL_ERRORS)} (errors the policy's call caused).")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: drop groups whose rewards are all "
                                   "equal and sample more tasks to refill the batch.")
    normalize_per_env: bool = Field(
        True, description="With several envs: divide each env's advantages by their std over that env's trained "
        "tokens (no re-centring, so a group whose rewards are all equal keeps zero advantages), so an env with "
        "larger rewards does not dominate the gradient. Groups never span two envs either way.")
    max_sampling_rounds: int = Field(3, ge=1, le=100, description="Most rollout rounds per step when refilling.")

    @field_validator("advantage")
    @classmethod
    def _known_advantage(cls, v: str) -> str:
        from agentrl.trainer.algos import ADVANTAGE_ESTIMATORS, TOKEN_REWARD_ESTIMATORS

        if v in TOKEN_REWARD_ESTIMATORS or v in ADVANTAGE_ESTIMATORS:
            return _registered(ADVANTAGE_ESTIMATORS, v) if v in ADVANTAGE_ESTIMATORS else v
        known = ADVANTAGE_ESTIMATORS.ids()
        raise ValueError(f"unknown advantage estimator {v!r}.{did_you_mean(v, known + list(TOKEN_REWARD_ESTIMATORS))} "
                         f"Known: {', '.join(known)}; and reading per-turn rewards: "
                         f"{', '.join(TOKEN_REWARD_ESTIMATORS)}")

    @field_validator("tool_error_kinds")
    @classmethod
    def _policy_kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        wrong = [k for k in v if k not in POLICY_TOOL_ERRORS]
        if wrong:
            raise ValueError(f"tool_error_kinds {wrong} are not tool errors a policy causes; pick from "
                             f"{', '.join(POLICY_TOOL_ERRORS)} (infrastructure faults are never the policy's)")
        return v

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from agentrl.trainer.algos import POLICY_LOSSES

        return _registered(POLICY_LOSSES, v)


class CriticConfig(_Frozen):
    """The value model PPO trains beside the policy (`algorithm.advantage: gae`; docs/training.md)."""

    path: str | None = Field(
        None, description="Starting weights: a Hugging Face causal LM directory of the policy's architecture (its "
        "backbone is used, the value head starts at 0), or a critic exported by agentrl (backbone and head). "
        "null: model.path, the policy's own starting weights.")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="The critic's AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="The critic's AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip of the critic's step.")
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Linear learning-rate warmup, in critic steps.")
    value_clip: float = Field(
        0.5, gt=0.0, description="PPO value clipping: a new value counts at most this far from the value the "
        "returns were computed with (the larger of the clipped and unclipped squared errors is used).")


class OptimConfig(_Frozen):
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Linear learning-rate warmup, in optimizer steps.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"AdamW betas must each be in [0, 1), got {list(v)}")
        return v


class TrainConfig(_Frozen):
    steps: int = Field(20, ge=0, le=10**9, description="RL steps (one rollout batch and one update each).")
    mini_batches: int = Field(1, ge=1, le=100_000, description="Optimizer steps per rollout batch.")
    micro_batch_tokens: int = Field(8192, ge=64, le=64 * MAX_TOKENS,
                                    description="Token budget of one packed micro-batch.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the data order, sampling and initialisation.")
    logprob_chunk: int = Field(2048, ge=16, le=MAX_TOKENS, description="Tokens per chunk of the vocabulary projection.")
    schedule: Literal["synchronous", "asynchronous"] = Field(
        "synchronous", description="synchronous: each step's episodes are played with the latest weights, then "
        "trained on. asynchronous: later steps' episodes are played while the trainer updates (at most "
        "train.max_staleness policy versions behind); not bit-exact on resume. See docs/training.md.")
    max_staleness: int = Field(1, ge=0, le=64, description="asynchronous schedule: the most policy versions a "
                               "trained token may lag behind the policy being updated.")
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward (less memory).")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: float32 master weights, bfloat16 compute (on GPUs).")
    compile: bool = Field(False, description="torch.compile each decoder block and the logprob kernels "
                          "(on GPUs: faster steps after a one-time compile).")
    checkpoint_every: int = Field(
        10, ge=0, description="Save a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=10_000, description="Checkpoints kept on disk (older ones are deleted).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop the run after this many consecutive steps with a non-finite loss or gradient.")


class EvalConfig(_Frozen):
    split: str = Field("test", description="Held-out split to evaluate on.")
    num_tasks: int = Field(200, ge=0, le=10_000_000, description="Tasks evaluated (seeds 0..num_tasks-1 of the split).")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Sampling temperature at evaluation.")
    before: bool = Field(True, description="Evaluate before training.")
    after: bool = Field(True, description="Evaluate after training.")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="Sampling seed at evaluation.")


class ClusterConfig(_Frozen):
    """Where the run's parts run: all in this process, or as Ray actors (see docs/training.md, "Ray workers")."""

    mode: Literal["local", "ray"] = Field(
        "local", description="local: the engine, the envs and the trainer run in this process (laptops, CI, the "
        "quickstart); ray: rollout workers, and trainer ranks when trainer_workers > 1, run as Ray actors.")
    address: str | None = Field(
        None, description="Ray cluster to join (`auto`, `HOST:PORT`, `ray://HOST:10001`); unset starts a private "
        "Ray on this machine for the run and stops it at the end.")
    num_cpus: int | None = Field(
        None, ge=1, le=1_000_000, description="CPUs a private Ray may schedule on (unset: all of this machine's); "
        "only without cluster.address.")
    rollout_workers: int = Field(1, ge=1, le=4096, description="Rollout workers: each one engine, its envs and "
                                 "renderer (data-parallel engine replicas).")
    trainer_workers: int = Field(
        1, ge=1, le=4096, description="Trainer ranks, FSDP2-sharded across them (1: the trainer runs in the "
        "driver process).")
    cpus_per_rollout_worker: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs reserved per rollout worker.")
    gpus_per_rollout_worker: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per rollout worker (0 on CPU).")
    cpus_per_trainer_worker: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs reserved per trainer rank.")
    gpus_per_trainer_worker: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per trainer rank (0 on CPU).")
    calls_per_worker: int = Field(
        4, ge=1, le=1024, description="A step's groups are cut into rollout_workers x calls_per_worker calls of "
        "whole groups (fixed by the batch, never by timing); a worker plays one call at a time and the next call "
        "goes to the first worker that is free, so a slow worker plays fewer groups. 1: one fixed slice per worker "
        "(the largest engine batches, no balancing).")
    colocate: bool = Field(
        False, description="Rollout and training share devices: the engines sleep (free their KV cache) while the "
        "trainer steps and wake after; with Ray, rollout worker i and trainer rank i share one placement bundle.")
    health_timeout_s: float = Field(
        30.0, gt=0.0, le=86_400.0, description="A rollout worker with episodes in flight that answers no health "
        "check, or whose engine makes no progress, for this long is killed, restarted with the current weights, "
        "and its episodes are played again.")
    start_timeout_s: float = Field(
        600.0, gt=0.0, le=86_400.0, description="How long a worker may take to start (load its model) or to "
        "restart before it counts as lost.")
    max_worker_restarts: int = Field(3, ge=0, le=10_000, description="Restarts allowed per rollout worker.")
    max_episode_retries: int = Field(
        2, ge=0, le=100, description="Times the episodes of a lost worker are played again elsewhere; past that "
        "they are recorded as failed (worker_lost) and never trained on.")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.mode == "local":
            extra = [f"{k}={getattr(self, k)}" for k in ("rollout_workers", "trainer_workers") if getattr(self, k) > 1]
            extra += ["address"] if self.address is not None else []
            if extra:
                raise ValueError(f"cluster.{', cluster.'.join(extra)} needs Ray workers: set cluster.mode=ray")
        if self.address is not None and self.num_cpus is not None:
            raise ValueError("cluster.num_cpus sizes a private Ray; a cluster joined through cluster.address "
                             "has its own resources: unset one of them")
        for role in ("rollout", "trainer"):
            gpus = getattr(self, f"gpus_per_{role}_worker")
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"cluster.gpus_per_{role}_worker={gpus:g}: above 1, Ray places whole GPUs only")
        if self.mode == "ray" and self.colocate:
            if self.rollout_workers != self.trainer_workers and self.trainer_workers > 1:
                raise ValueError(f"cluster.colocate pairs rollout worker i with trainer rank i, so rollout_workers "
                                 f"({self.rollout_workers}) must equal trainer_workers ({self.trainer_workers})")
            if self.gpus_per_rollout_worker != self.gpus_per_trainer_worker and self.trainer_workers > 1:
                raise ValueError("cluster.colocate shares each device between a rollout worker and a trainer rank: "
                                 "gpus_per_rollout_worker must equal gpus_per_trainer_worker")
            if self.gpus_per_rollout_worker > 1:
                raise ValueError("cluster.colocate with more than one GPU per worker is not built; use 1 GPU per "
                                 "worker (one engine replica per trainer rank)")
        return self


class MetricsConfig(_Frozen):
    """Where per-step metrics go besides `run_dir/metrics.jsonl` and the console (docs/training.md, Metrics)."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to run_dir/tensorboard "
                              "(view them with `tensorboard --logdir RUN_DIR/tensorboard`).")
    wandb_project: str | None = Field(
        None, min_length=1, description="Also log to this Weights & Biases project (needs `pip install "
        "'agentrl[wandb]'` and `wandb login`); unset, wandb is never imported.")
    wandb_entity: str | None = Field(None, min_length=1, description="wandb user or team of the project "
                                     "(unset: your default entity).")
    save_trajectories: int = Field(
        4, ge=0, le=100_000, description="Episodes of each step saved to run_dir/trajectories/step-N.jsonl (tokens, "
        "logprobs, mask, tool calls and results) for the trajectory viewer of `agentrl report`; 0 saves none.")
    console_keys: tuple[str, ...] = Field(
        ("reward_mean", "success_rate", "loss", "approx_kl", "entropy", "grad_norm", "nonfinite_steps"),
        description="Metrics on each step's first console line (any key of metrics.jsonl; absent ones are skipped).")

    @model_validator(mode="after")
    def _entity_needs_project(self) -> MetricsConfig:
        if self.wandb_entity is not None and self.wandb_project is None:
            raise ValueError("metrics.wandb_entity is set but metrics.wandb_project is not; set the project too "
                             "(or unset the entity)")
        return self

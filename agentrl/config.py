"""The one source of configuration: frozen pydantic models with bounds and descriptions.

YAML files hold only overrides of these defaults, and `dotted.key=value` arguments on the command
line override the YAML. Unknown keys are errors with a "did you mean". Values derived from the
config (paths, counts) live in the code that uses them, never in a second copy of the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentrl.errors import ConfigError, RegistryError, did_you_mean

MAX_SEED = 2**32 - 1  # torch.manual_seed overflows past 64 bits; 32 bits (numpy's seed range) is ample
MAX_TOKENS = 1 << 20  # no model in reach has a longer context; above this a typo allocates terabytes


def _registered(registry: Any, name: str) -> str:
    """`name` if `registry` knows it; else a ValueError (which pydantic reports) with a "did you mean"."""
    try:
        registry.spec(name)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    return name


class _Frozen(BaseModel):
    # NaN or inf in a float field (`lr: .nan`) passes no bound check, so it is refused outright.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


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
    device: str = Field("cpu", description="Device of the trainer and the embedded engine: cpu, cuda or cuda:N.")
    lora: LoraConfig = LoraConfig()
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the chat template on every render, e.g. "
        "{enable_thinking: false} for Qwen3-style templates (see docs/models.md).")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", v):
            raise ValueError(f"unsupported device {v!r}; use cpu, cuda or cuda:N")
        return v


class EnvConfig(_Frozen):
    id: str = Field(description="Registered environment id, e.g. calculator-v0 (see `agentrl envs`).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the env constructor.")
    train_split: str = Field("train", description="Split that training tasks are drawn from.")
    allow_train_on_eval_split: bool = Field(
        False, description="Allow env.train_split to equal eval.split (the held-out score then means nothing).")


class TaskEnvConfig(EnvConfig):
    """One environment of a multi-task run (an entry of `envs`)."""

    weight: float = Field(1.0, gt=0.0, le=1e6, description="Sampling weight: each task group of a step is drawn from "
                          "this env with probability weight / (sum of the weights).")
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                             description="Name in metrics (env/<name>/...) and trajectories; defaults to the id. "
                             "Needed when one id appears twice (with different kwargs).")

    @property
    def key(self) -> str:
        return self.name or self.id


class ServerConfig(_Frozen):
    """The engine server of sglang or vllm (docs/backends.md): neither url nor launch runs the engine in-process."""

    url: str | None = Field(None, description="Connect to an engine server already running at this URL "
                            "(http://host:port); agentrl never starts or stops it.")
    launch: bool = Field(False, description="Start the engine server as a subprocess on a free port of 127.0.0.1 "
                         "(its output in run_dir/servers/), restart it after a crash, stop it at the end.")
    args: tuple[str, ...] = Field((), description="Extra command-line arguments for the launched server.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the launched "
                                "server.")
    startup_timeout_s: float = Field(600.0, gt=0.0, le=86_400.0, description="How long a server may take to "
                                     "answer its health check (model loading included).")
    max_restarts: int = Field(3, ge=0, le=1000, description="Crashes of a launched server restarted over a run "
                              "(with the current weights); one more stops the run.")

    @model_validator(mode="after")
    def _one_way(self) -> ServerConfig:
        if self.url is not None and self.launch:
            raise ValueError("give url (a running server) or launch: true (agentrl starts one), not both")
        if self.url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.url):
            raise ValueError(f"url must look like http://host:port, got {self.url!r}")
        return self


class RolloutConfig(_Frozen):
    engine: str = Field("auto", description="Inference backend (docs/backends.md): auto (the built-in engine when "
                        "it runs the model's architecture exactly, else sglang if installed, else vllm), embedded (the "
                        "built-in PyTorch engine), sglang, vllm, or another name in agentrl.rollout.engine.ENGINES.")
    server: ServerConfig = ServerConfig()
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the engine's constructor (e.g. sglang's "
        "mem_fraction_static, vllm's gpu_memory_utilization); an option the engine does not take is an error.")
    prompts_per_step: int = Field(16, ge=1, le=100_000, description="Tasks per training step.")
    samples_per_prompt: int = Field(8, ge=1, le=1024, description="Episodes per task (the GRPO group size).")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens_per_turn: int = Field(64, ge=1, le=MAX_TOKENS,
                                     description="Most tokens the model may write in one turn.")
    max_turns: int = Field(4, ge=1, le=1000, description="Most model turns per episode.")
    max_total_tokens: int = Field(512, ge=8, le=MAX_TOKENS,
                                  description="Most tokens per episode, prompt and observations included.")
    device: str | None = Field(
        None, description="Device of the built-in engine when everything runs in one process; null: model.device. "
        "Another GPU than the trainer's disaggregates rollout from training in one process (model.device=cuda:0, "
        "rollout.device=cuda:1): weights cross by a device-to-device copy, and train.schedule=asynchronous lets "
        "both GPUs work at once.")
    lockstep: Literal["auto", "on", "off"] = Field(
        "auto", description="Submit each turn of all episodes together so batches, and results, are reproducible "
        "bit for bit (exact --resume); auto: on for CPU, off elsewhere (where tool time overlaps generation).")

    @field_validator("lockstep", mode="before")
    @classmethod
    def _lockstep(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `on` / `off` as a boolean: `rollout.lockstep=on` means the word.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"cpu|cuda(:\d{1,3})?", v):
            raise ValueError(f"unsupported device {v!r}; use cpu, cuda or cuda:N (or leave it unset: model.device)")
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        from agentrl.rollout.engine import ENGINES

        return v if v == "auto" else _registered(ENGINES, v)

    @model_validator(mode="after")
    def _server_engine(self) -> RolloutConfig:
        if (self.server.url is not None or self.server.launch) and self.engine in ("auto", "embedded"):
            raise ValueError(f"rollout.server is for engines that run as servers, and rollout.engine={self.engine} "
                             "can mean the built-in engine, which runs in-process: set rollout.engine to sglang or "
                             "vllm")
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_error_fraction" in data:
            raise ValueError("rollout.max_error_fraction was replaced by failures.min_group_fraction (the share of "
                             "a step's task groups that must arrive sound; 0.5 by default): set that instead")
        return data


FailureAction = Literal["retry", "drop", "drop_group", "keep_zero_loss"]

#: What happens to an episode of each failure class when neither the config nor the env says
#: (see docs/training.md, "Failed episodes", for why). Keys: agentrl.rollout.trajectory.FAILURE_CLASSES.
FAILURE_DEFAULTS: dict[str, str] = {
    "worker_lost": "retry", "engine_error": "retry", "engine_timeout": "retry", "tool_infrastructure": "retry",
    "episode_deadline": "drop", "env_error": "drop_group", "template_refused": "drop_group",
}


def _policy_field(failure: str, what: str) -> Any:
    return Field(None, description=f"{what}: retry | drop | drop_group | keep_zero_loss. null: the env class's "
                 f"`failure_policy`, else {FAILURE_DEFAULTS[failure]}.")


class FailurePolicyConfig(_Frozen):
    """What happens to an episode that failed, by failure class (never trained on whatever the choice).

    retry: play the same task with the same seeds on a fresh env, up to failures.max_retries times
    (then failures.after_retries); drop: leave the episode out; drop_group: leave its whole task
    group out; keep_zero_loss: keep it in the batch with no gradient and outside its group's statistics.
    """

    worker_lost: FailureAction | None = _policy_field("worker_lost", "The rollout worker playing it died")
    engine_error: FailureAction | None = _policy_field("engine_error", "The inference engine raised on a request")
    engine_timeout: FailureAction | None = _policy_field(
        "engine_timeout", "An engine request passed failures.request_timeout_s")
    tool_infrastructure: FailureAction | None = _policy_field(
        "tool_infrastructure", "A tool's or sandbox's InfrastructureFault outlived the tool's retries")
    episode_deadline: FailureAction | None = _policy_field(
        "episode_deadline", "The episode passed failures.episode_timeout_s")
    env_error: FailureAction | None = _policy_field("env_error", "The env raised or broke its contract")
    template_refused: FailureAction | None = _policy_field(
        "template_refused", "The chat template refused the episode's conversation")


class FailuresConfig(_Frozen):
    """Episodes the infrastructure broke: how they are bounded, and what happens to them."""

    policy: FailurePolicyConfig = FailurePolicyConfig()
    max_retries: int = Field(2, ge=0, le=100, description="Most replays of one episode whose failure class's "
                             "policy is retry; after that, failures.after_retries applies.")
    after_retries: Literal["drop", "drop_group", "keep_zero_loss"] = Field(
        "drop", description="What happens to an episode still failing after failures.max_retries replays.")
    min_group_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop the run when fewer than this share of a step's task groups (of an "
        "evaluation's tasks) arrived: not dropped, with at least one sound episode. 0 never stops.")
    episode_timeout_s: float | None = Field(
        1800.0, gt=0.0, description="Wall-clock bound of one episode (reset, turns, tool calls; not the wait for "
        "other episodes in lockstep); past it the episode fails as episode_deadline. null: no bound.")
    request_timeout_s: float | None = Field(
        600.0, gt=0.0, description="Wall-clock bound of one engine request; past it the request is cancelled and "
        "the episode fails as engine_timeout. null: no bound.")


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


class Config(_Frozen):
    """A whole training run."""

    model: ModelConfig
    env: EnvConfig = Field(description="The environment (for several, use envs; then env is the first of them).")
    envs: tuple[TaskEnvConfig, ...] = Field(
        (), description="Several environments with sampling weights ([{id, weight, kwargs, train_split, name}]): "
        "each step's batch mixes them, metrics and evaluation are reported per env (env/<name>/...). Give env or "
        "envs, not both; with env alone, envs is that one env.")
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critic: CriticConfig = CriticConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    failures: FailuresConfig = FailuresConfig()
    metrics: MetricsConfig = MetricsConfig()
    run_dir: str = Field("runs/default", min_length=1, description="Where metrics, checkpoints and the final model go.")

    @model_validator(mode="before")
    @classmethod
    def _one_env_source(cls, data: Any) -> Any:
        """`env` alone, or `envs` alone (then `env` is the first entry); both is ambiguous."""
        if not isinstance(data, dict):
            return data
        has_env, envs = data.get("env") is not None, data.get("envs")
        if envs and isinstance(envs, (list, tuple)) and isinstance(envs[0], dict):
            first = {k: v for k, v in envs[0].items() if k not in ("weight", "name")}
            if has_env and data["env"] != first:  # a dumped config holds both, and they agree
                raise ValueError("give env (one environment) or envs (several), not both")
            return {**data, "env": first}
        if has_env and not envs and isinstance(data["env"], dict):
            return {**data, "envs": [data["env"]]}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        _check_envs(self)
        _check_credit(self)
        if self.algorithm.advantage in ("grpo", "rloo", "dr_grpo", "turn_rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"advantage {self.algorithm.advantage!r} compares samples of one task, so "
                             "rollout.samples_per_prompt must be at least 2")
        several = len(self.envs) > 1
        for k, e in enumerate(self.envs or (self.env,)):
            if e.train_split == self.eval.split and not e.allow_train_on_eval_split:
                where = f"envs[{k}]" if several else "env"
                raise ValueError(f"{where}.train_split and eval.split are both {self.eval.split!r}: training on the "
                                 "held-out split makes its score meaningless; pick another split, or set "
                                 f"{where}.allow_train_on_eval_split=true if you mean it")
        if (self.train.schedule == "asynchronous" and self.algorithm.tis == "none"
                and self.algorithm.old_logprobs == "recompute"):
            raise ValueError("train.schedule=asynchronous trains on tokens sampled by older policies, so the loss must "
                             "correct for the policy that sampled them: either algorithm.old_logprobs=rollout (the "
                             "PPO ratio then divides by the sampling policy's own logprobs) or "
                             "algorithm.old_logprobs=recompute with algorithm.tis=token (or sequence)")
        if self.algorithm.tis != "none" and self.algorithm.old_logprobs != "recompute":
            raise ValueError("algorithm.tis corrects the trainer's old logprobs towards the engine's, so it needs "
                             "algorithm.old_logprobs=recompute (with 'rollout' every weight would be exactly 1)")
        if self.train.schedule == "asynchronous" and self.cluster.colocate:
            raise ValueError("cluster.colocate puts the engines to sleep during the update, which is when "
                             "train.schedule=asynchronous plays the next step's episodes; use one or the other")
        if self.rollout.device not in (None, self.model.device):
            if self.cluster.mode == "ray":
                raise ValueError("rollout.device places the engine of a one-process run; Ray rollout workers use the "
                                 "GPUs Ray assigns (cluster.gpus_per_rollout_worker): leave rollout.device unset")
            if self.cluster.colocate:
                raise ValueError(f"cluster.colocate shares one device between engine and trainer, but rollout.device="
                                 f"{self.rollout.device} differs from model.device={self.model.device}: drop one")
            if "cpu" in (self.rollout.device, self.model.device):
                raise ValueError(f"rollout.device={self.rollout.device} with model.device={self.model.device}: split "
                                 "across two GPUs (cuda:N), or leave rollout.device unset")
        if self.cluster.mode == "ray":
            _check_ray_devices(self)
        return self


def _check_envs(cfg: Config) -> None:
    """Names of a multi-task run's envs are unique, and what is not built for several envs is refused."""
    keys = [e.key for e in cfg.envs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"envs names {twice} more than once; give the entries distinct `name`s")
    if len(cfg.envs) > 1 and cfg.cluster.mode == "ray":
        raise ValueError("several envs with cluster.mode=ray is not built (each Ray worker plays one env); "
                         "train several envs with cluster.mode=local")


def _check_credit(cfg: Config) -> None:
    """Settings of one estimator given with another would be silently unused: refuse them (compared with the
    defaults, so a config written back by a run, every field spelled out, still loads)."""
    a, defaults = cfg.algorithm, AlgorithmConfig()
    if a.dynamic_sampling and a.advantage in ("gae", "turn_rloo"):
        raise ValueError(f"algorithm.dynamic_sampling drops task groups whose episode rewards are all equal, but "
                         f"{a.advantage} learns from when rewards came, which such groups still show; turn it off "
                         "with this estimator")
    if a.advantage == "gae":
        return
    if cfg.critic != CriticConfig():
        raise ValueError(f"the critic section is set but algorithm.advantage is {a.advantage!r}, which trains no "
                         "critic; set algorithm.advantage=gae for PPO with a critic, or drop the critic section")
    unused = ["lam", "whiten_advantages"] + ([] if a.advantage == "turn_rloo" else ["gamma"])
    changed = [k for k in unused if getattr(a, k) != getattr(defaults, k)]
    if changed:
        raise ValueError(f"algorithm.{', algorithm.'.join(changed)} {'is' if len(changed) == 1 else 'are'} not used "
                         f"by advantage {a.advantage!r} (gamma: gae and turn_rloo; lam, whiten_advantages: gae); "
                         "drop them or pick that estimator")


def _check_ray_devices(cfg: Config) -> None:
    """model.device and the cluster's GPUs per worker must tell one story; refuse what Ray workers do not run."""
    c, device = cfg.cluster, cfg.model.device
    if device.startswith("cuda:"):
        raise ValueError(f"model.device={device}: a Ray worker uses the GPU Ray assigned to it; write model.device=cuda")
    roles = [("rollout", c.gpus_per_rollout_worker)] + ([("trainer", c.gpus_per_trainer_worker)]
                                                        if c.trainer_workers > 1 else [])
    for role, gpus in roles:
        if device == "cuda" and gpus == 0:
            raise ValueError(f"model.device=cuda but cluster.gpus_per_{role}_worker=0: give each {role} worker a GPU")
        if device == "cpu" and gpus > 0:
            raise ValueError(f"cluster.gpus_per_{role}_worker={gpus:g} but model.device=cpu: set model.device=cuda "
                             f"or gpus_per_{role}_worker=0")
    if c.trainer_workers == 1 and c.gpus_per_trainer_worker > 0:
        raise ValueError("cluster.gpus_per_trainer_worker applies to trainer_workers > 1; one trainer runs in the "
                         "driver process on model.device")
    if c.trainer_workers > 1:
        if cfg.model.lora.rank > 0:
            raise ValueError("model.lora with cluster.trainer_workers > 1 is not built (FSDP2-sharded LoRA); "
                             "train LoRA with one trainer worker")
        if cfg.algorithm.kl_coef > 0:
            raise ValueError("algorithm.kl_coef > 0 with cluster.trainer_workers > 1 is not built (the reference "
                             "model is not sharded yet); use kl_coef=0 or one trainer worker")


# A config holds overrides: a few hundred values at most. These bounds are far above any real one
# and far below what hurts: PyYAML's composer recurses per nesting level (a RecursionError near
# depth 1000), and aliases are shared on load but copied by validation and JSON dumps, so nine
# nested aliases of nine items each ("billion laughs") become a MemoryError after a long stall.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


def _scan_depth(text: str, where: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH, reading events (the event parser does not recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where} nests more than {MAX_YAML_DEPTH} levels deep (line "
                                  f"{event.start_mark.line + 1}); a config holds sections of plain values")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Count the nodes `root` expands to with aliases resolved, refusing cycles, expansions past
    MAX_YAML_NODES and duplicate keys, without expanding anything (memoised over the node graph)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: alias chains may be far deeper than the text's nesting
        node, done = stack.pop()
        key = id(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES} values through YAML aliases "
                                  f"(line {node.start_mark.line + 1}); write the values out or use fewer aliases")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where} has a YAML alias that contains itself (line {node.start_mark.line + 1})")
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise ConfigError(f"{where} gives the key {dup!r} twice in one section (line "
                                  f"{node.start_mark.line + 1}); keep one")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def safe_yaml(text: str, where: str) -> Any:
    """Parse config YAML with bounds: depth, alias expansion, duplicate keys, plain types only.

    Args:
        text: The YAML text.
        where: How to name it in errors ("configs/a.yaml", "override 'x=...'").
    """
    try:
        _scan_depth(text, where)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return None
        _check_nodes(root, where)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


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
        value = safe_yaml(raw, f"override {item[:80]!r}") if raw.strip() else ""
        out.append((key.strip(), value))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    """All problems of a config on one line: `field: what is wrong (got X)`, with "did you mean" for typos."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent: Any = model
            for p in e["loc"][:-1]:
                field = parent.model_fields.get(str(p)) if isinstance(parent, type) else None
                parent = field.annotation if field is not None else None
            if isinstance(parent, type) and issubclass(parent, BaseModel):
                msg = (f"unknown key.{did_you_mean(str(e['loc'][-1]), parent.model_fields)} "
                       f"Known: {', '.join(parent.model_fields)}")
        elif e["type"] == "missing":
            msg = "required; set it in the config file or as an override"
        elif not e["type"].startswith("value_error") and not isinstance(e.get("input"), dict):
            msg += f" (got {_short(e.get('input'))})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The override tree of a YAML config file, refused clearly when it is not a small text mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a file; pass the path of a YAML file")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {p.stat().st_size} bytes, more than a config's "
                              f"limit of {MAX_CONFIG_BYTES}; a config holds overrides, not data")
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); "
                          "is it a binary file?") from None
    if "\x00" in text:
        raise ConfigError(f"config file {str(p)!r} holds NUL bytes; it is not a YAML text file")
    loaded = safe_yaml(text, str(p)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (model:, env:, ...), got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file of overrides, apply `key=value` overrides, and validate."""
    tree: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, Config)) from None

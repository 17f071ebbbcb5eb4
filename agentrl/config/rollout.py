"""Config sections of the rollout side: the model, the environments, the engine and its server, failed episodes."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from agentrl.config.base import MAX_TOKENS, _registered, _Frozen

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

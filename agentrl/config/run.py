"""`Config`, a whole run: its sections and the checks that span several of them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from agentrl.config.base import _Frozen
from agentrl.config.rollout import ModelConfig, EnvConfig, TaskEnvConfig, RolloutConfig, FailuresConfig
from agentrl.config.training import AlgorithmConfig, CriticConfig, OptimConfig, TrainConfig, EvalConfig, ClusterConfig, MetricsConfig

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

"""The rollout side of a run: an engine (chosen by name), a pool of envs and the chat renderer.

It is all `agentrl eval` loads: no trainable copy of the model. The engine comes from the
`ENGINES` registry by `rollout.engine`, resolved first when it is `auto` (`engine_plan`; the driver
never imports a backend), and every check that can fail cheaply runs before the model is loaded
(see `preflight.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentrl.config import Config
from agentrl.driver.failures import FailurePolicy
from agentrl.driver.preflight import build_env, check_device, check_model_dir, check_splits, reported
from agentrl.envs.core import Env
from agentrl.envs.registration import make
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.backends.managed import ServerSpec
from agentrl.rollout.backends.selection import engine_arguments, resolve_engine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import ENGINES, SamplingParams
from agentrl.rollout.engine_meter import MeteredEngine
from agentrl.rollout.trajectory import Trajectory
from agentrl.tools.blocking import run_blocking

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnginePlan:
    """The engine a rollout side builds: `rollout.engine` resolved, and its constructor's extra keywords.

    Attributes:
        name: The engine's name (never `auto`).
        engine: Its class, from `ENGINES`.
        kwargs: `server` (for engines that take one) and `rollout.engine_options`, checked against
            the constructor.
    """

    name: str
    engine: type
    kwargs: dict[str, Any]


def engine_plan(cfg: Config, path: str, field: str, server_logs: str | None) -> EnginePlan:
    """Resolve `rollout.engine` for the model in `path` and check the engine's options; loads nothing.

    Args:
        cfg: The run's config.
        path: The model directory (its config.json decides `auto`).
        field: Where `path` was given (`model.path`, `--model`), for messages.
        server_logs: Where a launched engine server writes its log (None: a temp directory).
    """
    r = cfg.rollout
    fix = f"check that {field} holds a complete Hugging Face causal LM, saved with save_pretrained"
    with reported(f"cannot read the model config in {field} {path!r}", fix):
        name = resolve_engine(r.engine, path, r.max_total_tokens + 1)
    label = name if name == r.engine else f"{name} (picked by rollout.engine=auto)"
    if name != r.engine:
        logger.info("rollout.engine=auto: using the %s engine for %s", name, path)
    engine = ENGINES.get(name)
    server = ServerSpec(**r.server.model_dump(), log_dir=server_logs)
    return EnginePlan(name, engine, engine_arguments(engine, label, server, r.engine_options))


@dataclass
class RolloutSide:
    """What plays episodes: the engine sampling from the policy, the envs, the renderer."""

    cfg: Config
    path: str
    tokenizer: object
    engine: MeteredEngine  # the backend, with its busy time and tokens counted for the metrics
    pool: EnvPool
    renderer: ChatRenderer

    @classmethod
    def open(cls, cfg: Config, model_path: str | None = None, splits: Sequence[tuple[str, str]] = (),
             server_logs: str | None = None) -> RolloutSide:
        """Check, then load; cheap checks come before expensive loads.

        Args:
            cfg: The run's config.
            model_path: A model directory other than model.path (`agentrl eval --model`).
            splits: (split, where it was given) pairs that will be played, e.g. ("train",
                "env.train_split"); each must exist and its prompts must fit rollout.max_total_tokens.
            server_logs: Where a launched engine server writes its log; default `<run_dir>/servers`.
        """
        if len(cfg.envs) > 1:
            raise ConfigError(f"RolloutSide plays one env and this config lists {len(cfg.envs)}: open it with "
                              "agentrl.driver.tasks.open_rollout_side (one side per env on one engine)")
        path = model_path or cfg.model.path
        field = "--model" if model_path else "model.path"
        check_device(engine_device(cfg), "rollout.device" if cfg.rollout.device else "model.device")
        check_model_dir(path, field, cfg.rollout.max_total_tokens)
        FailurePolicy.for_env(cfg.failures, cfg.env.id)  # an env's bad failure_policy is refused before any load
        plan = engine_plan(cfg, path, field, server_logs or str(Path(cfg.run_dir) / "servers"))
        probe = build_env(cfg.env.id, cfg.env.kwargs)
        try:
            return cls._load(cfg, path, field, probe, splits, plan)
        except BaseException:
            probe.close()  # an env may hold a subprocess or a connection
            raise

    @classmethod
    def _load(cls, cfg: Config, path: str, field: str, probe: Env, splits: Sequence[tuple[str, str]],
              plan: EnginePlan) -> RolloutSide:
        tokenizer, renderer = load_renderer(cfg, path, field, probe, splits)
        r = cfg.rollout
        fix = f"check that {field} holds a complete Hugging Face causal LM, saved with save_pretrained"
        with reported(f"cannot load the model in {field} {path!r} into the {plan.name} engine", fix):
            engine = MeteredEngine(plan.engine(path, device=engine_device(cfg), dtype=DTYPES[cfg.model.dtype],
                                               max_model_len=r.max_total_tokens + 1, **plan.kwargs))
        pool = EnvPool(lambda: make(cfg.env.id, **cfg.env.kwargs))
        pool.give(probe)
        return cls(cfg, path, tokenizer, engine, pool, renderer)

    def sampling(self, temperature: float, seed: int | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_tokens=r.max_tokens_per_turn, seed=seed)

    def limits(self) -> EpisodeLimits:
        r, f = self.cfg.rollout, self.cfg.failures
        return EpisodeLimits(max_turns=r.max_turns, max_total_tokens=r.max_total_tokens,
                             episode_timeout_s=f.episode_timeout_s, request_timeout_s=f.request_timeout_s)

    def play(self, specs: list[EpisodeSpec], temperature: float, seed: int | None = None) -> list[Trajectory]:
        """Play `specs` concurrently on the engine; one trajectory each, in order."""
        # run_blocking, not asyncio.run: its shutdown waits a bounded time for a tool that ignores cancellation
        return run_blocking(run_episodes(self.engine, self.pool, self.renderer, self.sampling(temperature, seed),
                                         self.limits(), specs, env_id=self.cfg.env.id, lockstep=lockstep_on(self.cfg)))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """The trainer's weights into the engine, in place (no disk, no copy through serialisation)."""
        self.engine.update_weights(state_dict, version=version)

    def sleep(self) -> float:
        """Free the engine's KV cache while the trainer steps (`cluster.colocate`); returns the seconds it took."""
        t0 = time.perf_counter()
        self.engine.sleep()
        return time.perf_counter() - t0

    def wake(self) -> float:
        t0 = time.perf_counter()
        self.engine.wake()
        return time.perf_counter() - t0

    def abort(self) -> None:
        """End the engine's requests in flight (a clean stop on SIGTERM)."""
        self.engine.abort()

    def worker_metrics(self) -> dict[str, float]:
        """Counters of lost and restarted workers since the last call: none in one process."""
        return {}

    def close(self) -> None:
        self.pool.close()
        close = getattr(self.engine, "close", None)  # the built-in engine joins its thread
        if close is not None:
            close()


def engine_device(cfg: Config) -> str:
    """Where the engine of a one-process run lives: rollout.device, else model.device (the trainer's)."""
    return cfg.rollout.device or cfg.model.device


def lockstep_on(cfg: Config) -> bool:
    """rollout.lockstep resolved: `auto` is on for CPU engines, off elsewhere."""
    lock = cfg.rollout.lockstep
    return lock == "on" or (lock == "auto" and torch.device(engine_device(cfg)).type == "cpu")


def load_renderer(cfg: Config, path: str, field: str, probe: Env,
                  splits: Sequence[tuple[str, str]]) -> tuple[object, ChatRenderer]:
    """The tokenizer and chat renderer of `path`, after checking every split's prompts fit the episode bounds."""
    from transformers import AutoTokenizer

    r = cfg.rollout
    fix = f"check that {field} holds a complete Hugging Face causal LM, saved with save_pretrained"
    with reported(f"cannot load the tokenizer of {field} {path!r}", fix):
        tokenizer = AutoTokenizer.from_pretrained(path)
    with reported(f"cannot render prompts with the chat template of {field} {path!r}", fix):
        renderer = ChatRenderer(tokenizer, probe.tool_schemas(), template_kwargs=cfg.model.chat_template_kwargs)
        check_splits(probe, cfg.env.id, splits, lambda messages: len(renderer.prompt_ids(messages)),
                     r.max_total_tokens, r.max_tokens_per_turn)
    return tokenizer, renderer

"""`check_env`: does an environment keep the agentrl contract, under normal and hostile play?

An env that is nondeterministic, returns the wrong types, leaks child processes or crashes on a
malformed model turn breaks training runs far from its own code. `check_env` runs, each on fresh
instances, Gymnasium's own checker functions where they apply, then agentrl's checks
(`agentrl.envs.checks`): seeded reset and short episodes are deterministic, returns have the
right types, rewards are finite, `step` after the end raises `EnvError`, `close()` twice is fine
and leaves no child process, splits are disjoint, and N episodes of hostile turns raise nothing.

What applies of Gymnasium's checker (`gymnasium.utils.env_checker`), function by function: the
space checks, the reset checks (signature, return type, RNG seeding, options), and the step
checks (passive checks, one-step determinism, no data reused between calls). What does not: the
render checks (text envs declare no render modes) and the close check (it needs a Gymnasium
`EnvSpec`; agentrl's close check replaces it). Gymnasium compares seeded reset observations only
for envs that have a spec, which is why agentrl checks that itself. Gymnasium's warnings become
WARN rows, not failures.

An env whose steps may legitimately differ between runs (a live web tool) sets the class
attribute `nondeterministic = True`; the step-determinism checks are then skipped.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gymnasium.utils import env_checker as gym_checker

from agentrl.envs import checks
from agentrl.envs.checks import ENV_FAILURES, CheckFailed, CheckSkipped, EnvFactory, where_raised
from agentrl.envs.core import Env

Status = Literal["pass", "fail", "skip", "warn"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class CheckResult:
    """One row of the report: a check's name, its outcome and what it found."""

    name: str
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    """All results of `check_env`; `ok` is False when any check failed."""

    env: str
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.status == "fail")


def _run(name: str, check: Callable[[], str | None]) -> CheckResult:
    """Run one check, turning its outcome (and any warning or exception) into a row."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            summary = check() or ""
        except CheckSkipped as exc:
            return CheckResult(name, "skip", str(exc))
        except CheckFailed as exc:
            return CheckResult(name, "fail", str(exc))
        except ENV_FAILURES as exc:  # noqa: BLE001 - an assertion of Gymnasium's, a crash or an exit in the env
            return CheckResult(name, "fail", f"{type(exc).__name__}: {str(exc)[:500]}{where_raised(exc)}")
    # UserWarning is what Gymnasium's logger.warn emits; library deprecations are noise here
    notes = list(dict.fromkeys(_ANSI.sub("", str(w.message)).removeprefix("WARN: ")
                               for w in caught if issubclass(w.category, UserWarning)))
    if notes:
        return CheckResult(name, "warn", "; ".join(n[:300] for n in notes[:3]))
    return CheckResult(name, "pass", summary)


def _on_fresh(make_env: EnvFactory, fn: Callable[[Env], Any]) -> Callable[[], None]:
    def run() -> None:
        env = make_env()
        try:
            fn(env)
        finally:
            env.close()

    return run


def _step_passive(env: Env) -> None:
    env.reset(seed=0)
    gym_checker.env_step_passive_checker(env, env.action_space.sample())


def gymnasium_checks(make_env: EnvFactory) -> list[tuple[str, Callable[[], Any]]]:
    """(name, check) for each function of Gymnasium's `check_env` that applies to text envs."""
    on_env = [gym_checker.check_seed_deprecation, gym_checker.check_reset_return_info_deprecation,
              gym_checker.check_reset_return_type, gym_checker.check_reset_seed_determinism,
              gym_checker.check_reset_options, gym_checker.env_reset_passive_checker]
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("gymnasium: action space", _on_fresh(make_env, lambda e: gym_checker.check_action_space(e.action_space))),
        ("gymnasium: observation space",
         _on_fresh(make_env, lambda e: gym_checker.check_observation_space(e.observation_space))),
    ]
    rows += [(f"gymnasium: {fn.__name__}", _on_fresh(make_env, fn)) for fn in on_env]
    rows.append(("gymnasium: env_step_passive_checker", _on_fresh(make_env, _step_passive)))

    def deterministic_only(fn: Callable[[Env], None]) -> Callable[[Env], None]:
        def run(env: Env) -> None:
            if getattr(env, "nondeterministic", False):
                raise CheckSkipped("the env declares nondeterministic = True")
            fn(env)

        return run

    rows.append(("gymnasium: check_step_determinism",
                 _on_fresh(make_env, deterministic_only(gym_checker.check_step_determinism))))
    rows.append(("gymnasium: check_returned_data_not_reused",
                 _on_fresh(make_env, gym_checker.check_returned_data_not_reused)))
    return rows


def _skipped_gymnasium_rows() -> list[CheckResult]:
    return [
        CheckResult("gymnasium: render checks", "skip", "text envs declare no render modes"),
        CheckResult("gymnasium: close check", "skip", "needs a gymnasium EnvSpec; agentrl's close check replaces it"),
    ]


def _factory(env: str | Callable[..., Env], kwargs: dict[str, Any]) -> tuple[str, EnvFactory]:
    if isinstance(env, str):
        from agentrl.envs.registration import make

        return env, lambda: make(env, **kwargs)
    return getattr(env, "__name__", repr(env)), (lambda: env(**kwargs))


def check_env(env: str | Callable[..., Env], *, episodes: int = 10, seed: int = 0, max_turns: int = 20,
              split_samples: int = 200, env_kwargs: dict[str, Any] | None = None) -> CheckReport:
    """Check an environment against Gymnasium's and agentrl's contracts.

    Args:
        env: A registered env id, or a factory of fresh instances (an env class works).
        episodes: Episodes of hostile play (and of plain play for the reward check).
        seed: Base seed of every check.
        max_turns: Turns per episode in the played checks.
        split_samples: Seeds per split drawn to compare the splits' tasks.
        env_kwargs: Keyword arguments for `make(env, ...)` or the factory.

    Returns:
        A `CheckReport`; it never raises for a broken env (building the env included).

    Example:
        >>> report = check_env("calculator-v0", episodes=3)
        >>> report.ok
        True
    """
    name, make_env = _factory(env, dict(env_kwargs or {}))
    built = _run("build the env", lambda: make_env().close())
    if built.status == "fail":
        return CheckReport(name, (built,))
    rows = [built] + [_run(n, fn) for n, fn in gymnasium_checks(make_env)] + _skipped_gymnasium_rows()
    ours: list[tuple[str, Callable[[], str | None]]] = [
        ("seeded reset is deterministic", lambda: checks.check_reset_determinism(make_env)),
        ("episodes are deterministic", lambda: checks.check_episode_determinism(make_env, seed)),
        ("return types", lambda: checks.check_return_types(make_env, seed)),
        ("rewards are finite", lambda: checks.check_rewards_finite(make_env, seed, episodes, max_turns)),
        ("step after the end raises EnvError", lambda: checks.check_step_after_end(make_env, seed)),
        ("close() twice, no child process left", lambda: checks.check_close(make_env, seed)),
        ("splits are disjoint", lambda: checks.check_splits_disjoint(make_env, split_samples)),
        (f"hostile actions ({episodes} episodes)",
         lambda: checks.check_hostile_actions(make_env, seed, episodes, max_turns)),
    ]
    rows += [_run(n, fn) for n, fn in ours]
    return CheckReport(name, tuple(rows))

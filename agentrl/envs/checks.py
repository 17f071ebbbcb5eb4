"""The individual checks behind `agentrl.envs.checker.check_env`, and the validators they share.

Each check takes a factory of fresh env instances (so one broken check cannot spoil the next),
returns a one-line summary when the env passes, raises `CheckFailed` with what was expected, what
came back and how to fix it when it does not, and `CheckSkipped` when it does not apply.
"""

from __future__ import annotations

import math
import os
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

from gymnasium.utils.env_checker import data_equivalence

from agentrl.envs.core import Env, Message
from agentrl.envs.hostile import hostile_actions
from agentrl.errors import EnvError
from agentrl.tools.blocking import run_blocking

EnvFactory = Callable[[], Env]
# What an env's own code may raise and the checker reports instead of obeying: `sys.exit()` in an
# env must not end the check before its report. KeyboardInterrupt is left out: it may be Ctrl-C.
ENV_FAILURES = (Exception, SystemExit, GeneratorExit)
ROLES = ("system", "user", "assistant", "tool")
_PLAIN_ANSWERS = ("The answer is 42.", "42", "<action>0</action>", "0")


class CheckFailed(Exception):
    """Raised inside a check: the env broke the contract (message says how)."""


class CheckSkipped(Exception):
    """Raised inside a check: it does not apply to this env (message says why)."""


def where_raised(exc: BaseException) -> str:
    """' (at file:line in function)' of the innermost frame, to point at the env's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    path = os.path.relpath(f.filename) if f.filename.startswith(os.getcwd()) else f.filename
    return f" (at {path}:{f.lineno} in {f.name})"


def _type(value: Any) -> str:
    """The type's name, module-qualified unless builtin (numpy 2 calls its bool type `bool` too)."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


# -- validators shared by the checks -------------------------------------------------------
def validate_observation(obs: Any, where: str) -> None:
    if not isinstance(obs, tuple):
        raise CheckFailed(f"{where} returned an observation of type {_type(obs)}; expected a tuple of Message")
    for m in obs:
        if not isinstance(m, Message):
            raise CheckFailed(f"{where} returned an observation holding a {_type(m)}; expected Message")
        if m.role not in ROLES or not isinstance(m.content, str):
            raise CheckFailed(f"{where} returned a Message with role {m.role!r} and content of type "
                              f"{_type(m.content)}; expected a role in {ROLES} and str content")


def validate_reset(result: Any, where: str = "reset()") -> tuple[tuple[Message, ...], dict]:
    if not isinstance(result, tuple) or len(result) != 2:
        raise CheckFailed(f"{where} returned {_short(result)}; expected (observation, info)")
    validate_observation(result[0], where)
    if not isinstance(result[1], dict):
        raise CheckFailed(f"{where} returned info of type {_type(result[1])}; expected dict")
    return result


def validate_step(result: Any, where: str = "step()") -> tuple:
    if not isinstance(result, tuple) or len(result) != 5:
        raise CheckFailed(f"{where} returned {_short(result)}; "
                          "expected (observation, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = result
    validate_observation(obs, where)
    if not isinstance(reward, (int, float)) or isinstance(reward, bool):
        raise CheckFailed(f"{where} returned a reward of type {_type(reward)}; expected float")
    if not math.isfinite(reward):
        raise CheckFailed(f"{where} returned a non-finite reward {reward!r}")
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if type(flag) is not bool:
            raise CheckFailed(f"{where} returned {name} of type {_type(flag)}; expected bool (wrap it in bool())")
    if not isinstance(info, dict):
        raise CheckFailed(f"{where} returned info of type {_type(info)}; expected dict")
    return result


def _benign_action(env: Env, rng: random.Random) -> str:
    """The env's own demonstrator half of the time (when it has one), else a plain answer."""
    scripted = getattr(env, "scripted_action", None)
    if scripted is not None and rng.random() < 0.5:
        try:
            return str(scripted(rng))
        except Exception:  # noqa: BLE001 - a demonstrator that needs more context is not the env's contract
            pass
    return rng.choice(_PLAIN_ANSWERS)


def _play(env: Env, seed: int, split: str, policy: Callable[[], str], max_turns: int) -> list[tuple]:
    """Reset, then step with `policy` until the episode ends or `max_turns`; all returns, validated."""
    try:
        first = env.reset(seed=seed, options={"split": split})
    except ENV_FAILURES as exc:  # noqa: BLE001 - the report names it
        raise CheckFailed(f"split {split!r} seed {seed}: reset raised {type(exc).__name__}: "
                          f"{str(exc)[:300]}{where_raised(exc)}") from exc
    out: list[tuple] = [validate_reset(first, f"reset(seed={seed})")]
    for turn in range(1, max_turns + 1):
        action = policy()
        try:
            result = env.step(action)
        except ENV_FAILURES as exc:  # noqa: BLE001 - the report names it
            raise CheckFailed(f"split {split!r} seed {seed} turn {turn}: step raised {type(exc).__name__}: "
                              f"{str(exc)[:300]}{where_raised(exc)}; action: {_short(action, 80)}") from exc
        out.append(validate_step(result, f"step() at turn {turn} (split {split!r}, seed {seed})"))
        if result[2] or result[3]:
            break
    return out


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _same(a: Any, b: Any) -> bool:
    return data_equivalence(a, b, exact=True)


_PARTS = {2: ("observation", "info"), 5: ("observation", "reward", "terminated", "truncated", "info")}


def _first_difference(a: tuple, b: tuple) -> str:
    """Which part of two reset or step results differs first, and how."""
    names = _PARTS.get(len(a), ())
    for i, (x, y) in enumerate(zip(a, b)):
        if not _same(x, y):
            return f"{names[i] if i < len(names) else f'element {i}'} {_short(x)} vs {_short(y)}"
    return f"lengths {len(a)} vs {len(b)}"


# -- agentrl's checks ----------------------------------------------------------------------
def check_reset_determinism(make_env: EnvFactory, seeds: range = range(5)) -> str:
    env, fresh = make_env(), make_env()
    try:
        for split in env.splits:
            for seed in seeds:
                opts = {"split": split}
                first = validate_reset(env.reset(seed=seed, options=opts))
                env.reset(seed=seed + 1000, options=opts)
                again = validate_reset(env.reset(seed=seed, options=opts))
                other = validate_reset(fresh.reset(seed=seed, options=opts))
                for label, result in (("after another reset", again), ("on a fresh instance", other)):
                    if not _same(first, result):
                        raise CheckFailed(f"reset(seed={seed}, options={opts}) gave a different result {label}: "
                                          f"{_first_difference(first, result)}")
    finally:
        env.close()
        fresh.close()
    return f"{len(seeds)} seeds on each of {len(env.splits)} splits"


def check_episode_determinism(make_env: EnvFactory, seed: int, turns: int = 6) -> str:
    probe = make_env()
    if getattr(probe, "nondeterministic", False):
        probe.close()
        raise CheckSkipped("the env declares nondeterministic = True")
    runs = []
    for env in (probe, make_env()):
        rng = random.Random(seed)
        try:
            runs.append(_play(env, seed, env.splits[0], lambda env=env, rng=rng: _benign_action(env, rng), turns))
        finally:
            env.close()
    for turn, (a, b) in enumerate(zip(*runs)):
        if not _same(a, b):
            raise CheckFailed(f"two fresh instances played the same seed and actions differently at "
                              f"{'reset' if turn == 0 else f'turn {turn}'}: {_first_difference(a, b)}")
    if len(runs[0]) != len(runs[1]):
        raise CheckFailed(f"the same seed and actions ended after {len(runs[0]) - 1} turns once and "
                          f"{len(runs[1]) - 1} turns the other time")
    return f"{_count(len(runs[0]) - 1, 'turn')} replayed identically"


def check_return_types(make_env: EnvFactory, seed: int) -> str:
    env = make_env()
    rng = random.Random(seed)
    try:
        for split in env.splits:
            _play(env, seed, split, lambda: _benign_action(env, rng), 3)
        validate_reset(run_blocking(env.areset(seed=seed, options={"split": env.splits[0]})), "areset()")
        validate_step(run_blocking(env.astep(_benign_action(env, rng))), "astep()")
    finally:
        env.close()
    return "reset, step, areset and astep on every split"


def check_rewards_finite(make_env: EnvFactory, seed: int, episodes: int, max_turns: int) -> str:
    env = make_env()
    rng = random.Random(seed)
    steps, total = 0, 0.0
    try:
        for i in range(episodes):
            played = _play(env, seed + i, env.splits[i % len(env.splits)], lambda: _benign_action(env, rng), max_turns)
            steps += len(played) - 1
            total += sum(r[1] for r in played[1:])
    finally:
        env.close()
    return f"{_count(steps, 'step')} over {_count(episodes, 'episode')}, total reward {total:g}"


def _expect_env_error(call: Callable[[], Any], what: str) -> None:
    try:
        call()
    except EnvError:
        return
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"{what} after the episode ended raised {type(exc).__name__}: {str(exc)[:200]}; "
                          "expected agentrl.errors.EnvError") from exc
    raise CheckFailed(f"{what} after the episode ended returned normally; it must raise agentrl.errors.EnvError "
                      "(keep a done flag, set it when terminated or truncated)")


def check_step_after_end(make_env: EnvFactory, seed: int, max_turns: int = 200) -> str:
    env = make_env()
    rng = random.Random(seed)
    try:
        played = _play(env, seed, env.splits[0], lambda: _benign_action(env, rng), max_turns)
        if not (len(played) > 1 and (played[-1][2] or played[-1][3])):
            raise CheckSkipped(f"no episode ended within {max_turns} turns of plain answers and the env's "
                               "scripted_action; give the env a scripted_action(rng) that finishes episodes")
        _expect_env_error(lambda: env.step("The answer is 42."), "step()")
        _expect_env_error(lambda: run_blocking(env.astep("The answer is 42.")), "astep()")
    finally:
        env.close()
    return f"EnvError after an episode of {_count(len(played) - 1, 'turn')}"


def _descendants() -> dict[int, str]:
    """pid -> 'name (state)' of every descendant of this process, read from /proc."""
    parent_of: dict[int, int] = {}
    label: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :].split()
        parent_of[int(entry)], label[int(entry)] = int(rest[1]), f"{name} ({rest[0]})"
    found, frontier = {}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parent_of.items():
            if parent == pid and child not in found:
                found[child] = label[child]
                frontier.append(child)
    return found


def check_close(make_env: EnvFactory, seed: int, grace_s: float = 1.0) -> str:
    if not os.path.isdir("/proc"):
        raise CheckSkipped("no /proc on this system, so child processes cannot be listed")
    before = _descendants()
    env = make_env()
    rng = random.Random(seed)
    _play(env, seed, env.splits[0], lambda: _benign_action(env, rng), 3)
    for attempt in ("first", "second"):
        try:
            env.close()
        except Exception as exc:  # noqa: BLE001
            raise CheckFailed(f"the {attempt} close() raised {type(exc).__name__}: {str(exc)[:200]}"
                              f"{where_raised(exc)}; close() must be idempotent") from exc
    deadline = time.monotonic() + grace_s
    while (left := {p: n for p, n in _descendants().items() if p not in before}) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        listed = ", ".join(f"{pid} {name}" for pid, name in sorted(left.items())[:5])
        raise CheckFailed(f"close() left {len(left)} child process(es) behind: {listed} (state Z = not reaped)")
    return "close() twice; no child process left"


def _task_text(obs: tuple[Message, ...]) -> str:
    return "\n".join(m.content for m in obs if m.role != "system")


def check_splits_disjoint(make_env: EnvFactory, samples: int = 200) -> str:
    env = make_env()
    try:
        if len(env.splits) < 2:
            raise CheckSkipped(f"the env has one split {env.splits}")
        tasks = {s: {_task_text(env.reset(seed=i, options={"split": s})[0]) for i in range(samples)}
                 for s in env.splits}
    finally:
        env.close()
    names = list(tasks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = tasks[a] & tasks[b]
            if shared:
                raise CheckFailed(f"splits {a!r} and {b!r} share {len(shared)} of their tasks "
                                  f"(seeds 0..{samples - 1}), "
                                  f"e.g. {_short(min(shared), 160)}; assign each task to one split, e.g. by a hash "
                                  "of its text")
    return ", ".join(f"{s}: {len(t)} distinct tasks" for s, t in tasks.items()) + f" of {samples} seeds; no overlap"


def check_hostile_actions(make_env: EnvFactory, seed: int, episodes: int, max_turns: int) -> str:
    """Play at least `episodes` episodes, and enough to send every hostile turn at least once.

    Seven turns in ten are hostile, taken in a shuffled cycle over `hostile_actions`; the rest
    come from the benign policy so that episodes move on.
    """
    env = make_env()
    rng = random.Random(seed)
    tool_names = [t.get("function", {}).get("name", "") for t in env.tool_schemas()]
    actions = hostile_actions(env.tool_schemas())
    rng.shuffle(actions)
    sent, turns, played = 0, 0, 0
    failures: list[str] = []
    tool_errors: dict[str, int] = {}

    def policy() -> str:
        nonlocal sent
        if rng.random() >= 0.7:
            return _benign_action(env, rng)
        sent += 1
        return actions[(sent - 1) % len(actions)][1]

    try:
        while (played < episodes or sent < len(actions)) and played < episodes + 10 * len(actions):
            try:
                steps = _play(env, seed + played, env.splits[played % len(env.splits)], policy, max_turns)[1:]
                turns += len(steps)
                for step in steps:
                    for kind, n in dict(step[4].get("tool_errors") or {}).items():
                        tool_errors[str(kind)] = tool_errors.get(str(kind), 0) + int(n)
            except CheckFailed as exc:
                failures.append(f"episode {played}: {exc}")
            played += 1
    finally:
        env.close()
    if failures:
        more = f"\n(and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise CheckFailed("\n".join(failures[:3]) + more)
    seen = ", ".join(f"{k} {n}" for k, n in sorted(tool_errors.items()))
    return (f"{_count(played, 'episode')}, {_count(turns, 'turn')}, all {len(actions)} kinds of hostile turn sent; "
            f"tools {tool_names or 'none'}" + (f"; tool errors shown to the model: {seen}" if seen else ""))

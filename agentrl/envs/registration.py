"""Environment registry: `register("name-v0", entry_point="pkg.mod:Class")` and `make(id, **kwargs)`.

Third-party packages register under the `agentrl.envs` entry-point group, so an installed package's
environments appear in `make()` and `agentrl envs` without the user importing anything.
"""

from __future__ import annotations

from typing import Any

from agentrl.envs.core import Env
from agentrl.errors import EnvError, RegistryError
from agentrl.registry import Registry

ENVS: Registry[type[Env]] = Registry("environment", group="agentrl.envs")


def register(id: str, entry_point: str | type[Env], **kwargs: Any) -> None:
    """Register an environment class (or a lazy `"pkg.mod:Class"`) with default kwargs."""
    ENVS.register(id, entry_point, **kwargs)


def make(id: str, **kwargs: Any) -> Env:
    """Build a registered environment; `kwargs` override the registered defaults.

    Example:
        >>> env = make("calculator-v0")
        >>> obs, info = env.reset(seed=0, options={"split": "test"})
    """
    spec = ENVS.spec(id)
    cls = spec.load()
    try:
        env = cls(**{**spec.kwargs, **kwargs})
    except TypeError as exc:
        raise EnvError(f"cannot build environment {id!r} with arguments {sorted(kwargs)}: {exc}") from exc
    if not isinstance(env, Env):
        raise RegistryError(f"entry point of {id!r} built a {type(env).__name__}, not an agentrl.envs.Env")
    return env

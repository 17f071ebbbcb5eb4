"""One small generic registry for envs, tools, parsers, algorithms and engines.

Follows Gymnasium's idiom: ids are registered with an object or a lazy `"pkg.module:attr"` entry
point, unknown ids fail with a "did you mean", duplicates fail, and third-party packages add
entries through an `importlib.metadata` entry-point group that is read on first lookup.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from agentrl.errors import RegistryError, did_you_mean

T = TypeVar("T")


def load_entry_point(spec: str) -> Any:
    """Import `"package.module:attr"` and return the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"entry point {spec!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module {module_name!r} of entry point {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r} (entry point {spec!r})") from exc
    return obj


@dataclass(frozen=True)
class Spec(Generic[T]):
    """A registered entry: its id, where it lives, and default keyword arguments."""

    id: str
    entry_point: str | T
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: str = "code"

    def load(self) -> T:
        if isinstance(self.entry_point, str):
            return load_entry_point(self.entry_point)
        return self.entry_point


class Registry(Generic[T]):
    """A named collection of `Spec`s.

    Args:
        kind: What the registry holds, used in error messages ("environment", "tool", ...).
        group: The entry-point group third-party packages register under, or None.

    Example:
        >>> losses = Registry("policy loss")
        >>> losses.register("mine", lambda x: x)
        >>> losses.get("mine")(3)
        3
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._specs: dict[str, Spec[T]] = {}
        self._plugins_loaded = group is None
        # ids claimed by more than one installed package: looking one up raises, the rest still work
        self._conflicts: dict[str, list[str]] = {}
        self._lock = threading.RLock()

    def register(self, id: str, entry_point: str | T, **kwargs: Any) -> None:
        """Add an entry; raises `RegistryError` if the id is taken."""
        self._add(Spec(id=id, entry_point=entry_point, kwargs=kwargs))

    def unregister(self, id: str) -> None:
        """Remove an entry, conflicting or not (to replace an installed package's entry, or in tests).

        Unknown ids raise `RegistryError` with a suggestion.
        """
        self._load_plugins()
        with self._lock:
            if id not in self._specs:
                self.spec(id)  # raises with a "did you mean"
            del self._specs[id]
            self._conflicts.pop(id, None)

    def decorator(self, id: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object under `name`."""

        def wrap(obj: T) -> T:
            self.register(id, obj)
            return obj

        return wrap

    def _add(self, spec: Spec[T]) -> None:
        with self._lock:
            if spec.id in self._specs:
                old = self._specs[spec.id]
                raise RegistryError(
                    f"{self.kind} id {spec.id!r} is already registered (from {old.origin}: {old.entry_point!r}); "
                    "pick a new id or a new version suffix such as '-v1'"
                )
            self._specs[spec.id] = spec

    def _load_plugins(self) -> None:
        """Read the entry-point group once.

        Two packages claiming one id do not break the whole registry: the id is marked as a
        conflict and looking it up raises, naming both sources; every other id keeps working.
        """
        with self._lock:
            if self._plugins_loaded:
                return
            self._plugins_loaded = True
            for ep in importlib.metadata.entry_points(group=self.group):
                origin = f"entry point of {ep.dist.name if ep.dist else '?'}"
                old = self._specs.get(ep.name)
                if old is not None and old.entry_point == ep.value:
                    continue  # the same package registered it in code too
                if old is not None:
                    self._conflicts.setdefault(ep.name, [f"{old.origin}: {old.entry_point!r}"])
                    self._conflicts[ep.name].append(f"{origin}: {ep.value!r}")
                    continue
                self._specs[ep.name] = Spec(id=ep.name, entry_point=ep.value, origin=origin)

    def spec(self, id: str) -> Spec[T]:
        """Return the spec of `id`; unknown ids raise with a suggestion."""
        self._load_plugins()
        if id in self._conflicts:
            raise RegistryError(
                f"{self.kind} id {id!r} is registered more than once ({'; '.join(self._conflicts[id])}); "
                "uninstall one of the packages or register the other under a new id"
            )
        try:
            return self._specs[id]
        except KeyError:
            known = sorted(self._specs)
            raise RegistryError(
                f"unknown {self.kind} {id!r}.{did_you_mean(id, known)} Known: {', '.join(known) or 'none'}"
            ) from None

    def get(self, id: str) -> T:
        """Load and return the registered object (a class, a function, ...)."""
        return self.spec(id).load()

    def ids(self) -> list[str]:
        self._load_plugins()
        return sorted(self._specs)

    def __contains__(self, id: object) -> bool:
        self._load_plugins()
        return id in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

"""What every config section shares: frozen pydantic models, bounds, registry checks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from agentrl.errors import RegistryError

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

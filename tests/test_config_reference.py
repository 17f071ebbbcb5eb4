"""docs/configuration.md is what the config models say today (regenerate with scripts/config_reference.py)."""

from __future__ import annotations

from pathlib import Path

from agentrl.config import Config
from agentrl.config_reference import reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_reference_page_is_up_to_date():
    assert PAGE.read_text() == reference(), "docs/configuration.md is stale: run python scripts/config_reference.py"


def test_every_key_of_every_section_is_on_the_page():
    text = reference()
    for section, info in Config.model_fields.items():
        model = info.annotation
        keys = [f"{section}.{k}" for k in getattr(model, "model_fields", {})] or [section]
        for key in keys:
            assert f"`{key}`" in text, key
    assert "| `rollout.prompts_per_step` | int | `16` | ≥ 1, ≤ 100000 |" in text
    assert "| `model.path` | str | required |" in text

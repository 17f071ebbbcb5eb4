"""Write docs/configuration.md from agentrl's config models: `python scripts/config_reference.py`."""

from pathlib import Path

from agentrl.config_reference import reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    out.write_text(reference())
    print(f"wrote {out}")

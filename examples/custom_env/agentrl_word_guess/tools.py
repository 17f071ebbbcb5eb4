"""`spell`: a stateless tool, registered on its own under the `agentrl.tools` entry-point group."""

from __future__ import annotations

from agentrl.tools.core import ToolPolicy, tool


@tool(policy=ToolPolicy(timeout_s=1.0, max_output_chars=200))
def spell(word: str) -> str:
    """Spell a word letter by letter, with positions.

    Args:
        word: The word to spell (at most 40 characters).
    """
    return " ".join(f"{i + 1}:{c}" for i, c in enumerate(word[:40]))

"""agentrl: reinforcement learning for multi-turn, tool-using LLM agents.

The public surface is re-exported lazily so that `import agentrl` stays cheap and never imports
torch, Ray or an inference engine before they are needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Env": "agentrl.envs.core",
    "ToolEnv": "agentrl.envs.tool_env",
    "make": "agentrl.envs.registration",
    "register": "agentrl.envs.registration",
    "tool": "agentrl.tools.core",
    "Tool": "agentrl.tools.core",
    "ToolCall": "agentrl.tools.core",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentrl' has no attribute {name!r}")

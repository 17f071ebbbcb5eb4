"""Environments: the Env contract, ToolEnv, and the registry (`make`, `register`)."""

from agentrl.envs.core import Env, Message, Task
from agentrl.envs.registration import ENVS, make, register
from agentrl.envs.tool_env import ToolEnv

__all__ = ["Env", "ENVS", "Message", "Task", "ToolEnv", "make", "register"]

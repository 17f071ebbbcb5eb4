"""Environments: the Env contract, ToolEnv, the registry (`make`, `register`), the checker,
Gymnasium adapters and record/replay."""

from agentrl.envs.checker import CheckReport, check_env
from agentrl.envs.core import Env, Message, Task
from agentrl.envs.gym_adapter import GymTextEnv
from agentrl.envs.registration import ENVS, make, register
from agentrl.envs.replay import RecordingEnv, ReplayDivergence, ReplayEnv
from agentrl.envs.tool_env import ToolEnv

__all__ = ["CheckReport", "ENVS", "Env", "GymTextEnv", "Message", "RecordingEnv", "ReplayDivergence", "ReplayEnv",
           "Task", "ToolEnv", "check_env", "make", "register"]

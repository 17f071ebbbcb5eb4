"""Errors named by the boundary they cross.

Every error raised to a user says what was expected, what was received and how to fix it. Tool
errors are different: they are data shown to the model, so `ToolError` carries a `kind` that the
executor counts in metrics and a model-facing message that never leaks host paths or tracebacks.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable


class AgentRLError(Exception):
    """Base class of every error agentrl raises on purpose."""


class ConfigError(AgentRLError, ValueError):
    """A config file or override is malformed or out of bounds."""


class ChatTemplateError(ConfigError):
    """The model's chat template rejects a conversation agentrl renders, or rewrites history that
    token-in/token-out rollouts have already appended to (see `agentrl check-model`)."""


class RegistryError(AgentRLError, KeyError):
    """A name is unknown to a registry, or registered twice."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class EnvError(AgentRLError, RuntimeError):
    """An environment broke its contract (wrong types, step after termination, ...)."""


class EngineError(AgentRLError, RuntimeError):
    """An inference engine refused or failed a request."""


class ServerStartError(EngineError):
    """An engine server agentrl launched (or was told to reach) did not become healthy in time, or
    exited before it did; the message holds the command and the tail of its log."""


class ServerCrashedError(EngineError):
    """An engine server crashed more often than `max_restarts` allows, or a server agentrl did not
    start stopped answering; the message holds the tail of its log."""


class RolloutError(AgentRLError, RuntimeError):
    """Too few groups of a batch arrived sound (failed episodes dropped or retried in vain); the
    message holds the first failure texts."""


class InfrastructureFault(Exception):
    """A fault that is not the model's doing: a sandbox that could not start, a service that is down.

    Raised by a tool, the executor retries the call (`ToolPolicy.retries`), then answers with an
    `infrastructure` tool error; raised by an env, or answered so by its executor, it ends the
    episode as a `tool_infrastructure` failure, which the driver retries on a fresh env and never
    trains on (see docs/training.md, "Failed episodes").
    """


class TrainerError(AgentRLError, RuntimeError):
    """The trainer cannot go on (non-finite losses in a row, bad batch, ...)."""


class CheckpointError(TrainerError):
    """A checkpoint is incomplete, corrupt (fails its manifest's sizes or hashes) or unreadable."""


class ToolErrorKind(str, enum.Enum):
    """The kinds of tool failure a model can cause or meet; each is counted in metrics."""

    PARSE = "parse"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    RUNTIME = "runtime"
    TIMEOUT = "timeout"
    OUTPUT_TOO_LARGE = "output_too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # the tool refuses calls for now (too many abandoned calls still running)
    INFRASTRUCTURE = "infrastructure"  # an InfrastructureFault outlived the tool's retries: not the model's doing


class ToolError(AgentRLError):
    """A tool call failed; the message is shown to the model as the tool's output.

    Args:
        kind: Which failure this is.
        message: Model-facing text: what went wrong and what a correct call looks like.
    """

    def __init__(self, kind: ToolErrorKind, message: str):
        super().__init__(message)
        self.kind = ToolErrorKind(kind)
        self.message = message

    def to_model_text(self) -> str:
        return f"Error ({self.kind.value}): {self.message}"


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class RunInterrupted(AgentRLError):
    """SIGTERM or SIGINT stopped a training run (after a final checkpoint, unless a second signal forced it).

    Args:
        signum: The signal received.
        message: What happened and how to continue.
        forced: A second signal stopped the run at once, mid-step (no final checkpoint).
    """

    def __init__(self, signum: int, message: str, forced: bool = False):
        super().__init__(message)
        self.signum = signum
        self.forced = forced

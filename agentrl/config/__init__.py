"""The one source of configuration: frozen pydantic models with bounds and descriptions.

YAML files hold only overrides of these defaults, and `dotted.key=value` arguments on the command
line override the YAML. Unknown keys are errors with a "did you mean". Values derived from the
config (paths, counts) live in the code that uses them, never in a second copy of the defaults.

The package: `base` (what every section shares), `rollout` and `training` (the sections), `run` (`Config`,
the whole run, and the checks across sections), `loading` (YAML and overrides into a `Config`). Import
from `agentrl.config`.
"""

from agentrl.config.base import MAX_SEED, MAX_TOKENS
from agentrl.config.loading import (MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_config, parse_overrides,
                                    read_config_file, safe_yaml)
from agentrl.config.rollout import (FAILURE_DEFAULTS, EnvConfig, FailureAction, FailurePolicyConfig, FailuresConfig,
                                    LoraConfig, ModelConfig, RolloutConfig, ServerConfig, TaskEnvConfig)
from agentrl.config.run import Config
from agentrl.config.training import (POLICY_TOOL_ERRORS, AlgorithmConfig, ClusterConfig, CriticConfig, EvalConfig,
                                     MetricsConfig, OptimConfig, TrainConfig)

__all__ = [
    "MAX_SEED", "MAX_TOKENS", "MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_config", "parse_overrides",
    "read_config_file", "safe_yaml", "FAILURE_DEFAULTS", "EnvConfig", "FailureAction", "FailurePolicyConfig",
    "FailuresConfig", "LoraConfig", "ModelConfig", "RolloutConfig", "ServerConfig", "TaskEnvConfig", "Config",
    "POLICY_TOOL_ERRORS", "AlgorithmConfig", "ClusterConfig", "CriticConfig", "EvalConfig", "MetricsConfig",
    "OptimConfig", "TrainConfig",
]

"""How the rollout side builds its engine (agentrl/driver/rollout_side.py `engine_plan`): `rollout.engine`
resolved, `rollout.engine_options` and `rollout.server` passed to the engines that take them (checked
before any model load), the server's log folder, and the engine's `close()` at the end.

`ServerShapedEngine` (tests/driver/ray_parts.py) is the built-in engine behind the constructor shape
of the sglang and vllm backends (`server=`, `**options`), so the driver's side of the wiring runs
here on CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.evaluation import server_logs
from agentrl.driver.policy_source import PolicySource
from agentrl.driver.rollout_pool import _with_server_logs
from agentrl.driver.rollout_side import RolloutSide, engine_plan
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EpisodeLimits
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.backends.managed import ServerSpec
from agentrl.rollout.engine import ENGINES
from agentrl.rollout.workers import RolloutWorker, WorkerSetup
from tests.driver.ray_parts import ServerShapedEngine


@pytest.fixture(autouse=True)
def server_shaped():
    if "test-server-shaped" not in ENGINES:
        ENGINES.register("test-server-shaped", "tests.driver.ray_parts:ServerShapedEngine")
    yield


def _cfg(model_dir: str, tmp_path: Path, *overrides: str):
    return load_config(None, [f"model.path={model_dir}", "env.id=calculator-v0", "rollout.max_total_tokens=256",
                              "rollout.max_tokens_per_turn=8", "eval.num_tasks=0", f"run_dir={tmp_path / 'run'}",
                              *overrides])


def test_auto_is_the_default_and_builds_the_built_in_engine_with_its_options(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.engine_options.kv_cache_tokens=1024")
    assert cfg.rollout.engine == "auto"
    side = RolloutSide.open(cfg)
    try:
        assert type(side.engine.engine) is EmbeddedEngine and side.engine.kv_cache_tokens == 1024
    finally:
        side.close()


def test_an_option_the_picked_engine_does_not_take_is_refused_before_any_load(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.engine_options.mem_fraction_static=0.8")
    with pytest.raises(ConfigError, match=r"the embedded \(picked by rollout.engine=auto\) engine takes no option "
                                          "'mem_fraction_static'"):
        engine_plan(cfg, tiny_model_dir, "model.path", None)


def test_a_server_engine_gets_the_server_spec_with_the_run_log_folder_and_is_closed(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.engine=test-server-shaped", "rollout.server.url=http://127.0.0.1:9",
               "rollout.server.max_restarts=5", "rollout.engine_options.attention_backend=fa3")
    side = RolloutSide.open(cfg)
    engine = side.engine.engine
    assert isinstance(engine, ServerShapedEngine)
    assert engine.server == ServerSpec(url="http://127.0.0.1:9", max_restarts=5,
                                       log_dir=str(tmp_path / "run" / "servers"))
    assert engine.options == {"attention_backend": "fa3"} and not engine.closed
    side.close()
    assert engine.closed


def test_a_server_for_auto_or_embedded_is_a_config_error(tiny_model_dir, tmp_path):
    for engine in ("auto", "embedded"):
        with pytest.raises(ConfigError, match="rollout.server is for engines that run as servers"):
            _cfg(tiny_model_dir, tmp_path, f"rollout.engine={engine}", "rollout.server.launch=true")
    with pytest.raises(ConfigError, match="not both"):
        _cfg(tiny_model_dir, tmp_path, "rollout.engine=test-server-shaped", "rollout.server.launch=true",
             "rollout.server.url=http://127.0.0.1:9")


def test_eval_logs_servers_beside_its_results(tmp_path):
    run = PolicySource(str(tmp_path / "run"), str(tmp_path / "run" / "final"), run_dir=tmp_path / "run")
    assert server_logs(run) == str(tmp_path / "run" / "eval" / "servers")
    bare = PolicySource(str(tmp_path / "model"), str(tmp_path / "model"))
    assert server_logs(bare) == str(Path("eval-results") / "servers")


def test_a_rollout_worker_passes_the_engine_keywords_and_closes_the_engine(tiny_model_dir, tmp_path):
    spec = ServerSpec(launch=True)
    kwargs = _with_server_logs({"server": spec, "attention_backend": "fa3"}, tmp_path / "servers" / "worker-1")
    assert kwargs["server"].log_dir == str((tmp_path / "servers" / "worker-1").resolve()) and spec.log_dir is None
    setup = WorkerSetup(engine=ServerShapedEngine, model_path=tiny_model_dir, device="cpu", dtype=torch.float32,
                        max_model_len=257, env_id="calculator-v0", limits=EpisodeLimits(1, 256, None, None),
                        engine_kwargs=kwargs)
    worker = RolloutWorker(setup)
    engine = worker.engine.engine.engine
    assert engine.server is kwargs["server"] and engine.options == {"attention_backend": "fa3"}
    worker.close()
    assert engine.closed

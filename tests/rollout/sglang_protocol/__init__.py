"""A protocol test for the sglang backend: a stand-in that follows SGLang 0.5.17's documented request
and response shapes, backed by agentrl's built-in engine (not SGLang). See standin.py.

`make_engine` gives the conformance suite an `SGLangEngine` in server mode whose launched server is
this stand-in (`shim/sglang/launch_server.py`, put first on the server's PYTHONPATH), so the HTTP
client, the server launch, and the managed server's lifecycle all run for real on 127.0.0.1.
"""

from __future__ import annotations

import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "shim")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def server_env() -> dict[str, str]:
    """PYTHONPATH for a stand-in server: the shim `sglang` package, this folder's parent, the repo."""
    paths = [SHIM, os.path.dirname(HERE), REPO, os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def make_engine(model_dir: str, *, device: str = "cpu", log_dir: str | None = None, **kwargs):
    """An `SGLangEngine` talking HTTP to a launched stand-in server (float32 weights on every device, like the
    rest of the conformance suite: its tolerances are float32's; on an H200 a bf16 stand-in missed them)."""
    from agentrl.rollout.backends.managed import ServerSpec
    from agentrl.rollout.backends.sglang import SGLangEngine

    kwargs.setdefault("dtype", torch.float32)
    spec = ServerSpec(launch=True, env=server_env(), startup_timeout_s=120.0, log_dir=log_dir)
    return SGLangEngine(model_dir, device=device, server=spec, **kwargs)

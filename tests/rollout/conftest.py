"""Model directories with the test chat templates (see chat_template_models.py), built once per session."""

from __future__ import annotations

import pytest

from chat_template_models import MISTRAL_SPECIAL, QWEN3_TOKENS, model_with_template


@pytest.fixture(scope="session")
def qwen3_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return model_with_template(tiny_model_dir, tmp_path_factory.mktemp("qwen3") / "m", "qwen3_style",
                               added=QWEN3_TOKENS)


@pytest.fixture(scope="session")
def mistral_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return model_with_template(tiny_model_dir, tmp_path_factory.mktemp("mistral") / "m", "mistral_style",
                               special=MISTRAL_SPECIAL, eos="</s>", bos="<s>")


@pytest.fixture(scope="session")
def strict_roles_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return model_with_template(tiny_model_dir, tmp_path_factory.mktemp("strict") / "m", "strict_roles")


@pytest.fixture(scope="session")
def split_marker_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return model_with_template(tiny_model_dir, tmp_path_factory.mktemp("split") / "m", "split_marker")


@pytest.fixture(scope="module", autouse=True)
def no_server_left_behind(request):
    """After each module: no engine server (or its guard) started by this process is still running.

    A module that leaves one breaks later modules that count this process's children (the sandbox and
    tool tests), far from the cause; this names the module that leaked."""
    yield
    import time

    import psutil

    def leftovers() -> list[str]:
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                # multiprocessing's resource tracker lives as long as this interpreter, by design (an engine
                # that spawns processes starts it once); it is not a server left behind
                if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in cmd:
                    found.append(cmd[:160])
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 10  # a server being stopped gets its grace period
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{request.module.__name__} left processes running: {left}"

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

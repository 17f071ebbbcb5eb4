"""Engine selection (agentrl/rollout/backends/selection.py): every branch of `auto`, explicit names
whose package is missing, and the constructor keywords a backend gets.

"Installed" is a real importable package on sys.path (a folder in tmp_path); "not installed" is
Python's own marker for a module that cannot be imported (`sys.modules[name] = None`), so the
tests do not depend on whether this machine has SGLang or vLLM.
"""

from __future__ import annotations

import sys

import pytest
from transformers import GPT2Config, LlamaConfig, Qwen2Config

from agentrl.errors import ConfigError
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.backends.managed import ServerSpec
from agentrl.rollout.backends.selection import engine_arguments, installed, resolve_engine

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Model directories holding only config.json (selection reads nothing else)."""
    root = tmp_path_factory.mktemp("configs")
    configs = {
        "llama": LlamaConfig(**TINY),  # in the built-in engine's table
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128),  # an architecture it refuses
        "qwen2_relu": Qwen2Config(**TINY, hidden_act="relu"),  # a listed family with an option it refuses
    }
    for name, cfg in configs.items():
        cfg.save_pretrained(root / name)
    return {name: str(root / name) for name in configs}


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """`packages("sglang", ...)` makes those importable and every other engine package not."""

    def make(*present: str) -> None:
        for name in ("sglang", "vllm"):
            if name in present:
                folder = tmp_path / "site" / name
                folder.mkdir(parents=True)
                # Importing it would fail: selection must find it without importing it.
                (folder / "__init__.py").write_text("raise ImportError('selection must not import me')\n")
                monkeypatch.delitem(sys.modules, name, raising=False)
            else:
                monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    return make


# -- auto --------------------------------------------------------------------------------------

def test_auto_picks_the_built_in_engine_for_a_model_it_runs_even_with_sglang_installed(models, packages):
    packages("sglang", "vllm")
    assert resolve_engine("auto", models["llama"]) == "embedded"


@pytest.mark.parametrize("model", ["gpt2", "qwen2_relu"])
def test_auto_falls_to_sglang_for_a_model_the_built_in_engine_refuses(models, packages, model):
    packages("sglang", "vllm")
    assert resolve_engine("auto", models[model]) == "sglang"
    assert "sglang" not in sys.modules  # found, not imported


def test_auto_falls_to_vllm_without_sglang(models, packages):
    packages("vllm")
    assert resolve_engine("auto", models["gpt2"]) == "vllm"


def test_auto_with_nothing_to_run_the_model_names_the_extras_and_the_reason(models, packages):
    packages()
    with pytest.raises(ConfigError) as err:
        resolve_engine("auto", models["qwen2_relu"])
    text = str(err.value)
    assert "the activation 'relu'" in text  # why the built-in engine refused
    assert "pip install 'agentrl[sglang]'" in text and "pip install 'agentrl[vllm]'" in text
    assert "use `rollout.engine" not in text  # the built-in engine's own advice is replaced, not repeated


def test_auto_reads_the_length_the_engine_will_be_asked_for(models, packages, tmp_path):
    # longrope is supported only below original_max_position_embeddings (HF switches tables past it).
    packages("sglang")
    from transformers import Phi3Config

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "partial_rotary_factor": 1.0}
    # Phi-3 copies its top-level original_max_position_embeddings over the rope parameters' one.
    Phi3Config(**TINY, rope_parameters=rope, original_max_position_embeddings=64, pad_token_id=0,
               eos_token_id=1, bos_token_id=1).save_pretrained(tmp_path / "phi3")
    assert resolve_engine("auto", str(tmp_path / "phi3"), max_model_len=64) == "embedded"
    assert resolve_engine("auto", str(tmp_path / "phi3"), max_model_len=65) == "sglang"


# -- explicit names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sglang", "vllm"])
def test_an_engine_named_but_not_installed_is_refused_with_its_extra(packages, name):
    packages()
    with pytest.raises(ConfigError, match=rf"rollout.engine={name} but the {name} package is not installed.*"
                                          rf"pip install 'agentrl\[{name}\]'"):
        resolve_engine(name, "/no/model/read/here")


def test_named_engines_are_taken_as_they_are(models, packages):
    packages("sglang")
    assert resolve_engine("sglang", "/no/model/read/here") == "sglang"  # installed: the model is not read
    assert resolve_engine("embedded", models["gpt2"]) == "embedded"  # the engine itself refuses it at load
    assert resolve_engine("test-anything", "/no/model") == "test-anything"


def test_installed_does_not_import(packages):
    packages("vllm")
    assert installed("vllm") and not installed("sglang")
    assert "vllm" not in sys.modules


# -- constructor keywords ------------------------------------------------------------------------

def test_embedded_takes_its_own_keywords_and_no_server():
    got = engine_arguments(EmbeddedEngine, "embedded", ServerSpec(), {"kv_cache_tokens": 2048, "cuda_graphs": False})
    assert got == {"kv_cache_tokens": 2048, "cuda_graphs": False}


def test_embedded_refuses_an_option_it_does_not_take_with_a_suggestion():
    with pytest.raises(ConfigError, match="takes no option 'mem_fraction_static'.*kv_cache_tokens"):
        engine_arguments(EmbeddedEngine, "embedded", ServerSpec(), {"mem_fraction_static": 0.8})
    with pytest.raises(ConfigError, match="Did you mean 'kv_cache_tokens'"):
        engine_arguments(EmbeddedEngine, "embedded", ServerSpec(), {"kv_cache_token": 2048})


@pytest.mark.parametrize("key", ["device", "dtype", "max_model_len", "server", "tokenizer"])
def test_options_the_driver_sets_are_refused(key):
    with pytest.raises(ConfigError, match=f"agentrl sets {key} itself"):
        engine_arguments(EmbeddedEngine, "embedded", ServerSpec(), {key: "x"})


@pytest.mark.parametrize("spec", [ServerSpec(launch=True), ServerSpec(url="http://127.0.0.1:1")])
def test_a_server_for_an_in_process_engine_is_refused(spec):
    with pytest.raises(ConfigError, match="runs inside this process"):
        engine_arguments(EmbeddedEngine, "embedded", spec, {})


class ServerBackend:
    """The constructor shape of the sglang and vllm backends."""

    def __init__(self, model_path, *, device="cuda", dtype=None, max_model_len=4096, server=None, **options):
        pass


def test_a_server_backend_gets_the_server_and_every_option():
    spec = ServerSpec(launch=True, log_dir="/tmp/logs")
    got = engine_arguments(ServerBackend, "sglang", spec, {"mem_fraction_static": 0.7, "attention_backend": "fa3"})
    assert got == {"mem_fraction_static": 0.7, "attention_backend": "fa3", "server": spec}

"""`agentrl check-model`: passes on sound models, and names each planted defect with the text that shows it.

The models are the tiny test model with the test chat templates (tests/fixtures/chat_templates):
real tokenizers and real templates that reproduce Qwen3's, Mistral's and older templates' behaviours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from chat_template_models import QWEN3_TOKENS
from transformers import AutoTokenizer

from agentrl.envs.registration import ENVS, register
from agentrl.rollout.check_model import check_model
from agentrl_calculator.env import CalculatorEnv

ROOT = Path(__file__).resolve().parents[2]


class CalculatorWithoutIds(CalculatorEnv):
    """A calculator whose tool messages carry no tool_call_id (as a hand-written env's might)."""

    def tool_call_id(self, n: int) -> str:
        return ""


if "test-calculator-no-ids-v0" not in ENVS.ids():
    register("test-calculator-no-ids-v0", CalculatorWithoutIds, system_prompt=None)


def rows(report) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in report.results}


def test_the_quickstart_model_passes(tiny_model_dir):
    report = check_model(tiny_model_dir, "calculator-v0")
    assert report.ok, report.failures
    got = rows(report)
    assert all(status == "pass" for status, _ in got.values()), got
    assert "9 tool calls" in got["episodes"][1] and "'unknown_tool': 3" in got["episodes"][1]
    assert "token ids equal a full re-render" in got["append-only"][1]
    assert "Qwen2ForCausalLM runs on the built-in engine" in got["engine architecture"][1]


def test_an_architecture_the_engine_does_not_run_fails_its_row(tiny_model_dir, tmp_path):
    """A config the built-in engine refuses (here: a GPT-2 config beside the tiny tokenizer) fails the
    architecture row with the engine's reason, from the config alone (no weights in the directory)."""
    from transformers import GPT2Config

    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, model_dir)
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4).save_pretrained(model_dir)
    report = check_model(str(model_dir), "calculator-v0")
    status, detail = rows(report)["engine architecture"]
    assert status == "fail" and not report.ok
    assert "'gpt2'" in detail and "rollout.engine: sglang" in detail


def test_a_qwen3_style_template_passes_and_its_dropped_reasoning_is_reported(qwen3_model_dir):
    got = rows(check_model(qwen3_model_dir, "calculator-v0"))
    assert all(status in ("pass", "skip") for status, _ in got.values()), got
    assert "<tool_response>" in got["tool messages"][1]
    # Text games answer in user turns: a new query, so the template drops the earlier reasoning.
    report = check_model(qwen3_model_dir, "gym-frozenlake-v0")
    status, detail = rows(report)["append-only"]
    assert report.ok and status == "warn"
    assert "the token stream has 'hink>\\nStep 1: choose the next action.\\n</think>" in detail


def test_history_rewrite_is_named(mistral_model_dir):
    report = check_model(mistral_model_dir, "calculator-v0", parser="mistral")
    status, detail = rows(report)["append-only"]
    assert not report.ok and status == "fail"
    # The system prompt leaves the first user turn once the model has answered.
    assert "not append-only" in detail and "the token stream has 'Use the calculator, then answer.\\n\\n" in detail


def test_missing_tool_call_ids_are_named(mistral_model_dir):
    report = check_model(mistral_model_dir, "test-calculator-no-ids-v0", parser="mistral")
    got = rows(report)
    assert not report.ok and got["tool-call ids"][0] == "fail"
    assert "carry no tool_call_id (turn 0: tool_call_id [None])" in got["tool-call ids"][1]
    assert "tool call ids must be 9 alphanumeric characters" in got["tool-call ids"][1]
    # Without the defect the same template and parser pass (ids only warn: the model writes its own).
    got = rows(check_model(mistral_model_dir, "calculator-v0", parser="mistral", env_kwargs={"system_prompt": None}))
    assert all(status != "fail" for status, _ in got.values()), got
    assert got["tool-call ids"][0] == "warn"


def test_non_alternating_roles_are_named(strict_roles_model_dir):
    report = check_model(strict_roles_model_dir, "calculator-v0")
    got = rows(report)
    assert not report.ok and got["tool messages"][0] == "fail" and got["append-only"][0] == "fail"
    assert "(roles: user, assistant, tool): TemplateError: Conversation roles must alternate" in got["tool messages"][1]


def test_a_parser_that_cannot_read_the_templates_calls_is_named(qwen3_model_dir):
    report = check_model(qwen3_model_dir, "calculator-v0", parser="mistral")
    status, detail = rows(report)["tool-call format"]
    assert not report.ok and status == "fail"
    assert detail.startswith("parser 'mistral' reads [] from the template's own tool-call text")
    assert '\\n\\n<tool_call>\\n{"name": "lookup", "arguments": {"query": "capital of France"' in detail


def test_split_special_tokens_are_named(split_marker_model_dir):
    status, detail = rows(check_model(split_marker_model_dir, "calculator-v0"))["special tokens"]
    assert status == "fail" and "'<|im_sep|>' -> 10 tokens ['<', '|', 'i', 'm'" in detail


def test_a_missing_eos_token_is_named(tiny_model_dir, tmp_path):
    dst = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.eos_token = None
    tok.save_pretrained(dst)
    report = check_model(dst, "calculator-v0")
    assert not report.ok
    assert rows(report)["end of turn"] == ("fail", "the tokenizer has no eos token; name the token that ends a model "
                                                   "turn (end_of_turn)")


def test_tokens_beyond_the_embedding_table_are_named(tiny_model_dir, tmp_path):
    dst = tmp_path / "unresized"
    shutil.copytree(tiny_model_dir, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    rows_before = len(tok)
    tok.add_tokens(list(QWEN3_TOKENS))
    tok.save_pretrained(dst)
    status, detail = rows(check_model(dst, "calculator-v0"))["tokenizer"]
    assert status == "fail" and f"has {rows_before} rows: ids {rows_before}..{rows_before + 3}" in detail


def _agentrl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("agentrl") or str(Path(sys.executable).parent / "agentrl")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_exit_codes(tiny_model_dir, strict_roles_model_dir):
    ok = _agentrl("check-model", tiny_model_dir, "--env", "calculator-v0", "-n", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{tiny_model_dir} is ready for calculator-v0" in ok.stdout.replace("\n", "")
    bad = _agentrl("check-model", strict_roles_model_dir, "--env", "calculator-v0", "-n", "1")
    assert bad.returncode == 1 and "failed 2 check(s)" in bad.stdout and "Conversation roles" in bad.stdout
    typo = _agentrl("check-model", tiny_model_dir, "--env", "calculater-v0")
    assert typo.returncode == 2 and "Did you mean 'calculator-v0'" in typo.stdout



def test_cli_template_kwargs_reach_the_template(qwen3_model_dir):
    """`--template-kwargs` is what `model.chat_template_kwargs` passes in training: with
    enable_thinking=false the Qwen3-style template pre-fills an empty think block in the prompt."""
    from typer.testing import CliRunner

    from agentrl.cli import app

    runner = CliRunner()
    on = check_model(qwen3_model_dir, "calculator-v0", episodes=1, template_kwargs={"enable_thinking": False})
    assert on.ok, on.failures
    out = runner.invoke(app, ["check-model", qwen3_model_dir, "--env", "calculator-v0", "-n", "1",
                              "--template-kwargs", '{"enable_thinking": false}'])
    assert out.exit_code == 0, out.output
    bad = runner.invoke(app, ["check-model", qwen3_model_dir, "--env", "calculator-v0", "--template-kwargs", "{x"])
    assert bad.exit_code == 2 and "--template-kwargs is not JSON" in bad.output
    from agentrl.envs.core import Message
    from agentrl.rollout.chat import ChatRenderer

    tok = AutoTokenizer.from_pretrained(qwen3_model_dir)
    prompt = [Message("user", "hi")]
    off = ChatRenderer(tok, template_kwargs={"enable_thinking": False})
    assert tok.decode(off.prompt_ids(prompt)).endswith("<think>\n\n</think>\n\n")
    assert not tok.decode(ChatRenderer(tok).prompt_ids(prompt)).endswith("</think>\n\n")

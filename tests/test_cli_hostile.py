"""The command line under broken input: the CLI table of docs/reliability.md.

Each row of `ROWS` is one broken input given to the real `agentrl` app: typer's CliRunner in this
process for the whole table (fast: torch and the tiny model load once), and a subprocess of
`python -m agentrl.cli` for a few rows, to prove the exit code and that no traceback reaches the
terminal. Every row must end with a non-zero exit code, exactly one `error:` line holding the
row's text (the field, and what to do), no "Traceback", within `TIME_LIMIT_S`, and no run
directory left behind. A row is an input a user or an audit actually produced, not a unit case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from agentrl.cli import app

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 30.0  # the slowest row loads a tiny model twice; an alias bomb used to stall 40 s first

# Registers the hostile-* envs (the same module runs the CLI as a script for the subprocess rows).
_spec = importlib.util.spec_from_file_location("agentrl_test_run_cli_hostile", ROOT / "tests" / "run_cli_hostile.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))

BOMB = """model: {path: m}
env:
  id: calculator-v0
  kwargs:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
"""
INLINE_BOMB = ("env.kwargs={a: &a [1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
               "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
               "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]}")


class World:
    """Files the rows point at: a base config, broken configs, broken model and run directories."""

    def __init__(self, root: Path, tiny: str, stopping: str):
        self.root, self.tiny, self.stopping = root, tiny, stopping
        self.fresh = root / "runs" / "fresh"  # the base config's run_dir; no failing row may leave it
        self.base = self._text("base.yaml", f"""
model: {{path: {tiny}}}
env: {{id: calculator-v0}}
rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_tokens_per_turn: 16, max_turns: 1, max_total_tokens: 128}}
train: {{steps: 1, checkpoint_every: 0}}
eval: {{num_tasks: 2}}
run_dir: {self.fresh}
""")
        self._configs()
        self._models()
        self._run_dirs()

    def _text(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def _bytes(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def _configs(self) -> None:
        self._bytes("binary.yaml", bytes(range(256)) * 8)
        self._bytes("nul.yaml", b"model: {path: m}\x00\n")
        self._text("huge.yaml", "# padding\n" * 120_000)
        self._text("invalid.yaml", "model: [unclosed\n")
        self._text("list.yaml", "- model\n- env\n")
        self._text("nested.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
        self._text("bomb.yaml", BOMB)
        self._text("recursive.yaml", "model: &m {path: *m}\nenv: {id: calculator-v0}\n")
        self._text("duplicate.yaml", "model: {path: m}\nenv: {id: calculator-v0}\nmodel: {path: n}\n")
        self._text("tag.yaml", "model: !!python/object/apply:os.system ['echo pwned']\n")
        self._text("empty.yaml", "")
        self._text("two_docs.yaml", "model: {path: m}\n---\nenv: {id: calculator-v0}\n")

    def _models(self) -> None:
        tiny = Path(self.tiny)

        def copy(name: str, skip: tuple[str, ...] = ()) -> Path:
            out = self.root / "models" / name
            out.mkdir(parents=True)
            for f in tiny.iterdir():
                if f.name not in skip:
                    shutil.copy(f, out / f.name)
            return out

        (self.root / "models" / "empty").mkdir(parents=True)
        self._bytes("models/a_file", b"not a model")
        self._bytes("models/garbage_config/config.json", os.urandom(512))
        self._bytes("models/not_a_model_config/config.json", b"[1, 2, 3]")
        copy("no_weights", skip=("model.safetensors",))
        copy("no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
        (copy("garbage_weights") / "model.safetensors").write_bytes(os.urandom(4096))
        (copy("garbage_tokenizer") / "tokenizer.json").write_bytes(os.urandom(2048))
        t5 = copy("t5")
        config = json.loads((t5 / "config.json").read_text())
        (t5 / "config.json").write_text(json.dumps({**config, "model_type": "t5",
                                                    "architectures": ["T5ForConditionalGeneration"]}))

    def _run_dirs(self) -> None:
        self._bytes("runs/a_file", b"")
        self._bytes("runs/old/config.json", b"{}")
        self._bytes("runs/old/metrics.jsonl", b'{"step": 1}\n')
        self._bytes("runs/foreign/notes.txt", b"my notes")

    def model(self, name: str) -> str:
        return str(self.root / "models" / name)


@dataclass(frozen=True)
class Row:
    """One broken input: the argv after `agentrl`, and the text its one error line must hold."""

    id: str
    args: Callable[[World], list]
    expect: str
    usage: bool = False  # a usage error of the command line itself (typer prints those in a box)
    marks: tuple = ()


def train(*extra: str) -> Callable[[World], list]:
    return lambda w: ["train", w.base, *extra]


def evaluate(*extra: str) -> Callable[[World], list]:
    return lambda w: ["eval", w.base, *extra]


_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

ROWS = [
    # The config file itself.
    Row("config-missing", lambda w: ["train", w.root / "nope.yaml"], "does not exist"),
    Row("config-is-a-directory", lambda w: ["train", w.root], "is not a file"),
    Row("config-binary", lambda w: ["train", w.root / "binary.yaml"], "is not UTF-8 text"),
    Row("config-nul-bytes", lambda w: ["train", w.root / "nul.yaml"], "NUL bytes"),
    Row("config-too-large", lambda w: ["train", w.root / "huge.yaml"], "limit of 1048576"),
    Row("config-invalid-yaml", lambda w: ["train", w.root / "invalid.yaml"], "is not valid YAML"),
    Row("config-not-a-mapping", lambda w: ["train", w.root / "list.yaml"], "must hold a mapping"),
    Row("config-deeply-nested", lambda w: ["train", w.root / "nested.yaml"], "nests more than 64 levels"),
    Row("config-alias-bomb-in-env-kwargs", lambda w: ["train", w.root / "bomb.yaml"], "expands to more than 100000"),
    Row("config-recursive-alias", lambda w: ["train", w.root / "recursive.yaml"], "alias that contains itself"),
    Row("config-duplicate-key", lambda w: ["train", w.root / "duplicate.yaml"], "gives the key 'model' twice"),
    Row("config-python-tag", lambda w: ["train", w.root / "tag.yaml"], "is not valid YAML"),
    Row("config-empty", lambda w: ["train", w.root / "empty.yaml"], "model: required"),
    Row("config-two-documents", lambda w: ["train", w.root / "two_docs.yaml"], "is not valid YAML"),
    # Overrides and values.
    Row("override-unknown-key", train("train.stesp=1"), "Did you mean 'steps'"),
    Row("override-unknown-section", train("optimm.lr=1"), "Did you mean 'optim'"),
    Row("override-wrong-type", train("train.steps=many"), "train.steps: Input should be a valid integer"),
    Row("override-without-equals", train("nonsense"), "must look like section.key=value"),
    Row("override-into-a-value", train("train.steps.x=1"), "'steps' is a value, not a section"),
    Row("override-alias-bomb", train(INLINE_BOMB), "expands to more than 100000"),
    Row("nan-learning-rate", train("optim.lr=.nan"), "optim.lr: Input should be a finite number"),
    Row("inf-weight-decay", train("optim.weight_decay=.inf"), "optim.weight_decay: Input should be a finite"),
    Row("negative-temperature", train("rollout.temperature=-1"), "rollout.temperature"),
    Row("adam-beta-of-one-or-more", train("optim.betas=[0.9, 1.5]"), "optim.betas: AdamW betas"),
    Row("empty-run-dir", train("run_dir="), "run_dir: String should have at least 1 character"),
    Row("group-fraction-above-one", train("failures.min_group_fraction=2"), "failures.min_group_fraction"),
    Row("renamed-error-fraction", train("rollout.max_error_fraction=0.5"), "replaced by failures.min_group_fraction"),
    Row("absurd-max-total-tokens", train("rollout.max_total_tokens=10000000000"), "rollout.max_total_tokens"),
    Row("absurd-max-tokens-per-turn", train("rollout.max_tokens_per_turn=1000000000000"), "rollout.max_tokens_per_turn"),
    Row("absurd-prompts-per-step", train("rollout.prompts_per_step=1000000000"), "rollout.prompts_per_step"),
    Row("absurd-train-steps", train("train.steps=1000000000000000"), "train.steps"),
    Row("huge-train-seed", train("train.seed=100000000000000000000"), "train.seed: Input should be less than"),
    Row("negative-train-seed", train("train.seed=-1"), "train.seed"),
    Row("huge-eval-seed", train("eval.seed=18446744073709551616"), "eval.seed"),
    Row("absurd-eval-num-tasks", train("eval.num_tasks=1000000000"), "eval.num_tasks"),
    Row("unknown-advantage", train("algorithm.advantage=grpoo"), "algorithm.advantage: unknown advantage "
        "estimator 'grpoo'. Did you mean 'grpo'?"),
    Row("unknown-policy-loss", train("algorithm.policy_loss=ppo_clipp"), "Did you mean 'ppo_clip'?"),
    Row("tis-without-recompute", train("algorithm.tis=token"), "algorithm.old_logprobs=recompute"),
    Row("grpo-with-one-sample", train("rollout.samples_per_prompt=1"), "samples_per_prompt must be at least 2"),
    Row("train-on-the-eval-split", train("env.train_split=test"), "env.allow_train_on_eval_split=true"),
    Row("unknown-device", train("model.device=tpu"), "model.device: unsupported device 'tpu'"),
    Row("unknown-dtype", train("model.dtype=float16"), "model.dtype"),
    Row("cuda-on-a-cpu-machine", train("model.device=cuda"), "PyTorch sees no CUDA GPU", marks=(_no_cuda,)),
    Row("cuda-device-out-of-range", train("model.device=cuda:99"), "model.device=cuda:99"),
    # The model directory.
    Row("model-missing", train("model.path=/nonexistent/model"), "model.path '/nonexistent/model' does not exist"),
    Row("model-is-a-file", lambda w: ["train", w.base, f"model.path={w.model('a_file')}"], "is a file"),
    Row("model-empty-directory", lambda w: ["train", w.base, f"model.path={w.model('empty')}"], "has no config.json"),
    Row("model-config-garbage", lambda w: ["train", w.base, f"model.path={w.model('garbage_config')}"],
        "config.json is not valid JSON"),
    Row("model-config-not-a-model", lambda w: ["train", w.base, f"model.path={w.model('not_a_model_config')}"],
        "has no \"model_type\""),
    Row("model-without-weights", lambda w: ["train", w.base, f"model.path={w.model('no_weights')}"], "has no weights"),
    Row("model-without-tokenizer", lambda w: ["train", w.base, f"model.path={w.model('no_tokenizer')}"],
        "has no tokenizer"),
    Row("model-garbage-weights", lambda w: ["train", w.base, f"model.path={w.model('garbage_weights')}"],
        "cannot load the model in model.path"),
    Row("model-garbage-tokenizer", lambda w: ["train", w.base, f"model.path={w.model('garbage_tokenizer')}"],
        "cannot load the tokenizer of model.path"),
    Row("model-not-a-causal-lm", lambda w: ["train", w.base, f"model.path={w.model('t5')}"],
        "the built-in engine does not implement T5ForConditionalGeneration"),
    Row("context-beyond-model-positions", train("rollout.max_total_tokens=100000"), "max_position_embeddings=1024"),
    Row("prompt-longer-than-max-total-tokens", train("rollout.max_total_tokens=20"), "leaves 0 tokens for the "
        "model's first turn"),
    Row("no-room-for-a-turn", train("rollout.max_total_tokens=64", "rollout.max_tokens_per_turn=16"),
        "raise rollout.max_total_tokens to at least"),
    # The run directory.
    Row("run-dir-is-a-file", lambda w: ["train", w.base, f"run_dir={w.root / 'runs' / 'a_file'}"], "is a file"),
    Row("run-dir-inside-a-file", lambda w: ["train", w.base, f"run_dir={w.root / 'runs' / 'a_file' / 'x'}"],
        "which is a file"),
    Row("run-dir-unwritable", train("run_dir=/sys/agentrl-test-run"), "cannot be written",
        marks=(pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs"),)),
    Row("run-dir-holds-a-run", lambda w: ["train", w.base, f"run_dir={w.root / 'runs' / 'old'}"],
        "already holds a run"),
    Row("run-dir-holds-other-files", lambda w: ["train", w.base, f"run_dir={w.root / 'runs' / 'foreign'}"],
        "is not empty"),
    Row("overwrite-over-other-files", lambda w: ["train", w.base, f"run_dir={w.root / 'runs' / 'foreign'}",
                                                 "--overwrite"], "deletes only a run's own files"),
    Row("resume-and-overwrite", train("--resume", "--overwrite"), "pass one of them"),
    Row("resume-without-a-checkpoint", train("--resume"), "nothing to resume"),
    # The environment.
    Row("env-unknown", train("env.id=calculater-v0"), "Did you mean 'calculator-v0'"),
    Row("env-kwargs-unknown", train("env.kwargs.colour=red"), "cannot build environment 'calculator-v0'"),
    Row("env-kwargs-bad-value", train("env.kwargs.style=poem"), "style must be 'symbolic' or 'story'"),
    Row("env-constructor-raises", train("env.id=hostile-init-v0"), "raised ValueError: no task database"),
    Row("train-split-unknown", train("env.train_split=tset"), "env.train_split='tset'"),
    Row("eval-split-missing-from-env", train("env.id=hostile-onesplit-v0"), "eval.split='test'"),
    Row("env-reset-raises", train("env.id=hostile-reset-v0"), "fails to start a task"),
    Row("env-episodes-fail-mid-run", train("env.id=hostile-late-v0"), "step 1: 4 of 4 episodes failed"),
    Row("env-step-raises", lambda w: ["train", w.base, "env.id=hostile-step-v0", f"model.path={w.stopping}",
                                      "failures.min_group_fraction=1"], "KeyError: 'answer'"),
    # agentrl eval.
    Row("eval-split-unknown", evaluate("--split", "nosuchsplit"), "--split='nosuchsplit'"),
    Row("eval-model-missing", evaluate("--model", "/nonexistent/final"), "--model '/nonexistent/final' does not"),
    Row("eval-model-garbage", lambda w: ["eval", w.base, "--model", w.model("garbage_weights")],
        "cannot load the model in --model"),
    Row("eval-no-tasks", evaluate("eval.num_tasks=0"), "eval.num_tasks=0: there is nothing to evaluate"),
    Row("eval-episodes-fail", evaluate("env.id=hostile-late-v0", "eval.num_tasks=12"),
        "evaluation of hostile-late-v0 on split 'test': 8 of 12 episodes failed"),
    Row("eval-model-and-compare", lambda w: ["eval", w.base, "--model", w.tiny, "--compare", w.tiny, w.tiny],
        "pass --compare A B alone"),
    Row("eval-compare-missing", lambda w: ["eval", w.base, "--compare", "/nonexistent/a", w.tiny],
        "--compare '/nonexistent/a' does not exist"),
    Row("eval-model-dir-without-env", lambda w: ["eval", w.tiny], "pass --env ENV_ID"),
    Row("eval-policy-not-a-model", lambda w: ["eval", w.model("empty")], "is not a model directory"),
    Row("eval-unknown-extra-env", evaluate("--env", "calculater-v0"), "Did you mean 'calculator-v0'"),
    Row("eval-k-zero", evaluate("--k", "0"), "Invalid value", usage=True),
    # agentrl report.
    Row("report-missing-run", lambda w: ["report", w.root / "nope"], "does not exist or is not a directory"),
    Row("report-not-a-run", lambda w: ["report", w.root / "models"], "is not a run directory"),
    # The other commands.
    Row("check-env-unknown", lambda w: ["check-env", "calculater-v0"], "Did you mean 'calculator-v0'"),
    Row("check-env-huge-seed", lambda w: ["check-env", "calculator-v0", "--seed", str(2**70)], "Invalid value",
        usage=True),
    Row("tiny-model-out-is-a-file", lambda w: ["tiny-model", "--out", w.root / "runs" / "a_file"], "is a file"),
    Row("tiny-model-env-unknown", lambda w: ["tiny-model", "--out", w.root / "tm", "--env", "nope-v0"],
        "unknown environment 'nope-v0'"),
    Row("tiny-model-probability-above-one", lambda w: ["tiny-model", "--tool-use-prob", "2"], "Invalid value",
        usage=True),
    Row("unknown-command", lambda w: ["trian", w.base], "No such command", usage=True),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, stopping_model_dir) -> World:
    return World(tmp_path_factory.mktemp("hostile-cli"), tiny_model_dir, stopping_model_dir)


def check_output(output: str, code: int, row: Row, seconds: float, limit: float = TIME_LIMIT_S) -> None:
    """The row's promise: non-zero exit, one clear error line holding `row.expect`, no traceback, in time."""
    assert code != 0, output
    assert "Traceback" not in output, output
    assert seconds < limit, f"{row.id} took {seconds:.1f} s"
    if row.usage:
        assert code == 2 and row.expect in output, output
        return
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, output
    assert row.expect in errors[0], errors[0]
    assert code == 2 and "internal error" not in errors[0], errors[0]  # an input error, not a bug


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_cli_table(world, row):
    args = [str(a) for a in row.args(world)]
    start = time.monotonic()
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    seconds = time.monotonic() - start
    check_output(result.output, result.exit_code, row, seconds)
    assert not world.fresh.exists(), f"{row.id} left {world.fresh} behind"
    assert (world.root / "runs" / "old" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # never touched
    assert (world.root / "runs" / "foreign" / "notes.txt").read_bytes() == b"my notes"


SUBPROCESS_ROWS = ["config-binary", "config-alias-bomb-in-env-kwargs", "cuda-device-out-of-range",
                   "run-dir-holds-a-run", "eval-split-unknown", "env-episodes-fail-mid-run"]


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_cli_table_as_a_user_runs_it(world, row_id):
    row = next(r for r in ROWS if r.id == row_id)
    args = [str(a) for a in row.args(world)]
    # the hostile envs live in the test script; the rest run the installed module as a user would
    entry = [str(ROOT / "tests" / "run_cli_hostile.py")] if "hostile" in " ".join(args) else ["-m", "agentrl.cli"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)})
    # a fresh interpreter imports torch and transformers first, slowly on a loaded two-core machine
    check_output(proc.stdout, proc.returncode, row, time.monotonic() - start, limit=TIME_LIMIT_S + 30)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not world.fresh.exists()


def test_reliability_doc_quotes_the_cli_count():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert f"CLI table: {len(ROWS)} cases" in doc, f"docs/reliability.md should say 'CLI table: {len(ROWS)} cases'"
    listed = set(re.findall(r"`([a-z0-9-]+)`", doc))
    assert {r.id for r in ROWS} <= listed, sorted({r.id for r in ROWS} - listed)

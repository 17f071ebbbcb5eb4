"""The `agentrl` command: train, eval, envs, tools, check-env, check-model, tiny-model.

Example:
    agentrl tiny-model --out models/tiny-calculator
    agentrl train examples/calculator.yaml train.steps=30
    agentrl eval examples/calculator.yaml --model runs/calculator/final
    agentrl check-env gym-frozenlake-v0 --episodes 20
    agentrl check-model models/tiny-calculator --env calculator-v0

Every input error ends the command with one `error:` line naming the field and the fix (exit 2);
an unexpected exception is a bug and ends it with one line too (exit 1; AGENTRL_TRACEBACK=1 shows
the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from agentrl.errors import AgentRLError, ConfigError, RunInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reinforcement learning for tool-using LLM agents. "
                  "Every config key, default and bound: docs/configuration.md.")
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {rich_escape(str(exc))}", soft_wrap=True)  # paths stay copy-pasteable
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _errors_reported() -> Iterator[None]:
    """Input errors (`AgentRLError`) become one `error:` line and exit 2; anything else is a bug in
    agentrl, reported on one line with exit 1 (the traceback with AGENTRL_TRACEBACK=1)."""
    try:
        yield
    except AgentRLError as exc:
        _fail(exc)
    except (typer.Exit, typer.Abort):  # click's own ways out (RuntimeErrors) pass through
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a command line
        if os.environ.get("AGENTRL_TRACEBACK"):
            raise
        text = " ".join(str(exc).split())[:300]
        console.print(f"[bold red]error:[/] internal error {type(exc).__name__}: {rich_escape(text)} (a bug in "
                      "agentrl: rerun with AGENTRL_TRACEBACK=1 for the traceback and report it)", soft_wrap=True)
        raise typer.Exit(code=1) from None


def _quiet_loaders() -> None:
    """Switch off transformers' per-load progress bars: they end without a newline on stderr and
    would run into the command's own lines (an error line among them)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _print_episode_errors(metrics: dict, printer) -> None:
    """The first distinct episode-error texts of a batch, one per line (they are not trained on)."""
    samples = metrics.get("error_samples") or []
    if samples:
        printer(f"          [yellow]{int(metrics.get('episode_errors', 0))} episode(s) failed[/] (not trained on):")
        for text in samples:
            printer(f"            {rich_escape(text)}")


def _env_names(metrics: dict) -> list[str]:
    """The envs of a multi-task run's metrics (`env/<name>/success_rate` keys), in order."""
    return [k.split("/")[1] for k in metrics if k.startswith("env/") and k.endswith("/success_rate")]


def _fmt(metrics: dict[str, float], keys: list[str]) -> str:
    return "  ".join(f"{k}={metrics[k]:.3g}" for k in keys if k in metrics)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML file of overrides of agentrl.config.Config "
                                  "(every key: docs/configuration.md)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides, e.g. train.steps=5"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run_dir from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in run_dir (its files are deleted "
                                   "once the new run's checks pass)."),
) -> None:
    """Train a policy with RL; prints held-out success before and after."""
    from agentrl.config import load_config
    from agentrl.driver.loop import train as run_training

    _quiet_loaders()
    with _errors_reported():
        cfg = load_config(config, overrides or [])
    envs = ",".join(e.key for e in cfg.envs) or cfg.env.id
    console.print(f"[bold]agentrl train[/] env={envs} model={cfg.model.path} steps={cfg.train.steps} "
                  f"run_dir={cfg.run_dir}")
    bar = Progress(TextColumn("[bold blue]RL"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    with _errors_reported(), bar as progress:  # the bar stops before an error line is printed
        task = progress.add_task("train", total=cfg.train.steps)
        if resume:
            from agentrl.trainer.checkpoint import checkpoint_step, latest_checkpoint

            last = latest_checkpoint(cfg.run_dir)
            progress.update(task, completed=checkpoint_step(last) if last else 0)

        from agentrl.driver.console import ConsoleSink

        lines = ConsoleSink(lambda line: progress.console.print(rich_escape(line), highlight=False, soft_wrap=True),
                            cfg.metrics.console_keys)

        def on_step(step: int, m: dict) -> None:
            lines.write(m)  # the step's metrics, its time split, failure counts when non-zero
            _print_episode_errors(m, progress.console.print)
            progress.update(task, advance=1)

        try:
            result = run_training(cfg, on_step=on_step, resume=resume, overwrite=overwrite)
        except RunInterrupted as exc:  # SIGTERM / Ctrl-C: a clean stop, not an error in the input
            progress.stop()
            console.print(f"[bold yellow]stopped:[/] {rich_escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(code=128 + exc.signum) from None
    for key in ("before", "after"):
        if key in result:
            _print_episode_errors(result[key], console.print)
    _print_before_after(result, cfg.eval.split)
    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k != "history" and v is not None}, indent=2))


def _print_before_after(result: dict, split: str) -> None:
    if "before" not in result and "after" not in result:
        return
    table = Table(title=f"held-out success ({split} split)")
    table.add_column("")
    table.add_column("success rate", justify="right")
    table.add_column("tool calls / episode", justify="right")
    for key in ("before", "after"):
        if key in result:
            m = result[key]
            table.add_row(key, f"{m['success_rate']:.1%}", f"{m['tool_calls_mean']:.2f}")
            for name in _env_names(m):  # a multi-task run: each env's held-out split too
                table.add_row(f"  {name}", f"{m[f'env/{name}/success_rate']:.1%}",
                              f"{m[f'env/{name}/tool_calls_mean']:.2f}")
    console.print(table)
    if "before" in result and "after" in result:
        gain = result["after"]["success_rate"] - result["before"]["success_rate"]
        console.print(f"change: {gain * 100:+.1f} percentage points")


@app.command("eval")
def evaluate_cmd(
    config: Path = typer.Argument(..., help="YAML config (its model, env and eval sections are used)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides"),
    model: Optional[str] = typer.Option(None, help="Model directory to evaluate (default: model.path)."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: eval.split)."),
) -> None:
    """Success rate of a model on a held-out split."""
    from agentrl.config import load_config
    from agentrl.driver.collect import evaluate
    from agentrl.driver.rollout_side import RolloutSide

    from agentrl.errors import ConfigError

    _quiet_loaders()
    with _errors_reported():
        cfg = load_config(config, overrides or [])
        ev = cfg.eval
        if ev.num_tasks == 0:
            raise ConfigError("eval.num_tasks=0: there is nothing to evaluate; set eval.num_tasks=N")
        chosen = (split, "--split") if split is not None else (ev.split, "eval.split")
        rollout = RolloutSide.open(cfg, model_path=model, splits=[chosen])  # no trainable copy of the model
        try:
            m = evaluate(rollout, chosen[0], ev.num_tasks, ev.temperature, ev.seed)
        finally:
            rollout.close()
    envs = ",".join(e.key for e in cfg.envs) or cfg.env.id
    console.print(f"{model or cfg.model.path} on {envs}/{chosen[0]} ({ev.num_tasks} tasks): "
                  f"success {m['success_rate']:.1%}  "
                  f"{_fmt(m, ['reward_mean', 'tool_calls_mean', 'turns_mean', 'tool_errors'])}")
    for name in _env_names(m):
        console.print(f"  {name}: success {m[f'env/{name}/success_rate']:.1%}  "
                      f"reward_mean={m[f'env/{name}/reward_mean']:.3g}")
    _print_episode_errors(m, console.print)
    print(json.dumps(m, sort_keys=True))


def _registry_table(registry, title: str) -> Table:
    """One row per registered id: where it lives and which package registered it."""
    from agentrl.errors import RegistryError

    table = Table(title=title)
    table.add_column("id")
    table.add_column("entry point")
    table.add_column("from")
    for entry_id in registry.ids():
        try:
            spec = registry.spec(entry_id)
        except RegistryError as exc:  # an id claimed by two packages: show it, keep listing
            table.add_row(entry_id, f"[red]{exc}[/]", "")
            continue
        table.add_row(entry_id, spec.entry_point if isinstance(spec.entry_point, str) else repr(spec.entry_point),
                      spec.origin)
    return table


@app.command()
def envs() -> None:
    """List registered environments (including those of installed packages)."""
    from agentrl.envs.registration import ENVS

    console.print(_registry_table(ENVS, "registered environments"))


@app.command()
def tools() -> None:
    """List registered tools (including those of installed packages)."""
    from agentrl.tools.core import TOOLS

    console.print(_registry_table(TOOLS, "registered tools"))


_STATUS_STYLE = {"pass": "[green]PASS[/]", "fail": "[bold red]FAIL[/]", "skip": "[yellow]SKIP[/]",
                 "warn": "[yellow]WARN[/]"}


@app.command("check-env")
def check_env_cmd(
    env_id: str = typer.Argument(..., help="Registered environment id, e.g. calculator-v0."),
    episodes: int = typer.Option(10, "--episodes", "-n", min=1, max=100_000, help="Episodes of hostile play."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Base seed of every check."),
) -> None:
    """Check an environment against Gymnasium's and agentrl's contracts; exit 1 on any failure."""
    from agentrl.envs.checker import check_env
    from agentrl.envs.registration import ENVS

    with _errors_reported():
        ENVS.spec(env_id)
        report = check_env(env_id, episodes=episodes, seed=seed)
    _report_checks(f"agentrl check-env {env_id}", report, f"{env_id} passed", f"{env_id} failed")


def _report_checks(title: str, report, passed: str, failed: str) -> None:
    """A check report as a table and a one-line verdict; exit 1 when any check failed."""
    table = Table(title=title)
    table.add_column("check")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    for row in report.results:
        table.add_row(row.name, _STATUS_STYLE[row.status], rich_escape(row.detail))
    console.print(table)
    counts = {s: sum(r.status == s for r in report.results) for s in _STATUS_STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if report.ok:
        console.print(f"[bold green]{rich_escape(passed)}[/] ({summary})")
        return
    console.print(f"[bold red]{rich_escape(failed)} {counts['fail']} check(s)[/] ({summary})")
    raise typer.Exit(code=1)


@app.command("check-model")
def check_model_cmd(
    model_dir: Path = typer.Argument(..., help="Model directory (tokenizer files and config.json; weights unused)."),
    env_id: str = typer.Option(..., "--env", help="Registered environment id, e.g. calculator-v0."),
    parser: Optional[str] = typer.Option(None, help="Tool-call parser to check (default: the env's own)."),
    episodes: int = typer.Option(3, "--episodes", "-n", min=1, help="Scripted episodes to play."),
    template_kwargs: Optional[str] = typer.Option(
        None, "--template-kwargs", help='Chat-template options as JSON, e.g. \'{"enable_thinking": false}\' '
        "(what model.chat_template_kwargs passes in training)."),
) -> None:
    """Pre-flight check of a model's tokenizer, chat template and parser on an env; exit 1 on any failure."""
    from agentrl.rollout.check_model import check_model

    if not model_dir.is_dir():
        _fail(ConfigError(f"{model_dir} is not a directory; give a Hugging Face model directory"))
    options = None
    if template_kwargs is not None:
        try:
            options = json.loads(template_kwargs)
        except json.JSONDecodeError as exc:
            _fail(ConfigError(f"--template-kwargs is not JSON ({exc.msg}); write e.g. '{{\"enable_thinking\": false}}'"))
        if not isinstance(options, dict):
            _fail(ConfigError("--template-kwargs must be a JSON object of option names to values"))
    _quiet_loaders()
    with _errors_reported():
        report = check_model(model_dir, env_id, parser=parser, episodes=episodes, template_kwargs=options)
    _report_checks(f"agentrl check-model {model_dir} --env {env_id}", report, f"{model_dir} is ready for {env_id}",
                   f"{model_dir} for {env_id} failed")


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Option(Path("models/tiny-calculator"), help="Output directory."),
    env: str = typer.Option("calculator-v0", help="Environment whose scripted solver provides demonstrations."),
    demos: Optional[int] = typer.Option(None, min=1, max=10_000_000,
                                        help="Demonstration episodes (default: a fresh one per SFT sample)."),
    tool_use_prob: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                  help="How often the demonstrator calls the tool."),
    sft_steps: Optional[int] = typer.Option(None, min=0, max=10_000_000, help="Supervised warm-start steps."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed."),
    corpus_episodes: Optional[int] = typer.Option(None, min=1, max=10_000_000,
                                                  help="Scripted episodes the tokenizer is trained on (default 3000)."),
) -> None:
    """Build a tiny tool-calling model from scratch (tokenizer, transformer, warm start).

    Unset options keep the defaults of `agentrl.recipes.tiny_model.build_tiny_model`.
    """
    from agentrl.recipes.tiny_model import build_tiny_model

    from agentrl.errors import ConfigError

    given = {"demos": demos, "tool_use_prob": tool_use_prob, "sft_steps": sft_steps, "corpus_episodes": corpus_episodes}
    _quiet_loaders()
    with _errors_reported():
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file; pass a directory for the model")
        try:
            build_tiny_model(out, env, seed=seed, **{k: v for k, v in given.items() if v is not None})
        except OSError as exc:  # the model is built in memory first; only saving touches --out
            raise ConfigError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc}); pass a writable "
                              "directory") from None


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

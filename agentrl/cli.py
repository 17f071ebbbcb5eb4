"""The `agentrl` command: train, eval, report, envs, tools, check-env, check-model, tiny-model.

Example:
    agentrl tiny-model --out models/tiny-calculator
    agentrl train examples/calculator.yaml train.steps=30
    agentrl eval runs/calculator --k 4
    agentrl eval examples/calculator.yaml --compare runs/calculator models/tiny-calculator
    agentrl report runs/calculator
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


def _print_episode_errors(metrics: dict, printer, what: str = "not trained on") -> None:
    """The first distinct episode-error texts of a batch, one per line (they are not trained on)."""
    samples = metrics.get("error_samples") or []
    if samples:
        printer(f"          [yellow]{int(metrics.get('episode_errors', 0))} episode(s) failed[/] ({what}):")
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

        from agentrl.driver.console import LEGEND, ConsoleSink

        lines = ConsoleSink(lambda line: progress.console.print(rich_escape(line), highlight=False, soft_wrap=True),
                            cfg.metrics.console_keys)
        legend = [LEGEND]

        def on_step(step: int, m: dict) -> None:
            while legend:  # once, above the first step's lines
                progress.console.print(f"[dim]{rich_escape(legend.pop())}[/]", soft_wrap=True)
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
    from agentrl.driver.metrics import run_summary

    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(run_summary(result), indent=2))


def _print_before_after(result: dict, split: str) -> None:
    if "before" not in result and "after" not in result:
        return
    table = Table(title=f"held-out success ({split} split)")
    table.add_column("")
    table.add_column("success rate (share of episodes)", justify="right")
    table.add_column("tool calls (mean per episode)", justify="right")
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
    target: Optional[str] = typer.Argument(None, help="A YAML config, or the policy to evaluate: a run directory "
                                           "(its final policy), a checkpoint (RUN/checkpoints/step-N) or a model "
                                           "directory (then --env is needed)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="dotted.key=value overrides of the config"),
    model: Optional[str] = typer.Option(None, help="Policy to evaluate (run, checkpoint or model directory; "
                                        "default: TARGET, or model.path of the config)."),
    compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="A B", show_default=False,
                                            help="Evaluate two policies on the same tasks and sampling seeds and "
                                            "report paired differences with a paired bootstrap CI."),
    env: Optional[list[str]] = typer.Option(None, "--env", help="Env id to evaluate on; repeat for several "
                                            "(default: env.id of the config)."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: eval.split)."),
    k: int = typer.Option(1, "--k", min=1, max=1024, help="Samples per task (pass@1..pass@k, maj@k)."),
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, max=10_000_000,
                                        help="Tasks per env, seeds 0..N-1 (default: eval.num_tasks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Path prefix of the results: PREFIX.json (every "
                                       "episode) and PREFIX.md (default: RUN/eval/NAME for a run's policy, "
                                       "else eval-results/NAME)."),
) -> None:
    """Score policies on held-out tasks: success, pass@k, maj@k, tool use, with bootstrap CIs over tasks."""
    from agentrl.cli_eval import default_prefix, eval_inputs, result_tables
    from agentrl.driver.evaluation import evaluate_policy, log_scalars, results_document, write_results
    from agentrl.driver.sinks import check_sinks

    _quiet_loaders()
    with _errors_reported():
        cfg, sources, settings = eval_inputs(target, overrides or [], model, compare or (), env or [], split, k, tasks)
        check_sinks(cfg.metrics)
    bar = Progress(TextColumn("[bold blue]eval"), BarColumn(), TextColumn("{task.completed}/{task.total} episodes"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    played = []
    with _errors_reported(), bar as progress:
        task = progress.add_task("eval", total=settings.episodes * len(sources))
        for source in sources:
            played.append(evaluate_policy(cfg, source, settings, lambda n: progress.update(task, advance=n)))
    with _errors_reported():
        doc = results_document(sources, played, settings)
        prefix = out if out is not None else default_prefix(sources, settings)
        json_path, md_path = write_results(doc, prefix)
        log_scalars(cfg, doc, json_path.parent)
    for table in result_tables(doc):
        console.print(table)
    for i in range(len(sources)):
        _print_episode_errors(_eval_errors(doc, i), console.print, "not scored")
    console.print(f"means are over tasks (per-task pass@k, or the mean over a task's samples); totals count "
                  f"episodes. Every episode: {json_path}  summary: {md_path}", soft_wrap=True)


def _eval_errors(doc: dict, model: int) -> dict:
    """`error_samples` of a policy's failed episodes, in the shape `_print_episode_errors` reads."""
    from agentrl.driver.metrics import error_samples
    from agentrl.eval.results import EpisodeOutcome

    failed = [EpisodeOutcome.from_json(e) for e in doc["episodes"] if e["model"] == model and e["failure"]]
    return {"episode_errors": len(failed), "error_samples": error_samples(failed)}


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (the run_dir of `agentrl train`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the page (default: RUN_DIR/report.html)."),
) -> None:
    """Write one self-contained HTML page of a run: curves, evaluations and a trajectory viewer."""
    from agentrl.eval.report import write_report

    with _errors_reported():
        path = write_report(run_dir, out)
    console.print(f"wrote {path} (self-contained: open it in any browser, offline)", soft_wrap=True)


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
    demo_turns: Optional[int] = typer.Option(None, min=1, max=10_000,
                                             help="Turns per demonstration (default 4; more for many-turn games)."),
) -> None:
    """Build a tiny tool-calling model from scratch (tokenizer, transformer, warm start).

    Unset options keep the defaults of `agentrl.recipes.tiny_model.build_tiny_model`.
    """
    from agentrl.recipes.tiny_model import build_tiny_model

    from agentrl.errors import ConfigError

    given = {"demos": demos, "tool_use_prob": tool_use_prob, "sft_steps": sft_steps, "corpus_episodes": corpus_episodes,
             "demo_turns": demo_turns}
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

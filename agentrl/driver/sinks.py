"""Where metrics go: `metrics.jsonl` always, TensorBoard event files by default, wandb when configured.

Every sink takes the same records: a step record (`{"step": 3, "reward_mean": ..., ...}`) or an
event (`{"event": "eval_before", ...}`, `{"event": "checkpoint_skipped", ...}`). The JSONL file keeps
them all; TensorBoard and wandb plot the numbers of step records at their step, and those of the
evaluations under `eval/` (before training at the first step, after it at the last). The console
(`agentrl train`'s per-step lines, `console.py`) is the fourth sink.

wandb is imported only when `metrics.wandb_project` is set, and refused at start, with the extra to
install, when it is set but wandb is missing.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agentrl.config import Config, MetricsConfig
from agentrl.errors import ConfigError

EVALUATIONS = ("eval_before", "eval_after")


class MetricsSink(Protocol):
    """Takes every metrics record of a run."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The plottable numbers of a record: numeric values other than the step itself and booleans."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k not in ("step", "time")}


def plotted(record: Mapping[str, Any], last_step: int) -> tuple[int, dict[str, float]] | None:
    """(step, tag -> value) to plot for a record, or None for events that are not plotted."""
    event = record.get("event")
    if event is None and "step" in record:
        return int(record["step"]), scalars(record)
    if event in EVALUATIONS:
        return last_step, {f"eval/{k}": v for k, v in scalars(record).items()}
    return None


class MetricsWriter:
    """Appends one JSON object per line to `path` (the run's `metrics.jsonl`); non-finite numbers become null."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars in TensorBoard event files under `log_dir` (`tensorboard --logdir RUN_DIR/tensorboard`).

    Args:
        log_dir: Directory of the event files.
        start_step: The step a resumed run continues from: TensorBoard drops what an earlier
            process logged for the later steps, which this run logs again.
    """

    def __init__(self, log_dir: str | Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        self.last_step = start_step

    def write(self, record: Mapping[str, Any]) -> None:
        point = plotted(record, self.last_step)
        if point is None:
            return
        self.last_step, values = point
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, self.last_step)
        self.writer.flush()  # one flush per step: a live `tensorboard` shows each step as it ends

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars logged to a Weights & Biases run (one per process: a resumed run starts a new wandb run).

    Not exercised by the test suite, which has no network: only the refusal without wandb is tested.
    """

    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        import wandb

        m = cfg.metrics
        self.run = wandb.init(project=m.wandb_project, entity=m.wandb_entity, name=run_dir.name, dir=str(run_dir),
                              config=cfg.model_dump(mode="json"))
        self.last_step = start_step

    def write(self, record: Mapping[str, Any]) -> None:
        point = plotted(record, self.last_step)
        if point is not None:
            self.last_step, values = point
            self.run.log(values, step=self.last_step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Several sinks as one; `close` closes each even when one fails."""

    def __init__(self, sinks: Iterable[MetricsSink]):
        self.sinks = list(sinks)

    def write(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - the others must still flush their files
                errors.append(exc)
        if errors:
            raise errors[0]


def check_sinks(m: MetricsConfig) -> None:
    """Refuse, before any work, a configured sink whose package is missing (naming what to install)."""
    if m.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"metrics.tensorboard is true but TensorBoard's writer cannot be imported ({exc}); "
                              "pip install tensorboard, or set metrics.tensorboard=false") from None
    if m.wandb_project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"metrics.wandb_project={m.wandb_project!r} but wandb is not installed; pip install "
                              "'agentrl[wandb]' (then `wandb login`), or leave metrics.wandb_project unset") from None


def open_sinks(cfg: Config, run_dir: Path, start_step: int = 0) -> Sinks:
    """`metrics.jsonl`, plus TensorBoard and wandb as `cfg.metrics` asks (`check_sinks` ran before)."""
    sinks: list[MetricsSink] = [MetricsWriter(run_dir / "metrics.jsonl")]
    try:
        if cfg.metrics.tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tensorboard", start_step))
        if cfg.metrics.wandb_project is not None:
            sinks.append(WandbSink(cfg, run_dir, start_step))
    except BaseException:
        Sinks(sinks).close()
        raise
    return Sinks(sinks)

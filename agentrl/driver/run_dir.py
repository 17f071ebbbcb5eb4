"""The run directory: claimed before any work, never mixed with another run, never left empty.

A fresh run needs a new or empty directory; one that already holds a run is refused unless the
user asks to continue it (`--resume`) or to replace it (`--overwrite`). Overwriting deletes only
the files a run writes (`RUN_FILES`), and only once the new run has passed its checks, so a broken
config never costs the old run; a directory that also holds other files is refused rather than
emptied. A run that fails before its first step removes what it created (the console shows why);
one that fails later keeps its metrics and checkpoints and ends `metrics.jsonl` with an `error`
record holding the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from agentrl.errors import AgentRLError, ConfigError
from agentrl.trainer.checkpoint import latest_checkpoint

# Everything a run writes into its directory (the CLI adds summary.json; the metrics sinks tensorboard/ and wandb/;
# the trajectory log trajectories/; `agentrl eval` of the run eval/; `agentrl report` report.html).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "final", "tensorboard", "wandb",
             "trajectories", "eval", "report.html")


def _names(paths: list[Path], limit: int = 4) -> str:
    shown = ", ".join(sorted(p.name for p in paths)[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


class RunDir:
    """One run's claim on `path`.

    Args:
        path: run_dir from the config.
        resume: Continue the run in `path` from its latest checkpoint.
        overwrite: Replace the run in `path`.

    Example:
        >>> run = RunDir("runs/x", resume=False, overwrite=False)   # doctest: +SKIP
        >>> run.claim()                     # refuses a file, another run, an unwritable path
        >>> with run.failure_record():      # removes the directory again if we fail before step 1
        ...     run.start(); ...; run.step_done()
    """

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.created: Path | None = None  # the top-most directory this run created
        self.steps_done = 0

    def claim(self) -> None:
        """Check the directory can take this run and create it; nothing of an old run is touched."""
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in run_dir and --overwrite replaces it; pass one of them")
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run_dir {str(p)!r} is a file; point run_dir at a directory (new or empty)")
        ancestor = next((a for a in p.parents if a.exists()), None)
        if ancestor is not None and not ancestor.is_dir():
            raise ConfigError(f"run_dir {str(p)!r} is inside {str(ancestor)!r}, which is a file; set run_dir to a "
                              "directory path")
        if self.resume:
            if latest_checkpoint(p) is None:
                raise ConfigError(f"nothing to resume: run_dir {str(p)!r} holds no checkpoint; run without --resume "
                                  "to start it, or point run_dir at the run to continue")
            return
        entries = list(p.iterdir()) if p.is_dir() else []
        ours = [e for e in entries if e.name in RUN_FILES]
        foreign = [e for e in entries if e.name not in RUN_FILES]
        if ours and not self.overwrite:
            last = latest_checkpoint(p)
            held = f"checkpoint {last.name}" if last else _names(ours)
            if foreign:  # --overwrite would refuse too: it deletes only a run's own files
                raise ConfigError(f"run_dir {str(p)!r} already holds a run ({held}) and other files "
                                  f"({_names(foreign)}); continue it with --resume or set run_dir to a new directory")
            raise ConfigError(f"run_dir {str(p)!r} already holds a run ({held}); continue it with --resume, replace "
                              "it with --overwrite, or set run_dir to a new directory")
        if foreign:
            why = "--overwrite deletes only a run's own files, and it" if self.overwrite else "it"
            raise ConfigError(f"run_dir {str(p)!r} is not empty: {why} holds {_names(foreign)}; set run_dir to a "
                              "new or empty directory")
        self._create()

    def _create(self) -> None:
        missing = [a for a in (self.path, *self.path.parents) if not a.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".agentrl-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            if missing:
                shutil.rmtree(missing[-1], ignore_errors=True)
            raise ConfigError(f"run_dir {str(self.path)!r} cannot be written ({exc.strerror or exc}); choose a "
                              "directory you can write to") from None
        self.created = missing[-1] if missing else None

    def start(self) -> None:
        """The checks passed and work begins: clear the old run when overwriting."""
        if self.overwrite:
            self._remove_run_files()

    def step_done(self) -> None:
        self.steps_done += 1

    @contextlib.contextmanager
    def failure_record(self) -> Iterator[None]:
        """On an exception: before the first step, remove what this run wrote; later, log an `error` record."""
        try:
            yield
        except BaseException as exc:
            if self.steps_done == 0 and not self.resume:
                self.discard()
            else:
                message = str(exc) if isinstance(exc, AgentRLError) else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(OSError), (self.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"event": "error", "message": message, "time": time.time()}) + "\n")
            raise

    def discard(self) -> None:
        """Remove what this run created: its directory if it made it, else the run files it wrote."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        self._remove_run_files()  # the directory was empty (or overwritten) when the run claimed it

    def _remove_run_files(self) -> None:
        for name in RUN_FILES:
            old = self.path / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()

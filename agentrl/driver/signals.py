"""SIGTERM and Ctrl-C stop a training run cleanly: nothing half-written, a checkpoint to resume from.

Where a signal lands decides what is safe. While episodes are being played (or evaluated) no state
of the run changes, so the step is abandoned at once. During the update, the weight push and the
checkpoint, stopping half-way would leave an optimizer that took some mini-batches' steps and not
others, so the signal is only noted, the step finishes, and the run stops after it. Either way the
loop then saves the last completed step (unless it is already saved), closes its workers and raises
`RunInterrupted`. A second signal stops at once, without that checkpoint (the one before stays).

Handlers are installed by `_run` once the workers are up (Ray installs its own SIGTERM handler when
it starts; this one replaces it for the training steps and restores it after).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from agentrl.errors import RunInterrupted

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The run's SIGTERM/SIGINT handlers (a no-op outside the main thread, where Python delivers no signals)."""

    def __init__(self):
        self.signum: int | None = None
        self._interruptible = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        again = self.signum is not None
        self.signum = signum
        if again:
            raise RunInterrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}; the last "
                                 "checkpoint written stays: continue with --resume", forced=True)
        if self._interruptible:
            raise RunInterrupted(signum, self._text(signum))

    @staticmethod
    def _text(signum: int) -> str:
        return f"stopped by {signal.Signals(signum).name}"

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch (playing episodes) that a signal may end at once."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def check(self) -> None:
        """Raise `RunInterrupted` if a signal arrived (called between steps)."""
        if self.signum is not None:
            raise RunInterrupted(self.signum, self._text(self.signum))


def stopped(exc: RunInterrupted, trainer, run_path: Path, sinks, done: int, saved: int) -> RunInterrupted:
    """Checkpoint the last whole step (unless a second signal forced the stop, it is saved already, or
    the non-finite guard has tripped), record an `interrupted` event, and return the error to raise,
    which says how to continue.

    Args:
        exc: The interruption.
        trainer: The trainer side (`save(run_path, step)`, `guard`).
        run_path: The run directory.
        sinks: Where the run's records go (`write(record)`).
        done: Steps completed.
        saved: The newest step checkpointed (0: none).
    """
    if done > saved and not exc.forced and not trainer.guard.tripped:
        trainer.save(run_path, done)
        saved = done
    sinks.write({"event": "interrupted", "signal": exc.signum, "step": done, "checkpoint_step": saved or None})
    where = (f"after step {done}; the checkpoint of step {saved} is in {run_path}/checkpoints: continue with --resume"
             if saved else "before the first step was checkpointed; nothing to resume: run again")
    return RunInterrupted(exc.signum, f"{exc} {where}", forced=exc.forced)

"""`agentrl report RUN_DIR`: one self-contained HTML page of a run (curves, evaluations, trajectories).

Example:
    >>> write_report("runs/calculator")        # doctest: +SKIP
    PosixPath('runs/calculator/report.html')
"""

from __future__ import annotations

from pathlib import Path

from agentrl.errors import ConfigError
from agentrl.eval.report.page import render_page
from agentrl.eval.report.run_files import read_run


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html); returns its path."""
    run = read_run(run_dir)
    path = Path(out) if out is not None else run.path / "report.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(render_page(run), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {str(path)!r} ({exc.strerror or exc}); pass --out with a "
                          "writable path") from None
    return path

"""RunDir on a real filesystem: a run never mixes with another, and a failed start leaves nothing."""

from __future__ import annotations

import json

import pytest

from agentrl.errors import ConfigError
from agentrl.trainer.checkpoint import save_checkpoint
from agentrl.driver.run_dir import RunDir


def _fail_in(run: RunDir, steps: int = 0) -> None:
    with pytest.raises(RuntimeError), run.failure_record():
        run.start()
        (run.path / "config.json").write_text("{}")
        (run.path / "metrics.jsonl").write_text('{"step": 1}\n')
        for _ in range(steps):
            run.step_done()
        raise RuntimeError("boom")


def test_a_run_that_fails_before_its_first_step_removes_what_it_created(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")  # neither runs/ nor runs/a exists yet
    run.claim()
    assert run.path.is_dir()
    _fail_in(run)
    assert not (tmp_path / "runs").exists()


def test_a_run_into_an_existing_empty_dir_removes_only_its_files(tmp_path):
    run = RunDir(tmp_path)
    run.claim()
    _fail_in(run)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_a_run_that_fails_later_keeps_its_files_and_logs_the_error(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim()
    _fail_in(run, steps=1)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1}
    assert lines[1]["event"] == "error" and lines[1]["message"] == "RuntimeError: boom"
    with pytest.raises(ConfigError, match="already holds a run .*--resume.*--overwrite"):
        RunDir(run.path).claim()


def test_overwrite_deletes_the_old_run_only_once_work_starts(tmp_path):
    old = tmp_path / "run"
    save_checkpoint(old, 3, {"w": 1})
    (old / "metrics.jsonl").write_text('{"step": 3}\n')
    with pytest.raises(ConfigError, match="checkpoint step-000003"):
        RunDir(old).claim()
    run = RunDir(old, overwrite=True)
    run.claim()
    assert (old / "checkpoints").is_dir()  # the checks of the new run have not passed yet
    run.start()
    assert list(old.iterdir()) == []


def test_foreign_files_are_never_deleted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="notes.txt"):
            RunDir(tmp_path, overwrite=overwrite).claim()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_needs_a_checkpoint_and_never_discards(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunDir(tmp_path / "none", resume=True).claim()
    save_checkpoint(tmp_path, 1, {"w": 1})
    run = RunDir(tmp_path, resume=True)
    run.claim()
    with pytest.raises(RuntimeError), run.failure_record():
        raise RuntimeError("boom")
    assert (tmp_path / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="pass one of them"):
        RunDir(tmp_path, resume=True, overwrite=True).claim()


def test_a_path_that_cannot_be_written_is_refused_and_nothing_is_left(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="which is a file"):
        RunDir(blocker / "run").claim()
    with pytest.raises(ConfigError, match="is a file"):
        RunDir(blocker).claim()

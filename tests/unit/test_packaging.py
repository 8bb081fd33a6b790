"""What the wheel carries: every package of the tree, and the migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from launcher.workers import celery_command, tasks_main

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("bridge", "cli", "eventpipe", "launcher", "producer", "tasks", "web")


def test_the_wheel_lists_every_package_and_the_migrations() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    in_tree = {".".join(init.parent.relative_to(ROOT).parts)
               for top in TOP_LEVEL for init in (ROOT / top).rglob("__init__.py")}
    migrations = {"eventpipe.alembic", "eventpipe.alembic.versions"}
    assert set(setuptools["packages"]) == in_tree | migrations
    assert setuptools["package-dir"] == {"eventpipe.alembic": "alembic"}


def test_the_celery_processes_the_launcher_starts_take_this_projects_tasks_wherever_run(
        tmp_path: Path) -> None:
    """Before: `eventpipe worker` and `eventpipe up` started `python -m celery -A tasks`,
    which imports `tasks` with the working directory first on the path: run from a project
    holding a `tasks.py` (Celery's own guide names it so), every worker process failed to
    start ("Module 'tasks' has no attribute 'celery'")."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the wrong tasks')\n")
    command = [*celery_command(None, 0, "INFO"), "--help"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EVENTPIPE_ENV_FILE": str(tmp_path / "none.env")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: celery worker")


def test_celerys_detach_which_would_start_a_worker_without_this_app_is_refused(
        tmp_path: Path) -> None:
    """Review: `python -P -m tasks worker --detach` started `python -m celery worker`, whose
    default app discards every task of the queues it serves as unregistered; a later review:
    so did `-DE`, while `-Q multi` was refused."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, tasks_main(), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "EVENTPIPE_ENV_FILE": str(tmp_path / "none")})

    for refused in (["worker", "--detach"], ["--quiet", "worker", "-DE"], ["multi", "start"]):
        done = run(*refused)
        assert done.returncode == 1, refused
        assert "--detach and multi would start `python -m celery`" in done.stderr
    assert run("worker", "-Q", "multi", "-lDEBUG", "--help").returncode == 0

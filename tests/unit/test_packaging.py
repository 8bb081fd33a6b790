"""What the wheel carries: every package of the tree, and the migrations."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("bridge", "cli", "eventpipe", "launcher", "producer", "tasks", "web")


def test_the_wheel_lists_every_package_and_the_migrations() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    in_tree = {".".join(init.parent.relative_to(ROOT).parts)
               for top in TOP_LEVEL for init in (ROOT / top).rglob("__init__.py")}
    migrations = {"eventpipe.alembic", "eventpipe.alembic.versions"}
    assert set(setuptools["packages"]) == in_tree | migrations
    assert setuptools["package-dir"] == {"eventpipe.alembic": "alembic"}

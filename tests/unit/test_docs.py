"""The README and docs/ point at what exists: files they link, commands they show."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cli.main import _parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(found.choices)


def test_every_eventpipe_command_the_readme_shows_exists() -> None:
    commands = _commands(_parser())
    shown = set(re.findall(r"`eventpipe ([a-z]+)", (ROOT / "README.md").read_text()))
    assert {"verify", "dlq", "up", "trace"} <= shown
    assert shown <= set(commands), shown - set(commands)
    assert {"list", "show", "replay", "purge", "restore"} <= set(_commands(commands["dlq"]))


def test_the_readme_stays_a_front_page() -> None:
    # What a newcomer reads first; the manuals are in docs/.
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210


def test_the_command_says_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("eventpipe ")

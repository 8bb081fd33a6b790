"""The console in a real browser (Playwright driving Debian's Chromium, headless) against the
API on a real HTTP server, after a real pipeline dead-lettered two poison messages: the status
view names the partitions and the problems, the DLQ view shows an entry in full, replays one and
deletes the other, and both leave."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from eventpipe.samples import Story
from eventpipe.settings import Settings
from tests.support.http import serving
from tests.support.pipeline import Pipeline, wait_until
from tests.support.services import REDIS_URL
from web import create_app, services

TOKEN = "console-test-token"
# Chromium as root needs --no-sandbox; without the background services it would reach for
# Google's hosts at every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found is None:
        pytest.fail("Chromium not found: install Debian's `chromium` package (.ci/run does), "
                    "or set CHROMIUM to its path", pytrace=False)
    return found


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def console(kafka_broker: str, tmp_path: Path) -> Iterator[tuple[Pipeline, str]]:
    pipeline = Pipeline(kafka_broker, tmp_path, partitions=2)
    story = Story(seed=3)
    pipeline.send([*(story.next() for _ in range(40)), (b"bad-1", b"{broken"),
                   (b"bad-2", b"\xff\xfe not json")])
    pipeline.start_worker()
    bridge = pipeline.start_bridge()
    ends = pipeline.end_offsets()
    wait_until(lambda: pipeline.committed_offsets() == ends, 120, "the stream drained")
    wait_until(lambda: pipeline.dlq.depth() == 2, 30, "two dead letters in the stream")
    pipeline.stop(bridge)  # a replayed message stays in Kafka rather than coming back
    app = create_app(replace(pipeline.settings, dlq_api_token=TOKEN))
    try:
        with serving(app) as url:
            yield pipeline, url
    finally:
        services.of(app).close()
        pipeline.close()


def test_the_console_shows_the_status_and_replays_and_deletes_dead_letters(
    console: tuple[Pipeline, str], browser: Browser,
) -> None:
    pipeline, url = console
    page: Page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete … for good?"
    page.goto(f"{url}/console")

    # The status view: a row per partition, the problem of the stopped bridge, the DLQ count.
    partitions = page.locator("#partitions tbody tr")
    expect(partitions).to_have_count(2)
    expect(page.locator("#problems")).to_contain_text("no bridge is running")
    expect(page.locator("#dlq-open")).to_have_text("2")
    expect(page.locator("#dlq-classes")).to_contain_text("InvalidEvent")

    # The DLQ view asks for the token, then lists both entries.
    page.click("#tab-dlq")
    expect(page.locator("#dlq-message")).to_contain_text("enter the DLQ token")
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    rows = page.locator("#entries tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#dlq-depth")).to_have_text("2 in the DLQ")

    first = rows.nth(0)
    entry_id = first.get_attribute("data-id")
    first.get_by_role("button", name="Show").click()
    expect(page.locator("#entry")).to_be_visible()
    expect(page.locator("#entry-id")).to_have_text(entry_id or "")
    expect(page.locator("#entry-fields")).to_contain_text("InvalidEvent")
    expect(page.locator("#entry-value")).to_have_text(re.compile(r"\{broken|base64: "))

    page.click("#entry-replay")
    expect(page.locator("#dlq-message")).to_contain_text(f"replayed {entry_id}")
    expect(rows).to_have_count(1)
    expect(page.locator("#entry")).to_be_hidden()

    rows.nth(0).get_by_role("button", name="Delete").click()
    expect(page.locator("#dlq-message")).to_contain_text("deleted")
    expect(rows).to_have_count(0)
    assert pipeline.dlq.depth() == 0


@pytest.fixture
def served(sqlite_url: str) -> Iterator[str]:
    app = create_app(Settings(database_url=sqlite_url, redis_url=REDIS_URL))
    try:
        with serving(app) as url:
            yield url
    finally:
        services.of(app).close()


def test_the_status_view_asks_again_only_once_answered(served: str, browser: Browser) -> None:
    """A review's finding: the console asked for /status every two seconds whether the last
    answer had come or not. While the database does not answer, each takes up to ten
    seconds: the requests queued up in the tab, and what it showed fell further behind."""
    page: Page = browser.new_page()
    held: list[Route] = []
    page.route("**/status", lambda route: held.append(route))  # answered when the test says
    page.goto(f"{served}/console")
    # Three refreshes' time with the first still unanswered: no second request.
    page.wait_for_timeout(3 * 2_000)
    assert len(held) == 1
    held[0].continue_()
    deadline = time.monotonic() + 10
    while len(held) == 1 and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # the route handler runs while Playwright is called
    assert len(held) == 2  # and the next, once the first is answered
    held[1].continue_()

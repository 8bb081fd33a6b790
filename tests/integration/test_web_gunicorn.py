"""The API as production runs it: gunicorn with several worker processes.

Metrics must describe the whole server whichever worker answers the scrape, so they go
through prometheus_client's multiprocess directory set up by `web/gunicorn_conf.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from eventpipe.dlq.stream import DeadLetterStream, StreamEntry
from launcher.embedded import free_port
from tests.support.factories import dead_letter
from tests.support.services import REDIS_URL
from web.resources.health.checks import TIMEOUT_S as READY_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).parent / "gunicorn"
WORKERS = 3


def wait_for(url: str, server: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "gunicorn exited"
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.05)  # polling for the port to open; nothing to wait on instead
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture
def dlq_stream() -> Iterator[str]:
    stream = f"test:dlq:{uuid.uuid4().hex}"
    yield stream
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(stream, f"{stream}:index", f"{stream}:totals")
    client.close()


@pytest.fixture
def server(sqlite_url: str, dlq_stream: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "EVENTPIPE_ENV_FILE": str(tmp_path / "none.env"),
        "DATABASE_URL": sqlite_url, "REDIS_URL": REDIS_URL, "DLQ_STREAM": dlq_stream,
        "WEB_HOST": "127.0.0.1", "WEB_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "GUNICORN_CMD_ARGS": f"--workers {WORKERS}",
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen([str(GUNICORN), "-c", "web/gunicorn_conf.py", "web.wsgi:app"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health", process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_every_scrape_reports_all_workers(server: str, dlq_stream: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    stream = DeadLetterStream(client, dlq_stream, max_entries=100, max_bytes=10**6)
    entries: list[StreamEntry] = [dead_letter(n) for n in range(4)]
    for entry in entries:
        stream.put(entry)
    client.close()
    # /ready takes its whole 2 s timeout (Kafka is unreachable) and a sync worker serves one
    # request at a time: requests sent together are served by as many different workers.
    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        statuses = list(pool.map(lambda _: requests.get(f"{server}/ready", timeout=10)
                                 .status_code, range(WORKERS)))
    assert statuses == [503] * WORKERS
    assert time.monotonic() - started < 2 * READY_TIMEOUT_S, "not served side by side"
    for _ in range(20):
        assert requests.get(f"{server}/openapi.json", timeout=5).status_code == 200
    for _ in range(2 * WORKERS):
        text = requests.get(f"{server}/metrics", timeout=5).text
        assert samples(text, "flask_http_request_duration_seconds_count",
                       url_rule="/ready", status="503") == WORKERS
        assert samples(text, "flask_http_request_duration_seconds_count",
                       url_rule="/openapi.json", status="200") == 20
        assert samples(text, "dlq_depth") == len(entries)
    # The series a federation names (`name[]`): the exporter's own choice was a 500 here.
    chosen = requests.get(f"{server}/metrics", timeout=5, params={
        "name[]": ["dlq_depth", "flask_http_request_duration_seconds_count"]})
    assert chosen.status_code == 200
    assert samples(chosen.text, "dlq_depth") == len(entries)
    assert samples(chosen.text, "flask_http_request_duration_seconds_count",
                   url_rule="/openapi.json", status="200") == 20
    assert "flask_http_request_duration_seconds_bucket" not in chosen.text

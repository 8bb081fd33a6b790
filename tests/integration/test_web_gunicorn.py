"""The API as production runs it: gunicorn with several worker processes.

Metrics must describe the whole server whichever worker answers the scrape, so they go
through prometheus_client's multiprocess directory set up by `web/gunicorn_conf.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
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
from tests.support.pipeline import wait_until
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


def environment(sqlite_url: str, tmp_path: Path, port: int, dlq_stream: str = "test:dlq",
                workers: int = WORKERS) -> dict[str, str]:
    """What gunicorn is started with: the API on 127.0.0.1:`port`."""
    return {
        **os.environ,
        "EVENTPIPE_ENV_FILE": str(tmp_path / "none.env"),
        "DATABASE_URL": sqlite_url, "REDIS_URL": REDIS_URL, "DLQ_STREAM": dlq_stream,
        "WEB_HOST": "127.0.0.1", "WEB_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "GUNICORN_CMD_ARGS": f"--workers {workers}",
    }


def start(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [str(GUNICORN), "-c", "web/gunicorn_conf.py", *args, "web.wsgi:app"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def serving(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """`wait_for`, saying gunicorn's log if it does not serve."""
    try:
        wait_for(url, process)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{log_path.read_text()}") from None


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def server(sqlite_url: str, dlq_stream: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = environment(sqlite_url, tmp_path, port, dlq_stream)
    # A request at a time per process: requests sent together are served by as many.
    env["GUNICORN_CMD_ARGS"] += " --worker-class sync"
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


def test_start_removes_only_prometheus_clients_own_files(sqlite_url: str,
                                                         tmp_path: Path) -> None:
    """A review's finding: every `*.db` of PROMETHEUS_MULTIPROC_DIR went, an operator's
    SQLite read model with them when the variable named its directory."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    theirs = ["eventpipe.db", "users.db", "counter.db", "gauge_7.db", "notes.txt"]
    leftovers = ["counter_99999999.db", "gauge_livesum_99999999.db",
                 "gauge_mostrecent_99999999.db", "histogram_99999999.db", "summary_99999999.db"]
    for name in theirs + leftovers:
        (metrics / name).write_text("precious")
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = start(environment(sqlite_url, tmp_path, port, workers=1), log)
    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
    finally:
        stop(process)
    assert all((metrics / name).read_text() == "precious" for name in theirs)
    assert not any((metrics / name).exists() for name in leftovers)


def test_a_port_another_process_holds_is_a_bad_setting_in_one_line(sqlite_url: str,
                                                                   tmp_path: Path) -> None:
    """As `eventpipe web` says it. (Before: 12 lines of retries over 5 s, exit status 1.)"""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(GUNICORN), "-c", "web/gunicorn_conf.py", "web.wsgi:app"], cwd=ROOT,
            env=environment(sqlite_url, tmp_path, port, workers=1), capture_output=True,
            text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"gunicorn: bad setting: WEB_PORT={port}: ")
    assert line.endswith("another process listens there; set WEB_PORT to a free port")


@pytest.mark.parametrize("given", ["-b", "GUNICORN_CMD_ARGS"])
def test_a_bind_given_to_gunicorn_is_not_web_ports(sqlite_url: str, tmp_path: Path,
                                                   given: str) -> None:
    """`-b`/`--bind` replaces WEB_HOST:WEB_PORT: WEB_PORT, held here, is not checked."""
    port = free_port()
    bind = f"127.0.0.1:{port}"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = environment(sqlite_url, tmp_path, taken.getsockname()[1], workers=1)
        log = tmp_path / "gunicorn.log"
        if given == "-b":
            process = start(env, log, "-b", bind)
        else:
            env["GUNICORN_CMD_ARGS"] += f" --bind={bind}"
            process = start(env, log)
        try:
            serving(f"http://{bind}/health", process, log)
        finally:
            stop(process)


def test_a_reload_keeps_serving_on_the_port_it_holds(sqlite_url: str, tmp_path: Path) -> None:
    """A HUP loads the configuration again while this server holds WEB_PORT: not another
    process's, and no reason to stop."""
    log = tmp_path / "gunicorn.log"
    port = free_port()
    process = start(environment(sqlite_url, tmp_path, port, workers=1), log)
    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
        booted = log.read_text().count("Booting worker")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("Booting worker") > booted
                   or process.poll() is not None, 30, "a worker booted after the HUP")
        assert process.poll() is None, log.read_text()
        serving(f"http://127.0.0.1:{port}/health", process, log)
    finally:
        stop(process)


def test_every_line_the_server_writes_is_json_each_request_a_record(sqlite_url: str,
                                                                    tmp_path: Path) -> None:
    """Before: gunicorn's own lines (starting, a worker booted, a request refused before the
    app saw it) and its access lines were plain text among the app's JSON lines, lines a log
    collector reading JSON cannot parse."""
    log = tmp_path / "gunicorn.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start(environment(sqlite_url, tmp_path, port, workers=1), log)
    try:
        serving(f"{base}/health", process, log)
        assert requests.get(f"{base}/users/nobody", params={"x": "1"},
                            timeout=5).status_code == 404
        assert requests.get(f"{base}/users/{'a' * 9000}", timeout=5).status_code == 414
    finally:
        stop(process)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(line["role"] == "web" for line in lines)
    [access] = [line for line in lines if line.get("path") == "/users/nobody"]
    assert access["logger"] == "gunicorn.access" and access["msg"] == "request"
    assert (access["method"], access["status"], access["query"]) == ("GET", 404, "x=1")
    assert access["bytes"] > 0 and access["durationMs"] >= 0 and access["remote"] == "127.0.0.1"
    assert any(line["level"] == "WARNING" and "Request Line is too large" in line["msg"]
               for line in lines)
    assert any(line["msg"] == "Shutting down: Master" for line in lines)


def test_eventpipe_web_is_this_server_and_stops_at_sigterm_with_status_0(sqlite_url: str,
                                                                        tmp_path: Path) -> None:
    """Before: `eventpipe web`, which `eventpipe up` runs, was werkzeug's development server.
    It said so in red (colour codes inside the JSON lines, as in each request's line), and
    SIGTERM killed it with status 143 and whatever request it was serving."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "web.log"
    with log.open("wb") as out:  # from another directory: the configuration is found anyway
        process = subprocess.Popen([str(Path(sys.executable).parent / "eventpipe"), "web"],
                                   cwd=tmp_path, env=environment(sqlite_url, tmp_path, port),
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        serving(f"{base}/health", process, log)
        assert requests.get(f"{base}/users/nobody", timeout=5).status_code == 404
    finally:
        process.terminate()
        status = process.wait(timeout=40)
    assert status == 0, log.read_text()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    booted = {line["pid"] for line in lines if line["msg"].startswith("Booting worker")}
    assert len(booted) == WORKERS  # GUNICORN_CMD_ARGS's
    assert any(line.get("path") == "/users/nobody" and line["status"] == 404 for line in lines)
    assert not any("\x1b" in line["msg"] or "development server" in line["msg"].lower()
                   for line in lines)


def test_eventpipe_web_serves_its_api_from_a_directory_with_a_web_package_of_its_own(
        sqlite_url: str, tmp_path: Path) -> None:
    """Before: gunicorn puts its working directory first on the path, so `eventpipe web` (and
    `eventpipe up`) run from a project holding a `web` package of its own imported that one,
    and no worker booted (`No module named 'web.wsgi'`)."""
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "__init__.py").write_text("")
    port = free_port()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "eventpipe"), "web"],
                                   cwd=tmp_path,
                                   env=environment(sqlite_url, tmp_path, port, workers=1),
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
    finally:
        process.terminate()
        assert process.wait(timeout=40) == 0, log.read_text()


def test_an_ipv6_web_host_is_served(sqlite_url: str, tmp_path: Path) -> None:
    """Before: WEB_HOST=::1 made the bind "::1:8000", which gunicorn refused ("'' is not a
    valid port number")."""
    port = free_port()
    env = {**environment(sqlite_url, tmp_path, port, workers=1), "WEB_HOST": "::1"}
    log = tmp_path / "gunicorn.log"
    process = start(env, log)
    try:
        serving(f"http://[::1]:{port}/health", process, log)
    finally:
        stop(process)


def test_a_chunked_body_past_the_limit_is_a_413_as_one_with_a_length(sqlite_url: str,
                                                                     tmp_path: Path) -> None:
    """Before: sent chunked (no Content-Length), a body past the API's 64 KiB was cut there
    and answered 400 "Invalid JSON body", as if the client had sent broken JSON."""
    port = free_port()
    env = {**environment(sqlite_url, tmp_path, port, workers=1), "DLQ_API_TOKEN": "t0ken"}
    log = tmp_path / "gunicorn.log"
    process = start(env, log)
    body = json.dumps({"all": True, "note": " " * 100_000}).encode()

    def chunked() -> Iterator[bytes]:  # requests sends a generator chunked
        yield body[:1000]
        yield body[1000:]

    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
        for data in (body, chunked()):
            response = requests.post(f"http://127.0.0.1:{port}/dlq/replay", data=data,
                                     headers={"Authorization": "Bearer t0ken",
                                              "Content-Type": "application/json"}, timeout=10)
            assert (response.status_code, response.json()["code"]) == (413, 413), response.text
    finally:
        stop(process)


def test_a_request_gunicorn_refuses_is_answered_in_the_apis_json(sqlite_url: str,
                                                                  tmp_path: Path) -> None:
    """Before: a request line or headers past gunicorn's limits, or bytes that are no HTTP,
    were answered with gunicorn's HTML page, where every other error of the API is JSON."""
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = start(environment(sqlite_url, tmp_path, port, workers=1), log)
    base = f"http://127.0.0.1:{port}"
    try:
        serving(f"{base}/health", process, log)
        too_long = requests.get(f"{base}/users", params={"q": "a" * 5000}, timeout=10)
        too_large = requests.get(f"{base}/users", headers={"X-Large": "a" * 9000}, timeout=10)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"NOT HTTP\r\n\r\n")
            head, _, body = b"".join(iter(lambda: conn.recv(4096), b"")).partition(b"\r\n\r\n")
        raw_type = re.search(rb"Content-Type: (\S+)", head)
        for status, content_type, payload in (
                (too_long.status_code, too_long.headers["Content-Type"], too_long.json()),
                (too_large.status_code, too_large.headers["Content-Type"], too_large.json()),
                (int(head.split()[1]), raw_type and raw_type[1].decode(), json.loads(body))):
            assert content_type == "application/json", payload
            assert payload["code"] == status and payload["message"], payload
        assert [too_long.status_code, too_large.status_code, int(head.split()[1])] == [
            414, 431, 400]
    finally:
        stop(process)


def test_connections_left_idle_leave_the_api_answering(sqlite_url: str, tmp_path: Path) -> None:
    """Before: gunicorn's sync workers each waited on the first connection they took until a
    request came or 60 s passed: two left idle (a browser opens such ahead of time) stopped
    the API of `eventpipe up`, whose two workers were then killed (a review's finding)."""
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = start(environment(sqlite_url, tmp_path, port, workers=1), log)
    idle: list[socket.socket] = []
    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        for connection in idle:
            connection.close()
        stop(process)


def test_gunicorns_log_options_keep_their_say(sqlite_url: str, tmp_path: Path) -> None:
    """Before, once its lines were JSON: `--access-logfile` was left empty, and with
    LOG_LEVEL=WARNING no request had a record anywhere (a review's finding). The lines keep
    the project's form wherever gunicorn's options send them."""
    port = free_port()
    log, access = tmp_path / "gunicorn.log", tmp_path / "access.log"
    env = {**environment(sqlite_url, tmp_path, port, workers=1), "LOG_LEVEL": "WARNING"}
    process = start(env, log, "--access-logfile", str(access))
    try:
        serving(f"http://127.0.0.1:{port}/health", process, log)
        assert requests.get(f"http://127.0.0.1:{port}/users/nobody", timeout=5).status_code == 404
    finally:
        stop(process)
    records = [json.loads(line) for line in access.read_text().splitlines()]
    assert [(r["path"], r["status"]) for r in records if r["path"] == "/users/nobody"] == [
        ("/users/nobody", 404)]
    assert all(json.loads(line)["role"] == "web" for line in log.read_text().splitlines())

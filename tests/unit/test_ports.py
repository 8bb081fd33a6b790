"""Ports a process is to listen on, checked before it starts: IPv4 and IPv6 alike; under
`eventpipe up`, each port its own, and only the API's own answer on WEB_PORT taken as the API."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eventpipe.ports import ensure_free
from eventpipe.settings import Settings, SettingsError
from eventpipe.sqlite_file import path_of
from launcher import stack
from launcher.embedded import free_port


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_a_port_is_free_or_named_as_taken_on_either_family(family: int, host: str) -> None:
    with socket.create_server((host, 0), family=family) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError) as caught:
            ensure_free("WEB_PORT", port, host)
        assert str(caught.value).startswith(f"WEB_PORT={port}: ")
        assert str(caught.value).endswith("another process listens there; set WEB_PORT to a "
                                          "free port")
    ensure_free("WEB_PORT", port, host)  # closed: free again
    ensure_free("WEB_PORT", 0, host)  # any


def test_a_host_that_is_no_address_of_this_machine_is_the_hosts_setting() -> None:
    with pytest.raises(SettingsError, match=r"^WEB_HOST=192\.0\.2\.1: .*no address of this "
                                            r"machine"):
        ensure_free("WEB_PORT", 8000, "192.0.2.1", host_setting="WEB_HOST")


@pytest.mark.parametrize("host", ["nonexistent.invalid", "999.1.1.1"])
def test_a_host_that_names_no_address_is_the_hosts_setting(host: str) -> None:
    # socket.create_server gives the resolver's error as a plain OSError, its errno an EAI_*
    # code. (Before: blamed on WEB_PORT.)
    with pytest.raises(SettingsError, match=rf"^WEB_HOST={re.escape(host)}: .*no address of "
                                            r"this machine"):
        ensure_free("WEB_PORT", free_port(), host, host_setting="WEB_HOST")


def test_up_names_two_of_its_port_settings_that_are_equal(tmp_path: Path) -> None:
    # Each free on its own: the second process to start would find it taken by the first.
    shared, flower, worker = free_port(), free_port(), free_port()
    settings = Settings(web_port=shared, flower_port=flower, bridge_metrics_port=shared,
                        worker_metrics_port=worker)
    with pytest.raises(SettingsError, match=rf"^WEB_PORT={shared} and BRIDGE_METRICS_PORT="
                                            rf"{shared}: .*give each its own port$"):
        stack.Stack(settings, frozenset(), tmp_path).check_ports()


@pytest.mark.parametrize("directory", ["plain", "a%20b", "q?x"])
def test_ups_export_line_names_its_database_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, directory: str,
) -> None:
    """The embedded SQLite file, by its absolute path escaped as a URL (a review's finding:
    a `?` or `%` in a directory's name named another file)."""
    (tmp_path / directory).mkdir()
    monkeypatch.chdir(tmp_path / directory)
    exported = stack.Stack(Settings(), frozenset(), tmp_path).exports()
    assert path_of(exported["DATABASE_URL"]) == tmp_path / directory / "var" / "eventpipe.db"
    given = stack.Stack(Settings(), frozenset({"DATABASE_URL", "REDIS_URL"}), tmp_path)
    assert sorted(given.exports()) == ["CELERY_BROKER_URL", "KAFKA_BOOTSTRAP_SERVERS"]


@contextmanager
def _answering(body: bytes) -> Iterator[int]:
    """An HTTP server on a free port that answers 200 and `body` to every path."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _on_one_port(port: int) -> Settings:
    return Settings(web_host="127.0.0.1", web_port=port, flower_port=port,
                    bridge_metrics_port=port, worker_metrics_port=port)


def test_another_server_on_the_apis_port_is_not_the_api_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "READY_TIMEOUT_S", 0.3)
    # What a Prometheus metrics server (the bridge's, the workers') answers to any path.
    with _answering(b"# HELP python_info Python platform information\n") as port, \
            pytest.raises(stack.ChildFailed,
                          match=rf"^web API not ready at http://127\.0\.0\.1:{port}/ready "):
        stack.Stack(_on_one_port(port), frozenset(), tmp_path).wait_ready()


def test_the_apis_own_ready_answer_is_ready(tmp_path: Path) -> None:
    ready = json.dumps({"ready": True, "failed": [], "checks": []}).encode()
    with _answering(ready) as port:
        stack.Stack(_on_one_port(port), frozenset(), tmp_path).wait_ready()

"""gunicorn configuration for the read API: `gunicorn -c web/gunicorn_conf.py web.wsgi:app`.

Binds to WEB_HOST:WEB_PORT from the settings. Workers are separate processes, so Prometheus
metrics go through prometheus_client's multiprocess mode: each worker writes its samples to
files in PROMETHEUS_MULTIPROC_DIR and `/metrics`, whichever worker serves it, aggregates
them all. The worker count comes from WEB_WORKERS (or `-w N` on the command line).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from gunicorn import util  # type: ignore[import-untyped]
from gunicorn.config import Config  # type: ignore[import-untyped]
from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from eventpipe import logs
from eventpipe.database import require_database
from eventpipe.ports import ensure_free
from eventpipe.settings import Settings, settings_or_exit

_PRIVATE_DIR = "eventpipe-web-metrics-"  # the prefix of a run's own directory, when given none
# The names prometheus_client gives its files in multiprocess mode (`values.py`): the metric's
# type, a gauge's mode, the process id.
_METRIC_FILE = re.compile(r"(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|"
                          r"mostrecent))_\d+\.db")


class JsonLogs(Logger):  # type: ignore[misc]
    """gunicorn's records in the form of every other process's (`eventpipe.logs`): JSON
    lines, or text at a terminal. gunicorn's own forms are plain text a collector reading
    JSON cannot parse: its records (starting, a worker booted or timed out, a request refused
    before the app saw it) and an access line per request, here a record with the request's
    fields: method, path, query, status, bytes, durationMs, remote, userAgent. Where they go
    and at what level stay gunicorn's to say (`--access-logfile`, `--error-logfile`,
    `--log-level`; the access records at INFO whatever LOG_LEVEL, which is the app's). (Here,
    not in the `web` package, whose import would load prometheus_client before its directory
    is set, below.)"""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # its handlers, as its options say; run again by a reload
        logs.configure("web", _settings.log_level, _settings.log_format)  # the app's records
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(logs.formatter("web", _settings.log_format,
                                                    getattr(handler, "stream", None)))

    def access(self, resp: Any, req: Any, environ: dict[str, Any],
               request_time: timedelta) -> None:
        if not self.access_log.handlers and not self.access_log.propagate:
            return  # no access log asked for (gunicorn's `access_log_enabled`, not in 22-23)
        status = str(resp.status).split(None, 1)[0]
        line: dict[str, Any] = {
            "method": environ.get("REQUEST_METHOD"),
            # A request gunicorn refused before the app has no PATH_INFO.
            "path": environ.get("PATH_INFO") or environ.get("RAW_URI", "").split("?")[0] or None,
            "status": int(status) if status.isdigit() else status,
            "bytes": getattr(resp, "sent", None) or getattr(resp, "response_length", None),
            "durationMs": round(request_time.total_seconds() * 1000, 1),
            "remote": environ.get("REMOTE_ADDR"),
        }
        if query := environ.get("QUERY_STRING"):
            line["query"] = query
        if agent := environ.get("HTTP_USER_AGENT"):
            line["userAgent"] = agent
        self.access_log.info("request", extra=line)


def refused_in_json(sock: Any, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it refuses before the app sees it (a request line or
    headers past its limits, bytes that are no HTTP), in the body every other error of the
    API has (`web.errors`: code, status, message, errors), not gunicorn's HTML page. gunicorn
    has no hook for these answers: its workers write them through this one function of its
    `util` module, which is replaced below, before the workers are forked."""
    body = json.dumps({"code": status, "status": reason, "message": message,
                       "errors": {}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = refused_in_json


def _binds_elsewhere() -> bool:
    """Whether WEB_HOST:WEB_PORT is not where this server listens: a bind (or a shared port)
    given on the command line replaces it, and a configuration loaded again, by a HUP or a
    master started by USR2 (gunicorn's arbiter set SERVER_SOFTWARE), or under systemd's socket
    activation, finds its own listener there."""
    if {"SERVER_SOFTWARE", "GUNICORN_FD", "LISTEN_FDS"} & os.environ.keys():
        return True
    given = [*shlex.split(os.environ.get("GUNICORN_CMD_ARGS", "")), *sys.argv[1:]]
    args, _ = Config().parser().parse_known_args(given)
    return bool(args.bind or args.reuse_port)


def _check(settings: Settings) -> None:
    # A database file that is not there is said here, once, not as each worker fails to boot;
    # a port another process holds in one line, not as gunicorn's retries over 5 s.
    require_database(settings)
    if not _binds_elsewhere():
        ensure_free("WEB_PORT", settings.web_port, settings.web_host, host_setting="WEB_HOST")


_settings = settings_or_exit("gunicorn", check=_check)

# An IPv6 address in brackets, as gunicorn reads a bind ("::1:8000" is no port of "::1").
_host = _settings.web_host
bind = f"[{_host}]:{_settings.web_port}" if ":" in _host else f"{_host}:{_settings.web_port}"
# Reads wait on the database, not the CPU: a few processes per core keep the cores busy.
workers = _settings.web_workers or 2 * (os.cpu_count() or 1) + 1
# Each worker must build its own engine and Redis pool after the fork, never share them.
preload_app = False
# A replay by filter takes entries for 30 s, then its last chunk may wait 10 s for Kafka
# (`web.resources.dlq.routes`): leave room above that before a worker is killed.
timeout = 60
# Threads, which poll their connections: a sync worker waits on the first it takes until a
# request comes, so connections a browser opens ahead of time and leaves idle would hold
# every worker for `timeout`.
worker_class = "gthread"
threads = 4
accesslog = "-"
logger_class = JsonLogs
# Nothing here uses gunicornc, and servers on one host would all claim its default socket.
control_socket_disable = True

# prometheus_client picks its multiprocess mode from this variable when first imported, which
# happens in the workers after the fork; it is the library's own setting, not the project's.
# Without one given, each server run gets a private directory: only when this file is loaded
# by its path (`-c web/gunicorn_conf.py`). Loaded as `python:web.gunicorn_conf`, the `web`
# package, and prometheus_client with it, is imported before this runs: the variable must be
# set already (the image's command and docker-compose.yml set it).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    if "prometheus_client" in sys.modules:  # too late: each worker would count on its own
        print("gunicorn: loaded as python:web.gunicorn_conf, the configuration needs "
              "PROMETHEUS_MULTIPROC_DIR set to a directory (or load it by its path: "
              "-c web/gunicorn_conf.py)", file=sys.stderr)
        raise SystemExit(2)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_PRIVATE_DIR)
_metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def on_starting(_server: Any) -> None:
    """Start without the metric files of a previous run, which would still be counted."""
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    # Only prometheus_client's own files: the directory may have been given by an operator,
    # and hold a SQLite database (var/ holds the embedded one).
    for leftover in _metrics_dir.glob("*.db"):
        if _METRIC_FILE.fullmatch(leftover.name):
            leftover.unlink()


def post_fork(_server: Any, _worker: Any) -> None:
    """Import the API from this package, whatever the working directory holds. gunicorn puts
    that directory first on the path, and the worker imports `web.wsgi` next: another
    project's `web` there (`eventpipe up` run from its root) would take this one's place. It
    leaves the path then, unless it is where this package is found from (a checkout run
    without installing)."""
    here = Path(__file__).resolve().parent
    cwd = Path.cwd()
    shadows = (cwd / "web").exists() or (cwd / "web.py").exists()
    if shadows and (cwd / "web").resolve() != here:
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != cwd]


def child_exit(_server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges; its counters and histograms still count."""
    from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


def on_exit(_server: Any) -> None:
    """Remove the private directory of a run given none (known by its name: a reload, which
    runs this file again, finds the variable set)."""
    if (_metrics_dir.parent == Path(tempfile.gettempdir())
            and _metrics_dir.name.startswith(_PRIVATE_DIR)):
        shutil.rmtree(_metrics_dir, ignore_errors=True)

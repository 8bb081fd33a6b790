"""`eventpipe up`: the whole pipeline on one machine, in the foreground.

Embedded defaults where nothing is configured — Tansu for Kafka unless
KAFKA_BOOTSTRAP_SERVERS is set, a SQLite file unless DATABASE_URL is set, a redis-server
unless REDIS_URL or CELERY_BROKER_URL is set — then the bridge, the workers for every
partition, the web API (with the console) and Flower as child processes. Without a
DLQ_API_TOKEN, one is made for the run and printed, so the console's DLQ view works. It waits
until everything is ready, prints where to look, and on Ctrl-C or SIGTERM stops the children
in order (the bridge first, so it commits what is done; the brokers last) so that no process
is left behind.

Once ready it supervises them: a child that exits is started again, as `eventpipe worker`
starts its processes again (a bridge or a worker killed costs duplicates, nothing else); so is
the embedded redis-server, empty on its port, as a Redis that lost its data, which the
pipeline rebuilds what it needs from. The embedded Kafka keeps its events in memory: if it
exits they are gone, and the run ends saying so.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis
from sqlalchemy.engine import make_url

from eventpipe import redis_clients
from eventpipe.broker_queues import Unanswered, is_amqp, purge_amqp
from eventpipe.database import make_engine, redacted
from eventpipe.errors import (
    NO_REDIS_DATABASE,
    ServiceUnanswered,
    no_redis_database,
    redis_database,
    redis_said,
)
from eventpipe.kafka import broker_reachable, ensure_topic
from eventpipe.migrations import SchemaAhead, create_database_if_missing, upgrade
from eventpipe.ports import ensure_free
from eventpipe.queues import drop_unacked, queue_depths, queue_name
from eventpipe.settings import REDIS_SCHEMES, Settings, SettingsError, child_environment
from eventpipe.sqlite_file import path_of
from eventpipe.verify import holds_events
from launcher.children import die_with_parent, restart_delay, terminate
from launcher.embedded import (
    EmbeddedProcess,
    EmbeddedServiceError,
    redis_answers,
    start_kafka,
    start_redis,
)
from launcher.workers import tasks_main

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 90.0
_PROBE_BODY_LIMIT = 1 << 16
# Stopped in this order: the bridge commits first, the API and Flower go last.
_STOP_ORDER = ("bridge", "worker", "web", "flower")
# The URLs an embedded redis-server stands in for, and the database number each gets.
_EMBEDDED_REDIS = {"REDIS_URL": 0, "CELERY_BROKER_URL": 1}


def _stop_timeouts_s(settings: Settings) -> dict[str, float]:
    """How long each child may take to stop before it is killed: the bridge and the workers
    drain for SHUTDOWN_DRAIN_TIMEOUT_S (the worker host then waits for its processes), the
    API for gunicorn's graceful 30 s (a replay waits on Kafka)."""
    drain = settings.shutdown_drain_timeout_s
    return {"bridge": drain + 10, "worker": drain + 25, "web": 35.0, "flower": 10.0}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


class ChildFailed(RuntimeError):
    """A process `up` started exited, or never became ready; the message names its log."""


@dataclass
class Stack:
    settings: Settings
    provided: frozenset[str]
    run_dir: Path
    say: Callable[[str], None] = print
    services: list[EmbeddedProcess] = field(default_factory=list)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: bool = False
    # Each child's command and environment, when it was last started, and its last wait.
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    restart_delays: dict[str, float] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)  # when each exited child starts again

    # -- the parts ---------------------------------------------------------------------------

    def check_ports(self) -> None:
        """The ports the children will listen on, free before anything starts (a child that
        cannot listen would exit and leave the reason in its log)."""
        s = self.settings
        named: dict[int, str] = {}
        for setting, port in (("WEB_PORT", s.web_port), ("FLOWER_PORT", s.flower_port),
                              ("BRIDGE_METRICS_PORT", s.bridge_metrics_port),
                              ("WORKER_METRICS_PORT", s.worker_metrics_port)):
            if port == 0:  # `up` probes and shows each one: it must know where it is
                raise SettingsError(f"{setting}=0: `eventpipe up` needs a port it can name; "
                                    "set a free one")
            # Free for each alone, yet the child that starts second could not listen, and
            # the probe of its port would be answered by the first.
            if port in named:
                raise SettingsError(f"{named[port]}={port} and {setting}={port}: `eventpipe up` "
                                    "starts a process listening on each; give each its own "
                                    "port")
            named[port] = setting
        ensure_free("WEB_PORT", s.web_port, s.web_host, host_setting="WEB_HOST")
        ensure_free("FLOWER_PORT", s.flower_port, "127.0.0.1")
        for setting, port in (("BRIDGE_METRICS_PORT", s.bridge_metrics_port),
                              ("WORKER_METRICS_PORT", s.worker_metrics_port)):
            ensure_free(setting, port, s.metrics_host, host_setting="METRICS_HOST")

    def start_brokers(self) -> None:
        overrides: dict[str, Any] = {}
        if "KAFKA_BOOTSTRAP_SERVERS" not in self.provided:
            log_path = self._log_of("kafka")
            try:
                kafka = start_kafka(_default_port(self.settings.kafka_bootstrap_servers),
                                    log_path=log_path)
            except EmbeddedServiceError:  # the usual port is taken: any free one will do
                kafka = start_kafka(None, log_path=log_path)
            self.services.append(kafka)
            overrides["kafka_bootstrap_servers"] = kafka.bootstrap
            self.say(f"  kafka     embedded Tansu on {kafka.bootstrap}")
        else:
            if not broker_reachable(self.settings, timeout_s=5):
                raise ServiceUnanswered(
                    f"no Kafka broker answers at KAFKA_BOOTSTRAP_SERVERS="
                    f"{self.settings.kafka_bootstrap_servers}; start it, or unset the variable "
                    "to run an embedded one")
            self.say(f"  kafka     {self.settings.kafka_bootstrap_servers}")
        overrides.update(self._redis())
        if "DLQ_API_TOKEN" not in self.provided:
            # The console's dead-letter view needs a token: one for this run, printed below.
            overrides["dlq_api_token"] = secrets.token_urlsafe(18)
        self.settings = replace(self.settings, **overrides)
        if "kafka_bootstrap_servers" in overrides:
            self._drop_stale_tasks()

    def _redis(self) -> dict[str, str]:
        """A redis-server of its own for REDIS_URL and CELERY_BROKER_URL, but for the ones
        set. A Redis answering at a default URL may be another pipeline's (a docker-compose
        stack publishes its Redis on 6379): the two would take each other's tasks."""
        for name, url in (("REDIS_URL", self.settings.redis_url),
                          ("CELERY_BROKER_URL", self.settings.celery_broker_url)):
            if name in self.provided and url.split("://", 1)[0] in REDIS_SCHEMES \
                    and not _redis_answers(name, url):
                raise ServiceUnanswered(f"no Redis answers at {name}={redacted(url)}; start "
                                        f"it, or unset {name} to run an embedded one")
        if "REDIS_URL" in self.provided:
            self.say(f"  redis     {redacted(self.settings.redis_url)}")
        unset = {name: database for name, database in _EMBEDDED_REDIS.items()
                 if name not in self.provided}
        if not unset:
            return {}
        server = start_redis()
        self.services.append(server)
        self.say(f"  redis     embedded redis-server on {server.address}"
                 + ("" if len(unset) == len(_EMBEDDED_REDIS) else f" for {', '.join(unset)}"))
        return {name.lower(): f"{server.url}/{database}" for name, database in unset.items()}

    def _drop_stale_tasks(self) -> None:
        """The embedded Kafka starts empty, so tasks an earlier run left carry messages of a
        topic that is gone: drop them before a worker applies them and marks their offsets
        done in the new topic's ledger (offsets that name other messages now). Those queued,
        and those kombu holds as delivered and not acknowledged (a worker killed with them,
        retries it held), which it hands out again later."""
        partitions = range(self.settings.kafka_partitions)
        broker = self.settings.celery_broker_url
        if broker.split("://", 1)[0] not in REDIS_SCHEMES and not is_amqp(broker):
            self.say("            tasks an earlier run may have left in CELERY_BROKER_URL are "
                     "not dropped: purge its events.p* queues, the topic being new")
            return
        if is_amqp(broker):
            try:
                dropped = purge_amqp(self.settings, partitions)  # RabbitMQ
            except Unanswered as exc:
                raise ServiceUnanswered(
                    f"no broker answers at CELERY_BROKER_URL="
                    f"{redacted(self.settings.celery_broker_url)}: {exc}; start it, or unset "
                    "the variable to run an embedded Redis") from exc
            if dropped:
                self.say(f"            dropped {dropped} task(s) an earlier run left")
            return
        queues = [queue_name(p) for p in partitions]
        client = redis_clients.operator(self.settings.celery_broker_url)
        try:
            dropped = sum(queue_depths(client, partitions).values())
            if dropped:
                client.delete(*queues)
            dropped += drop_unacked(client, queues)
            if dropped:
                self.say(f"            dropped {dropped} task(s) an earlier run left")
        finally:
            client.close()

    def prepare_database(self) -> None:
        create_database_if_missing(self.settings.database_url)
        try:
            upgrade(self.settings.database_url)
        except SchemaAhead as exc:  # a newer release's database: nothing this one may do
            raise SettingsError(f"DATABASE_URL={redacted(self.settings.database_url)}: the "
                                f"database {exc}") from None
        self.say(f"  database  {redacted(self.settings.database_url)} (migrated)")
        if "KAFKA_BOOTSTRAP_SERVERS" not in self.provided and _holds_events(self.settings):
            self.say("            it holds events of earlier runs, which the new embedded Kafka "
                     "does not (`eventpipe verify` reports them); delete it to start afresh")
        ensure_topic(self.settings)

    def start_children(self) -> None:
        env = child_environment(_environment_of(self.settings))
        # Two, or fewer on one core or of a topic of one partition (a process more would
        # serve none: `eventpipe worker` refuses it).
        processes = str(max(1, min(2, os.cpu_count() or 1, self.settings.kafka_partitions)))
        commands = {
            "bridge": [_eventpipe(), "bridge"],
            # Processes of the worker pool: more hosts started by hand join it.
            "worker": [_eventpipe(), "worker", "--processes", processes],
            "web": [_eventpipe(), "web"],
            "flower": [sys.executable, tasks_main(), "--quiet", "flower",
                       f"--port={self.settings.flower_port}", "--address=127.0.0.1"],
        }
        # As many API processes as worker processes: gunicorn's default (2 × cores + 1) is
        # for a host that serves nothing else.
        own_env = {"web": {} if "WEB_WORKERS" in self.provided else {"WEB_WORKERS": processes}}
        for name, command in commands.items():
            self.commands[name] = command, {**env, **own_env.get(name, {})}
            self._start(name)

    def _start(self, name: str) -> None:
        command, env = self.commands[name]
        output = self._log_of(name).open("ab")
        self.children[name] = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            # A session of their own: Ctrl-C reaches us only, and we stop them in order.
            start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        output.close()
        self.started_at[name] = time.monotonic()

    def _log_of(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def wait_ready(self) -> None:
        s = self.settings
        metrics = _in_url(s.metrics_host)
        probes = {
            "web API": (f"http://{_in_url(s.web_host)}:{s.web_port}/ready", _api_ready),
            "bridge metrics": (f"http://{metrics}:{s.bridge_metrics_port}/metrics", _any),
            "worker metrics": (f"http://{metrics}:{s.worker_metrics_port}/metrics", _any),
            "Flower": (f"http://127.0.0.1:{s.flower_port}/healthcheck", _any),
        }
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, (url, answered) in probes.items():
            while not _http_ok(url, answered):
                self.check_children()
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{name} not ready at {url} after {READY_TIMEOUT_S:.0f}s"
                                      f"; see the logs in {self.run_dir}")
                self._pause(0.25)

    def check_children(self) -> None:
        if self.stopping:
            raise Interrupted
        for name, child in self.children.items():
            if child.poll() is not None:
                raise ChildFailed(f"{name} exited with {child.returncode}; "
                                  f"see {self._log_of(name)}")

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(min(0.05, seconds))

    def exports(self) -> dict[str, str]:
        """The settings of the brokers this run started, which a command run in another
        shell (`eventpipe status`, `dlq`, `verify`, `trace`) needs to reach this pipeline
        rather than the defaults' (another Redis may answer on 6379)."""
        s = self.settings
        exports = {name: value for name, value in (
            ("KAFKA_BOOTSTRAP_SERVERS", s.kafka_bootstrap_servers), ("REDIS_URL", s.redis_url),
            ("CELERY_BROKER_URL", s.celery_broker_url)) if name not in self.provided}
        sqlite = path_of(s.database_url)
        if "DATABASE_URL" not in self.provided and sqlite is not None:
            # The embedded file, named whatever the other shell's working directory (escaped
            # as a URL: a `?` or `%` in a directory's name).
            exports["DATABASE_URL"] = make_url(s.database_url).set(
                database=str(sqlite.resolve())).render_as_string(hide_password=False)
        return exports

    def urls(self) -> dict[str, str]:
        s = self.settings
        api = f"http://{_in_url(s.web_host)}:{s.web_port}"
        metrics = _in_url(s.metrics_host)
        token = ("" if "DLQ_API_TOKEN" in self.provided
                 else f" (DLQ token for this run: {s.dlq_api_token})")
        return {
            "console": f"{api}/console{token}",
            "API": api,
            "API docs": f"{api}/docs",
            "OpenAPI": f"{api}/openapi.json",
            "API metrics": f"{api}/metrics",
            "Flower": f"http://127.0.0.1:{s.flower_port}",
            "bridge metrics": f"http://{metrics}:{s.bridge_metrics_port}/metrics",
            "worker metrics": f"http://{metrics}:{s.worker_metrics_port}/metrics",
            "logs": str(self.run_dir),
        }

    def stop(self) -> None:
        for name in _STOP_ORDER:
            child = self.children.get(name)
            if child is not None:
                terminate(child, _stop_timeouts_s(self.settings)[name])
        for service in reversed(self.services):
            service.stop()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def serve_until_stopped(self) -> None:
        while not self.stopping:
            self._check_services()
            for name, child in list(self.children.items()):
                if child.poll() is not None and not self.stopping:
                    self._start_again(name, child.returncode)
            self._pause(0.5)

    def _start_again(self, name: str, code: int) -> None:
        """Start again a child that exited, once its wait is over (the others are looked
        after meanwhile)."""
        due = self.due.get(name)
        if due is None:
            delay = self.restart_delays[name] = restart_delay(
                time.monotonic() - self.started_at[name], self.restart_delays.get(name, 0))
            when = f" in {delay:.0f}s" if delay else ""
            print(f"eventpipe up: {name} exited with {code}; started again{when} "
                  f"(see {self._log_of(name)})", file=sys.stderr)
            due = self.due[name] = time.monotonic() + delay
        if time.monotonic() >= due:
            del self.due[name]
            self._start(name)

    def _check_services(self) -> None:
        for index, service in enumerate(self.services):
            code = service.process.poll()
            if code is None:
                continue
            if service.name != "redis":
                raise ChildFailed(f"the embedded Kafka (Tansu) exited with {code}: the events "
                                  f"it held in memory are gone; see {self._log_of(service.name)}")
            service.stop()
            print(f"eventpipe up: the embedded redis-server exited with {code}; started again, "
                  "empty, on its port", file=sys.stderr)
            self.services[index] = start_redis(service.port)


def run(settings: Settings, provided: frozenset[str], demo: bool) -> int:
    run_dir = Path("var") / "run"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file named var in the way, a read-only working directory
        raise SettingsError(f"cannot create the directory {run_dir.absolute()} for the logs of "
                            f"`eventpipe up`: {exc.strerror or exc}; run it from a writable "
                            "directory") from None
    held = _hold(run_dir)
    if isinstance(held, int):
        pid = f" (pid {held})" if held else ""  # 0: it has not written its pid yet
        raise SettingsError(f"another `eventpipe up`{pid} runs in this directory, with its "
                            f"database and logs in {run_dir.parent.absolute()}: stop it, or "
                            "start this one from another directory")
    stack = Stack(settings, provided, run_dir)
    stack.install_signal_handlers()
    if isinstance(sys.stdout, io.TextIOWrapper):  # its lines as they come, piped or not
        sys.stdout.reconfigure(line_buffering=True)
    stack.check_ports()  # a port taken is one line: nothing started, nothing to stop
    print("starting the pipeline:")
    try:
        stack.start_brokers()
        stack.prepare_database()
        stack.start_children()
        stack.wait_ready()
        print("ready:")
        for name, url in stack.urls().items():
            print(f"  {name:15s} {url}")
        reach = "".join(f"{name}={shlex.quote(value)} " for name, value in stack.exports().items())
        if reach:
            print("the commands reach this pipeline from another shell with:\n"
                  f"  export {reach.rstrip()}")
        if demo:
            from launcher.demo import run_demo

            run_demo(stack.settings, stack.check_children, reach)
        print("running; Ctrl-C stops everything")
        stack.serve_until_stopped()
        return 0
    except Interrupted:
        return 0
    except (ChildFailed, EmbeddedServiceError) as exc:  # its log, or the line, says the rest
        print(f"eventpipe up: {exc}", file=sys.stderr)
        return 1
    finally:
        # Anything else goes on once what started is stopped, and is said as every command
        # says it (`cli.main`): a service that does not answer or a bad setting in one line,
        # a bug with its traceback.
        print("stopping…")
        stack.stop()
        print("stopped")


def _hold(run_dir: Path) -> IO[str] | int:
    """The run's lock on its directory, held as long as this process lives (the kernel lets
    go of it however the process ends); or the pid of the run that holds it. Two runs in one
    directory would write one SQLite read model from two Kafkas, and the same logs."""
    lock = (run_dir / "up.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        return int(holder) if holder.isdigit() else 0
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _holds_events(settings: Settings) -> bool:
    engine = make_engine(settings)
    try:
        return holds_events(engine)
    finally:
        engine.dispose()


def _environment_of(settings: Settings) -> dict[str, str]:
    """Every setting as its environment variable, so the children see what `up` decided."""
    return {f.metadata["env"]: str(getattr(settings, f.name))
            for f in dataclasses.fields(settings)}


def _in_url(host: str) -> str:
    """A host as a URL names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _default_port(bootstrap: str) -> int | None:
    _, _, port = bootstrap.split(",")[0].rpartition(":")
    return int(port) if port.isdigit() else None


def _http_ok(url: str, answered: Callable[[bytes], bool]) -> bool:
    """Whether `url` answers 200 with a body `answered` takes."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            # Bounded: the answers probed are short, and what answers may be another server.
            return response.status == 200 and answered(response.read(_PROBE_BODY_LIMIT))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _api_ready(body: bytes) -> bool:
    """The API's own readiness, `{"ready": true, ...}`: another server on WEB_PORT may answer
    200 to /ready too (a Prometheus metrics server answers any path)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("ready") is True


def _any(_body: bytes) -> bool:
    return True


def _eventpipe() -> str:
    return str(Path(sys.executable).with_name("eventpipe"))


def _redis_answers(name: str, url: str) -> bool:
    """Whether the Redis the setting `name` names answers PING; what it answers instead is
    said naming the setting: a database it does not have is a bad setting."""
    try:
        return redis_answers(url)
    except redis.ResponseError as exc:
        if no_redis_database(exc):
            raise SettingsError(f"{name}={redacted(url)}: " + NO_REDIS_DATABASE.format(
                number=redis_database(url))) from None
        raise ServiceUnanswered(f"Redis at {name}={redacted(url)} answers PING with an "
                                f"error: {redis_said(exc)}") from None

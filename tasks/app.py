"""The Celery app of the workers: `celery -A tasks worker`.

The task is a thin wrapper over `tasks.processing.Processor`: it decodes the payload, runs the
processor under the task time limit, sends what must wait (a message retried alone) back to
the partition's queue with a countdown, and turns a failure of the world into Celery's own
retry of the rest of the batch — which Flower shows as RETRY. Flower shows each task as where
its messages are (`events p3 offsets 100–599, 500 events`), never their content.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from types import FrameType
from typing import Any

import redis
from celery import Task
from celery.signals import (
    celeryd_init,
    setup_logging,
    task_revoked,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from prometheus_client import start_http_server
from sqlalchemy.exc import SQLAlchemyError

from eventpipe import logs, metrics, redis_clients, sqlite_file
from eventpipe.database import make_engine, redacted, require_database
from eventpipe.dlq.projection import Fetch
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.errors import REDIS_UNAVAILABLE, DatabaseUnresponsive
from eventpipe.failures import describe
from eventpipe.kafka import MessageReader
from eventpipe.migrations import schema_behind
from eventpipe.offset_ledger import OffsetLedger
from eventpipe.ports import ensure_free
from eventpipe.queues import (
    APPLY_TASK,
    FORGIVE_HEADER,
    GROUP_HEADER,
    TOPIC_ID_HEADER,
    TaskMessage,
    drop_unreadable_unacked,
    make_celery,
    queue_name,
    send_batch,
    task_summary,
)
from eventpipe.settings import REDIS_SCHEMES, SettingsError, settings_or_exit
from eventpipe.status import Board, process_name
from tasks import transport
from tasks.heartbeat import Heartbeat
from tasks.pool import STUCK_MARGIN_S, CeleryQueues, PoolMember, exit_to_start_again
from tasks.processing import Processor, count_retries
from tasks.reconciler import Reconciler

log = logging.getLogger(__name__)

DATABASE_WAIT_S = 2.0

settings = settings_or_exit("celery")


def role(argv: list[str]) -> str:
    """What Celery's command line runs of this app: Flower, a Celery command of it too
    (`celery -A tasks flower`), says so in its records; else a worker. The first of the two
    commands the line names, not an option's value (`worker -n flower`)."""
    return next((arg for arg in argv if arg in ("worker", "flower")), "worker")


ROLE = role(sys.argv[1:])


def flowers_port_free(argv: list[str]) -> None:
    """Exit in one line, not tornado's traceback once Flower starts, if another process holds
    the port Flower is to listen on: its `--port=` (tornado's options are given so), else
    the FLOWER_PORT Flower reads from the environment itself, else its 5555; none on a Unix
    socket. (One set in a `flowerconfig.py` is Flower's to say.)"""
    named = {arg.partition("=")[0].replace("-", "_"): arg.partition("=")[2]
             for arg in argv if "=" in arg}
    if named.get("__unix_socket") or os.environ.get("FLOWER_UNIX_SOCKET"):
        return
    setting, port = ("--port", named["__port"]) if "__port" in named \
        else ("FLOWER_PORT", os.environ.get("FLOWER_PORT", "5555"))
    host = named.get("__address", os.environ.get("FLOWER_ADDRESS", ""))
    if not port.isdigit():
        return  # not a port: Flower says so itself
    try:
        ensure_free(setting, int(port), host, host_setting="--address")
    except SettingsError as exc:
        print(f"celery -A tasks flower: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if ROLE == "flower":
    flowers_port_free(sys.argv[1:])
# Configured on import, not only when Celery asks, so what Celery says before it sets up
# logging (e.g. the warning about running as root) is formatted as every other record.
logs.configure(ROLE, settings.log_level, settings.log_format)
app = make_celery(settings, main="tasks")
# `celery -A tasks worker`, as Celery users type it, joins the worker pool (`tasks.pool`): the
# live workers share the partition queues, each consumed by one of them, and run the solo
# pool: one batch at a time, so a partition's batches never interleave. `-Q` names fixed
# queues instead (as `eventpipe worker --partitions` does for each of its processes).
app.conf.task_queues = {queue_name(p): {"exchange": queue_name(p), "routing_key": queue_name(p)}
                        for p in range(settings.kafka_partitions)}
app.conf.worker_pool = "solo"


# Set when the worker was started without queues: it takes what the pool gives it.
_elastic: list[bool] = []


class TaskTimeLimitExceeded(Exception):
    """A batch ran past TASK_TIME_LIMIT_S elsewhere than in the database; treated as an
    unforeseen error of its messages."""


@celeryd_init.connect
def _keep_partitions_in_order(options: dict[str, Any], **_: Any) -> None:
    """Refuse a pool that would apply one partition's batches side by side, or off the main
    thread, where a batch's time limit (an alarm signal) cannot reach it."""
    pool = options.get("pool") or options.get("pool_cls")
    name = getattr(pool, "__module__", str(pool)).rsplit(".", 1)[-1]
    concurrency = options.get("concurrency")
    if name != "solo":
        # threads, gevent, eventlet, prefork (`-P processes`: only `prefork` itself, Celery's
        # default, gives way to the solo pool set here), or a pool of someone's: with no
        # concurrency asked Celery gives them as many as there are cores.
        print(f"celery -A tasks worker: the {name} pool runs batches elsewhere than on the "
              "worker's main thread, where a batch's time limit reaches them, and beyond one "
              "at a time applies a partition's batches side by side, out of order; use the "
              "solo pool (the default here) and more processes: eventpipe worker --processes N",
              file=sys.stderr)
        raise SystemExit(2)
    if concurrency in (None, 0, 1):
        return
    # `-P prefork` (Celery's default, so Celery cannot tell it was asked) gives way to the
    # solo pool set here; a concurrency asked with it would be shown, not had.
    print(f"celery -A tasks worker: the solo pool runs one batch at a time, so a concurrency "
          f"of {concurrency} would be shown, not had; for more, run more processes: "
          "eventpipe worker --processes N", file=sys.stderr)
    raise SystemExit(2)


@celeryd_init.connect
def _drop_what_kombu_cannot_read(**_: Any) -> None:
    """Before the consumer starts, whose transport would hand back the entries of its record
    of unacknowledged tasks and stop at one it cannot read, or at a key of its own held in a
    key of another kind; and which, from now on, reads a Redis broker through
    `tasks.transport`."""
    transport.read_redis_brokers_here()  # whatever the URL: none but a Redis one takes it
    if settings.celery_broker_url.partition("://")[0].lower() not in REDIS_SCHEMES:
        return
    # The first of a failover list (`url1;url2`), as Celery connects first: given the whole,
    # redis-py would leave out its database number. (On another, `tasks.transport` sets
    # kombu's record aside as it meets it.)
    client = redis_clients.operator(settings.celery_broker_url.split(";")[0])
    try:
        transport.set_aside(client, {
            "unacked": "hash", "unacked_index": "zset",
            # Where kombu notes each queue's binding, at each start.
            **{f"_kombu.binding.{queue}": "set" for queue in app.conf.task_queues}})
        dropped = drop_unreadable_unacked(client)
    except redis.RedisError:
        return  # the consumer says it, connecting
    finally:
        client.close()
    if dropped:
        log.error("kombu's record of unacknowledged tasks (`unacked`, CELERY_BROKER_URL) held "
                  "%d entr(ies) that are no task kombu wrote: removed (another program "
                  "writes into the Celery broker's database?)", len(dropped),
                  extra={"tags": dropped[:10]})


@celeryd_init.connect
def _join_the_pool_without_queues(options: dict[str, Any], **_: Any) -> None:
    """No `-Q` (nor `-X`): consume nothing until the pool assigns partitions."""
    if options.get("queues") or options.get("exclude_queues"):
        return
    _elastic.append(True)
    app.amqp.queues.deselect(list(app.amqp.queues))


@celeryd_init.connect
def _wait_for_the_database(**_: Any) -> None:
    """Consume nothing until the database answers with the schema this code needs: every
    batch would fail and wait meanwhile, and in the worker pool this worker would take
    partitions from workers that apply them (DATABASE_URL naming another database, a login
    it refuses, `eventpipe migrate` not run yet). Said once a minute. A SQLite file that is
    not there is waited for, never made here (`require_database`)."""
    said = logs.Repeats(window_s=60.0)
    # Celery's restart at SIGHUP comes later: one meanwhile would end the worker.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        while True:
            why: str | None
            try:
                require_database(settings)
                with _engine().connect() as conn:
                    why = schema_behind(conn)
            except SettingsError as exc:
                why = str(exc)
            except SQLAlchemyError as exc:
                why = f"the database does not answer: {describe(exc)}"
            if why is None:
                return
            if said.let_through("database") is not None:
                log.error("%s (DATABASE_URL=%s): this worker consumes nothing until then", why,
                          redacted(settings.database_url))
            time.sleep(DATABASE_WAIT_S)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)


@setup_logging.connect
def _configure_logs(**_: Any) -> None:
    logs.configure(ROLE, settings.log_level, settings.log_format)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    reconciler().start()
    _consumer.append(sender)
    heartbeat().start()
    if _elastic:
        queues = CeleryQueues(sender, settings.task_time_limit_s + STUCK_MARGIN_S)
        _member.append(PoolMember(settings, queues, process_name()))
        _member[-1].start()
    # Under `eventpipe worker` the parent serves every process's metrics, aggregated
    # (PROMETHEUS_MULTIPROC_DIR is set). A worker started directly serves its own.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        log.warning("metrics not served: METRICS_HOST=%s, WORKER_METRICS_PORT=%d: %s",
                    settings.metrics_host, settings.worker_metrics_port, exc)


class _Stop:
    asked_at: float | None = None  # when the worker was asked to stop (monotonic)
    ended = ""  # why the stop ended a batch, said in its line (the driver's error hides it)

    def left_s(self) -> float | None:
        """How long a batch may still run before the stop ends it; None: no stop asked."""
        if self.asked_at is None:
            return None
        return max(settings.shutdown_drain_timeout_s - (time.monotonic() - self.asked_at),
                   _STOP_CHECK_S)


_stop = _Stop()
_STOP_CHECK_S = 0.1  # how soon a stop due outside the database looks again
_STOP_AGAIN_S = 1.0  # how soon a stop that ended a batch ends it again, if it runs on


@worker_shutting_down.connect
def _end_the_batch_in_time(**_: Any) -> None:
    """Asked to stop (SIGTERM, a warm shutdown), a worker waits for its batch no longer than
    SHUTDOWN_DRAIN_TIMEOUT_S, then ends it as a failure of the world: rolled back, retried,
    not blamed on its events. Waited for to the end (up to TASK_TIME_LIMIT_S on a slow
    database), it was killed by its supervisor or by Docker first, and the kill counted as a
    death of the batch's messages: three such stops on one range dead-lettered good events
    as WorkerCrashed. Runs in Celery's signal handler, on the batch's thread: it only moves
    the batch's alarm (`time_limit`) nearer; a batch that begins after it gets no more."""
    if _stop.asked_at is None:
        _stop.asked_at = time.monotonic()
    remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    left = _stop.left_s()
    if remaining > 0 and left is not None:  # a batch is running
        signal.setitimer(signal.ITIMER_REAL, min(remaining, left))


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    for member in _member:
        member.stop()
    heartbeat().stop()


# Celery's consumer of this process, once it is ready: it knows the queues consumed now.
_consumer: list[Any] = []
_member: list[PoolMember] = []


def _queues_consumed() -> list[str]:
    task_consumer = getattr(_consumer[-1] if _consumer else None, "task_consumer", None)
    if task_consumer is not None:
        return [queue.name for queue in list(task_consumer.queues)]
    return list(app.amqp.queues.consume_from)


# How often a worker looks for the files beside the embedded database (its descriptors, read
# from /proc): the file itself is looked at before every batch and reconciler round.
DATABASE_FILE_EVERY_S = 1.0


@cache
def _stream() -> DeadLetterStream:
    return DeadLetterStream(redis_clients.pipeline(settings.redis_url), settings.dlq_stream,
                            settings.dlq_max_entries, settings.dlq_max_bytes)


@cache
def processor() -> Processor:
    """One per worker process, made on first use (never inherited across a fork)."""
    return Processor(settings, _engine(), _stream(),
                     OffsetLedger(redis_clients.pipeline(settings.redis_url),
                                  settings.kafka_group_id),
                     worker=process_name())


@cache
def heartbeat() -> Heartbeat:
    return Heartbeat(Board(redis_clients.pipeline(settings.redis_url), settings.kafka_group_id),
                     process_name(), _queues_consumed, metrics.RATE.rates)


@cache
def _database_file() -> sqlite_file.Watch:
    """The embedded database's file as this process found it, before it opened it."""
    return sqlite_file.Watch(settings.database_url, beside_every_s=DATABASE_FILE_EVERY_S)


def _writing_where_it_is_read() -> None:
    """Before a batch, and a reconciler round: once the embedded database's file is not the
    one this process found (deleted, another in its place), what it wrote would go where no
    process started since reads, a batch's offsets marked done all the same, and a round's
    dead letters put in the stream. It stops (exit 70), and the process started in its place
    opens the file there now; a batch it did not apply is read again once its lease lapses."""
    if (lost := _database_file().lost()) is not None:
        exit_to_start_again(f"{lost} while this worker ran")


@cache
def _engine() -> Any:
    _database_file()
    return make_engine(settings)


@cache
def reconciler() -> Reconciler:
    return Reconciler(_engine(), _stream(), _kafka_reader,
                      timedelta(seconds=settings.park_timeout_s),
                      before_round=_writing_where_it_is_read)


@cache
def _kafka_reader() -> Fetch:
    # Made, and then used, only by the reconciler's thread: a consumer is not shared.
    return MessageReader(settings).fetch


# The modules a batch waits in while the database has its statement, or its turn to write.
_DATABASE_MODULES = ("psycopg", "pyodbc", "sqlite3", "sqlalchemy.engine", "sqlalchemy.pool",
                     "eventpipe.sqlite_turns")


def _waiting_on_database(frame: FrameType | None) -> bool:
    """Whether the innermost frames are a database driver's (or SQLAlchemy's, around a
    driver written in C): where a batch waits when the server answers nothing."""
    for _ in range(4):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(_DATABASE_MODULES):
            return True
        frame = frame.f_back
    return False


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise in this (the main) thread after `seconds`: the solo pool runs tasks on the main
    thread, where SIGALRM is delivered. In the database it is the world's failure
    (`DatabaseUnresponsive`, retried with backoff, whatever error the driver's cleanup then
    raises over it: `eventpipe.errors.classify`); anywhere else one of the batch's messages'
    (`TaskTimeLimitExceeded`)."""
    active = True  # an alarm that was already on its way as the context ended does nothing

    def expired(_signum: int, frame: FrameType | None) -> None:
        if not active:
            return
        if _stop.asked_at is not None:
            # Ended where it waits, in the database (the connection, cut mid-exchange, is let
            # go as `DatabaseUnresponsive` says), never between a commit and its marks in the
            # ledger: anywhere else the batch is looked at again shortly.
            if not _waiting_on_database(frame):
                signal.setitimer(signal.ITIMER_REAL, _STOP_CHECK_S)
                return
            _stop.ended = (f"the worker is stopping and the batch ran past "
                           f"SHUTDOWN_DRAIN_TIMEOUT_S={settings.shutdown_drain_timeout_s:g} s: "
                           "ended, to be retried")
            # Once more later, should a handler on the way swallow this one (a projection
            # that only logs its failure): the batch must not run on with no limit.
            signal.setitimer(signal.ITIMER_REAL, _STOP_AGAIN_S)
            raise DatabaseUnresponsive(_stop.ended)
        if _waiting_on_database(frame):
            raise DatabaseUnresponsive(f"batch still running after {seconds:g} s, waiting on "
                                       "the database")
        raise TaskTimeLimitExceeded(f"batch still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    left = _stop.left_s()
    signal.setitimer(signal.ITIMER_REAL, seconds if left is None else min(seconds, left))
    try:
        yield
    finally:
        active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_FOREIGN_SAID = logs.Repeats(window_s=60.0)  # per topic


def _not_ours(topic: str, group: str | None, queue: str | None, why: str = "") -> None:
    """A task of another topic, or of the same topic for another consumer group: another
    pipeline was given the same Celery broker, whose queues bear the same names. Applied
    here, its events would enter this pipeline's database. Acknowledged and not applied, it
    is lost to the pipeline that sent it the way a flushed queue's tasks are: its bridge
    reads the events again from Kafka once REDELIVERY_TIMEOUT_S passes (nothing lost there,
    nothing foreign here). So is a task that is no bridge's batch (`why`: sent by hand, or
    by another program): its offsets would enter the ledger as marks of Kafka's. Said once
    a minute per topic, and counted (the topics past the first ten as one)."""
    named = metrics.FOREIGN_TOPICS.of(topic)  # never without bound, whatever is sent
    metrics.FOREIGN_TASKS.labels(named).inc()
    if _FOREIGN_SAID.let_through(named) is None:
        return
    if why:
        log.error("a task on queue %s is no bridge's batch (%s): not applied; whatever sent "
                  "it to this pipeline's Celery broker (CELERY_BROKER_URL) is not a bridge",
                  queue, why, extra={"topic": topic, "group": group, "queue": queue})
        return
    log.error("a task of topic %r (consumer group %r) came on queue %s, but this worker "
              "serves KAFKA_TOPIC=%r, KAFKA_GROUP_ID=%r: another pipeline uses the same Celery "
              "broker; give each pipeline its own Redis database or RabbitMQ virtual host "
              "(CELERY_BROKER_URL). Its tasks are not applied here", topic, group, queue,
              settings.kafka_topic, settings.kafka_group_id,
              extra={"topic": topic, "group": group, "queue": queue})


def _batch(partition: Any, messages: Any) -> list[TaskMessage]:
    """A bridge's batch, as its task carries it; ValueError for anything else."""
    if type(partition) is not int or partition < 0:
        raise ValueError(f"partition {str(partition)[:20]!r}")
    if not isinstance(messages, list) or not messages:
        raise ValueError("no list of messages")
    return [TaskMessage.from_wire(m) for m in messages]


@task_revoked.connect
def _revoked(request: Any = None, **_: Any) -> None:
    """A batch of this pipeline revoked before it ran: its offsets are let go."""
    args = getattr(request, "args", None)
    if getattr(request, "task", None) != APPLY_TASK or not isinstance(args, list | tuple) \
            or len(args) != 3 or args[0] != settings.kafka_topic \
            or request.get(GROUP_HEADER) != settings.kafka_group_id:
        return
    try:
        decoded = _batch(args[1], args[2])
    except ValueError:
        return  # no bridge's batch: nothing of it was leased
    processor().revoked(args[0], args[1], decoded, request.get(TOPIC_ID_HEADER) or "")


@app.task(name=APPLY_TASK, bind=True, max_retries=None)
def apply_events(self: Task, topic: str, partition: int,
                 messages: list[list[Any]]) -> dict[str, int]:
    group = self.request.get(GROUP_HEADER)
    if group is None:  # every bridge names it: sent by hand (`celery call`), or by a program
        _not_ours(topic, group, (self.request.delivery_info or {}).get("routing_key"),
                  why="it names no consumer group")
        return {}
    if topic != settings.kafka_topic or group != settings.kafka_group_id:
        _not_ours(topic, group, (self.request.delivery_info or {}).get("routing_key"))
        return {}
    try:
        decoded = _batch(partition, messages)
    except ValueError as exc:
        _not_ours(topic, group, (self.request.delivery_info or {}).get("routing_key"),
                  why=str(exc))
        return {}
    # A task from a bridge of before the header: its marks go where such a bridge reads.
    topic_id = self.request.get(TOPIC_ID_HEADER) or ""
    _writing_where_it_is_read()
    try:
        with time_limit(settings.task_time_limit_s):
            report = processor().run(topic, partition, decoded, retries=self.request.retries,
                                     forgive=self.request.get(FORGIVE_HEADER) or "",
                                     topic_id=topic_id)
    except REDIS_UNAVAILABLE as exc:
        # The offset ledger did not answer, after its own retries, or refused the write (a
        # replica, its memory bound): the world failed, not the batch, which is retried whole
        # as one whose database failed is (what it committed comes back as duplicates; nothing
        # it did not commit was marked done), forgiving this run, whose record would pass for
        # a death if the retry came before the keeper ends it. Raised on, Celery would log a
        # traceback, drop the batch's planned retries and leave it to the bridge to read
        # again, minutes later once their leases lapsed.
        delay = processor().policy.backoff(self.request.retries + 1)
        count_retries(decoded, "transient")
        log.warning("batch retried in %.1fs: the offset ledger does not answer, or takes no "
                    "writes (REDIS_URL): %s", delay, exc, extra={
                        "topic": topic, "partition": partition, "taskId": self.request.id,
                        "attempt": self.request.retries + 1, "events": len(decoded),
                        "offsetFirst": decoded[0].offset, "offsetLast": decoded[-1].offset})
        raise self.retry(countdown=delay, headers={GROUP_HEADER: settings.kafka_group_id,
                                                   TOPIC_ID_HEADER: topic_id,
                                                   FORGIVE_HEADER: processor().unended},
                         argsrepr=task_summary(topic, partition, decoded)) from exc
    reconciler().poke()
    heartbeat().served(partition)
    transient = None
    for later in report.later:
        if later.transient:
            transient = later
        else:
            send_batch(app, topic, partition, later.messages, group=settings.kafka_group_id,
                       topic_id=topic_id, countdown=later.delay_s)
    log.info("batch done", extra={
        "topic": topic, "partition": partition, "taskId": self.request.id,
        "events": len(decoded), "offsetFirst": decoded[0].offset,
        "offsetLast": decoded[-1].offset, **report.fates})
    if transient is not None:
        log.warning("batch retried in %.1fs: %s", transient.delay_s,
                    _stop.ended or transient.reason, extra={
            "topic": topic, "partition": partition, "taskId": self.request.id,
            "attempt": self.request.retries + 1, "events": len(transient.messages),
            "offsetFirst": transient.messages[0].offset,
            "offsetLast": transient.messages[-1].offset})
        raise self.retry(args=[topic, partition, [m.to_wire() for m in transient.messages]],
                         countdown=transient.delay_s,
                         argsrepr=task_summary(topic, partition, transient.messages))
    return dict(report.fates)

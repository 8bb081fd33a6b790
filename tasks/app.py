"""The Celery app of the workers: `celery -A tasks worker -Q events.p0,events.p1 --pool solo`.

The task is a thin wrapper over `tasks.processing.Processor`: it decodes the payload, runs the
processor, sends the retries it asks for to the same partition queue, and turns a transient
failure into a delayed retry of the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import cache
from typing import Any

import redis
from celery import Task
from celery.signals import setup_logging, worker_ready
from prometheus_client import start_http_server

from eventpipe import logs, metrics
from eventpipe.database import make_engine
from eventpipe.dlq import DeadLetterQueue
from eventpipe.errors import is_transient
from eventpipe.events import peek_identity
from eventpipe.progress import DeliveryLedger
from eventpipe.queues import APPLY_TASK, Message, make_celery, queue_name
from eventpipe.settings import get_settings
from tasks.processing import Processor, Retry
from tasks.retry import backoff_delay

log = logging.getLogger("eventpipe.tasks")

settings = get_settings()
# Configured on import, not only when Celery asks, so what Celery says before it sets up
# logging (e.g. the warning about running as root) is a JSON record too.
logs.configure("worker", settings.log_level)
app = make_celery(settings, main="tasks")


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    logs.configure("worker", settings.log_level)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    # Under `eventpipe worker` the parent serves every process's metrics, aggregated
    # (PROMETHEUS_MULTIPROC_DIR is set). A worker started directly serves its own.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        start_http_server(settings.worker_metrics_port)
    except OSError as exc:
        log.warning("metrics not served: port %d: %s", settings.worker_metrics_port, exc)


@cache
def processor() -> Processor:
    """One per worker process, made on first use (never inherited across a fork)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    return Processor(
        settings, make_engine(settings),
        DeadLetterQueue(client, settings.dlq_stream, settings.dlq_max_entries),
        DeliveryLedger(client),
    )


@app.task(name=APPLY_TASK, bind=True)
def apply_events(
    self: Task, topic: str, partition: int, messages: list[list[Any]], transient_attempts: int = 0
) -> dict[str, int]:
    decoded = [Message.from_wire(m) for m in messages]
    work = processor()
    try:
        report = work.run(topic, partition, decoded)
    except Exception as exc:
        if not is_transient(exc):
            raise
        attempt = transient_attempts + 1
        for message in decoded:
            event_type = metrics.event_type_label(peek_identity(message.value).event_type)
            metrics.RETRIES.labels(event_type, "transient").inc()
        countdown = backoff_delay(attempt, settings.retry_backoff_base_s,
                                  settings.retry_backoff_max_s)
        # The offsets stay leased while the batch waits, so the bridge does not re-read them;
        # if Redis itself is what failed, the bridge re-reads them later instead.
        with contextlib.suppress(redis.RedisError):
            work.ledger.lease(topic, partition, [m.offset for m in decoded],
                              work.clock() + countdown + settings.redelivery_timeout_s)
        log.warning("transient failure, batch retried in %.1fs: %s", countdown, exc, extra={
            "topic": topic, "partition": partition, "taskId": self.request.id,
            "attempt": attempt, "offsetFirst": decoded[0].offset, "offsetLast": decoded[-1].offset,
        })
        _send(topic, partition, messages, countdown, attempt)
        return {"transient_retry": len(messages)}
    for retry in report.retries:
        _send_retry(topic, partition, retry)
    log.info("batch done", extra={
        "topic": topic, "partition": partition, "taskId": self.request.id,
        "events": len(decoded), "offsetFirst": decoded[0].offset,
        "offsetLast": decoded[-1].offset, **report.statuses,
    })
    return dict(report.statuses)


def _send_retry(topic: str, partition: int, retry: Retry) -> None:
    _send(topic, partition, [m.to_wire() for m in retry.messages], retry.countdown, 0)


def _send(
    topic: str, partition: int, messages: list[list[Any]], countdown: float, attempt: int
) -> None:
    app.send_task(APPLY_TASK, args=[topic, partition, messages],
                  kwargs={"transient_attempts": attempt},
                  queue=queue_name(partition), countdown=countdown)

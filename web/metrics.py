"""GET /metrics: the API's request metrics, the pipeline's metrics and the DLQ depth.

prometheus-flask-exporter counts and times requests by route template (`url_rule`, so ids
in paths do not become label values). Its endpoint serves one registry per app in a single
process; with `PROMETHEUS_MULTIPROC_DIR` set (gunicorn, see `web/gunicorn_conf.py`) it reads
every worker's files instead, so whichever worker is scraped reports the whole server.
`dlq_depth` and `dlq_bytes` are read from Redis at each scrape, just before the text is
written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

import redis
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics

from eventpipe.dlq.projection import show_fill
from eventpipe.dlq.stream import DeadLetterStream

log = logging.getLogger(__name__)

PATH = "/metrics"


class _Everything(Collector):
    """The process-wide registry (the pipeline's metrics, process and GC stats) seen from an
    app's own registry. An app gets its own registry so that creating a second app in one
    process (tests, embedders) does not collide on the exporter's metric names."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


def install(app: Flask, dlq: Callable[[], DeadLetterStream]) -> PrometheusMetrics:
    registry = CollectorRegistry()
    registry.register(_Everything(REGISTRY))

    def refresh_dlq_fill(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def scrape(*args: Any, **kwargs: Any) -> Any:
            try:
                show_fill(dlq())
            except redis.RedisError as exc:
                # The scrape still answers: Redis being down must not hide the other metrics.
                log.warning("dlq depth unavailable", extra={"error": f"{type(exc).__name__}"})
            return view(*args, **kwargs)

        return scrape

    return PrometheusMetrics(app, path=PATH, registry=registry, group_by="url_rule",
                             metrics_decorator=refresh_dlq_fill)

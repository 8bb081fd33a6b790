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
import os
from collections.abc import Callable, Collection, Iterable
from functools import wraps
from typing import Any

import redis
from flask import Flask, request
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics

from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.metrics import DLQ_BYTES, DLQ_DEPTH, DLQ_MAX_BYTES, DLQ_MAX_ENTRIES

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


class _Named(Collector):
    """The samples of `source` named in `names` (`name[]`, as Prometheus's federation asks)."""

    def __init__(self, source: CollectorRegistry, names: Collection[str]) -> None:
        self.source = source
        self.names = names

    def collect(self) -> Iterable[Metric]:
        for family in self.source.collect():
            samples = [sample for sample in family.samples if sample.name in self.names]
            if samples:
                named = Metric(family.name, family.documentation, family.type, family.unit)
                named.samples = samples
                yield named


def _named(registry: CollectorRegistry, names: Collection[str]) -> tuple[bytes, str]:
    """The exposition of the series `names`. The exporter's own choice of series fails: under
    gunicorn it registers the workers' files into a registry that takes none (a 500), and in
    one process it finds none of the pipeline's metrics (an empty answer)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # prometheus_client's switch, as the exporter's
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    chosen = CollectorRegistry()
    chosen.register(_Named(registry, names))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return encode(chosen), content_type


def _show_fill(stream: DeadLetterStream) -> None:
    """How full the DLQ is, in entries and in bytes, beside its bounds (for their alert). Only
    the API says it, read at each scrape: a figure a worker set as it last projected would
    stay as it was after the DLQ emptied, and keep the alert on."""
    DLQ_MAX_ENTRIES.set(stream.max_entries)
    DLQ_MAX_BYTES.set(stream.max_bytes)
    depth, size = stream.fill()
    DLQ_DEPTH.set(depth)
    DLQ_BYTES.set(size)


def install(app: Flask, dlq: Callable[[], DeadLetterStream]) -> PrometheusMetrics:
    registry = CollectorRegistry()
    registry.register(_Everything(REGISTRY))

    def refresh_dlq_fill(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def scrape(*args: Any, **kwargs: Any) -> Any:
            try:
                _show_fill(dlq())
            except redis.RedisError as exc:
                # The scrape still answers: Redis being down must not hide the other metrics.
                # The figures stay the last read (the stream is Redis's: it cannot grow
                # meanwhile); NaN would reset every alert over them at each failed read.
                log.warning("dlq depth unavailable", extra={"error": f"{type(exc).__name__}"})
            if names := request.args.getlist("name[]"):
                # As the exporter's own view: a scrape is not the API's traffic.
                request.prom_do_not_track = True  # type: ignore[attr-defined]
                text, content_type = _named(registry, set(names))
                return text, 200, {"Content-Type": content_type}
            return view(*args, **kwargs)

        return scrape

    return PrometheusMetrics(app, path=PATH, registry=registry, group_by="url_rule",
                             metrics_decorator=refresh_dlq_fill)

"""What the API talks to, built once per app (so once per gunicorn worker process).

One SQLAlchemy engine (a reader: its pool is sized by `make_engine` from the settings; the
DLQ's changes take its connections as a writer would, `writer`), one Redis client for the
dead-letter queue and the status board, one with shorter waits for what a metrics scrape
reads, one reader of the Celery broker's queue depths (`eventpipe.broker_queues`, for the
status). A request borrows one database connection,
opened on first use and handed back to the pool when the app context ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g
from redis import Redis
from sqlalchemy import Connection, Engine

from eventpipe import redis_clients
from eventpipe.broker_queues import QueueDepths, depth_reader
from eventpipe.database import make_engine, writes
from eventpipe.dlq.stream import DeadLetterStream
from eventpipe.settings import Settings

EXTENSION = "eventpipe"


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    engine: Engine
    redis: Redis
    scrape: Redis
    broker: QueueDepths | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        client = redis_clients.request(settings.redis_url)
        broker = depth_reader(settings, redis_clients.request)
        # Never made empty: run from elsewhere, the API would serve a database of nothing.
        return cls(settings, make_engine(settings, writer=False, create=False), client,
                   redis_clients.scrape(settings.redis_url), broker)

    @property
    def writer(self) -> Engine:
        """The engine's pool for the DLQ's changes, which read then write (`writes`)."""
        return writes(self.engine)

    def dead_letters(self) -> DeadLetterStream:
        return self._stream(self.redis)

    def scraped_dead_letters(self) -> DeadLetterStream:
        """The DLQ as a metrics scrape reads it."""
        return self._stream(self.scrape)

    def _stream(self, client: Redis) -> DeadLetterStream:
        return DeadLetterStream(client, self.settings.dlq_stream,
                                self.settings.dlq_max_entries, self.settings.dlq_max_bytes)

    def close(self) -> None:
        """Close the pools: for tests and embedders that create apps and throw them away."""
        self.engine.dispose()
        self.redis.close()
        self.scrape.close()
        if self.broker is not None:
            self.broker.close()


def install(app: Flask, services: Services) -> None:
    app.extensions[EXTENSION] = services
    app.teardown_appcontext(_release_connection)


def of(app: Flask) -> Services:
    found: Services = app.extensions[EXTENSION]
    return found


def current() -> Services:
    return of(current_app)


def connection() -> Connection:
    """The request's database connection, opened on first use."""
    if "db" not in g:
        g.db = current().engine.connect()
    conn: Connection = g.db
    return conn


def _release_connection(_exc: BaseException | None) -> None:
    conn: Connection | None = g.pop("db", None)
    if conn is not None:
        # Reads only: closing rolls back the implicit transaction and returns it to the pool.
        conn.close()

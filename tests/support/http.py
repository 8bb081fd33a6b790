"""The API over real HTTP for tests: a threaded server on a free port, and schemathesis runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    """No access log line per generated request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """`app` on a real HTTP server on a free port, in a thread; yields its base URL."""
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True,
                                         request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def fuzz(schema: schemathesis.BaseSchema, base_url: str,
         headers: dict[str, str] | None = None) -> None:
    """Generated requests, valid then invalid: no server error, nothing undocumented.

    `headers` are fixed in every case (so a token is not mutated into a negative case).
    """
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(generation_mode=mode, headers=headers))
        # Derandomized: the same cases on every run, so CI is red only for a real change.
        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=base_url)

        run()

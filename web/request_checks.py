"""What every request must be before a view sees it, each refusal in the API's error shape.

- A method HTTP does not define is a 501, and stays out of the request metrics, whose labels
  would otherwise grow by one per name a client makes up.
- A path that is not UTF-8 is a 400: decoded with replacement characters, `%FF` would be
  looked up as the id "\ufffd" and answered "not found".
- A query parameter given twice is a 422: webargs would take the first and drop the other
  without a word, as unknown parameters are refused for the same reason. Not on `/metrics`,
  which reads `name[]` repeated to choose the series (`web.metrics`).
- A body that is not declared JSON is a 415: webargs would not read it, and the view would
  answer as if none had been sent. One sent chunked past MAX_CONTENT_LENGTH is a 413, as one
  of a stated length.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import flask_smorest
from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

from web.metrics import PATH as METRICS

# The methods of HTTP (RFC 9110, and PATCH).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                           "TRACE", "CONNECT"})


def check() -> None:
    if request.method not in KNOWN_METHODS:
        # prometheus-flask-exporter's flag to skip a request.
        setattr(request, "prom_do_not_track", True)  # noqa: B010
        flask_smorest.abort(501, message=f"no method {request.method[:40]!r} here: use one "
                                         "of those HTTP defines")
    if not _utf8(_raw_path()):
        flask_smorest.abort(400, message="the path is not UTF-8 once its %-escapes are decoded")
    repeated = sorted({name for name, values in request.args.lists() if len(values) > 1})
    if repeated and request.path != METRICS:
        flask_smorest.abort(422, errors={"query": {name: ["given more than once"]
                                                   for name in repeated}})
    sends_body = request.content_length or "chunked" in request.headers.get(
        "Transfer-Encoding", "").lower()
    if sends_body and not request.is_json:
        flask_smorest.abort(415, message="send the body as application/json")
    limit = request.max_content_length
    # Sent chunked, the body is read cut at MAX_CONTENT_LENGTH without a word (werkzeug's
    # stream), and the cut JSON answered "invalid": a byte past it makes the 413 a body of a
    # stated length gets.
    if (sends_body and request.content_length is None and limit
            and len(request.get_data(cache=True)) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()


def _raw_path() -> bytes:
    """The path as the client sent it, its %-escapes decoded to bytes: from the request line
    where the server keeps it (gunicorn's RAW_URI, werkzeug's REQUEST_URI), since servers
    that decode PATH_INFO themselves may already have replaced what was not UTF-8."""
    environ = request.environ
    sent = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if sent:  # as WSGI gives strings: each byte of the request line one latin-1 character
        return unquote_to_bytes(sent.split("?", 1)[0].encode("latin-1", "replace"))
    return str(environ.get("PATH_INFO", "")).encode("latin-1", "replace")


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def install(app: Flask) -> None:
    app.before_request(check)

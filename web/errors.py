"""The one place that turns failures into HTTP errors: JSON, never a stack trace.

Every error body has the same shape (`ErrorSchema`): `code`, `status`, `message` and `errors`
(field errors, by location then field). A dependency that is down or slow (database, Redis,
Kafka: what `eventpipe.errors.is_transient` calls transient) is a 503 the client may retry;
anything else unforeseen is logged with its traceback and answered as a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import flask_smorest
import redis
import sqlalchemy.exc
from flask import Flask, current_app, request
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    InternalServerError,
    ServiceUnavailable,
)

from eventpipe.errors import (
    KEY_OF_ANOTHER_KIND,
    PipelineError,
    is_transient,
    key_of_another_kind,
    no_redis_database,
    not_a_sqlite_database,
    redis_database_missing,
    redis_refuses_writes,
    schema_missing,
    schema_out_of_step,
)
from eventpipe.failures import SCHEMA_OUT_OF_STEP
from eventpipe.migrations import SCHEMA_MISSING
from web import services
from web.schemas import ErrorSchema

log = logging.getLogger(__name__)

ErrorResponse = tuple[dict[str, Any], int, dict[str, str]]
RETRY_AFTER_S = 5


class Api(flask_smorest.Api):  # type: ignore[misc]
    """flask-smorest's Api with the project's error payload."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> ErrorResponse:
        return http_error(error)


def http_error(error: HTTPException) -> ErrorResponse:
    data: dict[str, Any] = getattr(error, "data", None) or {}
    code = error.code or 500
    errors = data.get("errors", data.get("messages", {}))
    # By location then field, always: webargs says a body that is no JSON as a bare list.
    errors = {where: {"_schema": said} if isinstance(said, list) else said
              for where, said in errors.items()}
    message = data.get("message") or (
        "invalid parameters: see errors" if errors else error.description or error.name
    )
    # Keep what werkzeug says in headers (Allow on a 405, Retry-After…), not its HTML type.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    headers.update(data.get("headers") or {})
    return {"code": code, "status": error.name, "message": message, "errors": errors}, code, headers


def not_found(message: str) -> NoReturn:
    """Answer 404 with `message` (flask-smorest's `abort`, typed for the checker)."""
    flask_smorest.abort(404, message=message)
    raise AssertionError("abort returned")  # pragma: no cover


def conflict(message: str) -> NoReturn:
    """Answer 409 with `message`: the entry is in a state the request cannot change."""
    flask_smorest.abort(409, message=message)
    raise AssertionError("abort returned")  # pragma: no cover


def dependency_error(exc: Exception) -> ErrorResponse:
    """A failure raised below the views (SQL, Redis, Kafka, the pipeline's own errors). A
    database never migrated, or behind the code, is unavailable too (`errors.classify` calls
    it transient), until an operator runs the migration."""
    # Not the client's, nor passing: an operator must change a setting or free the keys.
    # Hosts and paths stay in the log.
    lasting = _operators_to_fix(exc)
    if lasting is not None:
        log.error(lasting, extra={"path": request.path,
                                  "error": f"{type(exc).__name__}: {exc}"})
        return http_error(ServiceUnavailable(lasting))
    if is_transient(exc) or redis_refuses_writes(exc):
        message = _unavailable(exc)
        log.warning("dependency unavailable", extra={"path": request.path, "reason": message,
                                                     "error": f"{type(exc).__name__}: {exc}"})
        body, code, headers = http_error(ServiceUnavailable(message))
        return body, code, {**headers, "Retry-After": str(RETRY_AFTER_S)}
    log.exception("unexpected error", extra={"path": request.path})
    return http_error(InternalServerError())


def _operators_to_fix(exc: Exception) -> str | None:
    """What no retry mends, said without a host or a path."""
    if key_of_another_kind(exc):
        return KEY_OF_ANOTHER_KIND
    if no_redis_database(exc):
        setting, number = redis_database_missing(services.of(current_app).settings)
        return f"Redis has no database {number}: {setting} names one the server does not have"
    if not_a_sqlite_database(exc):
        return "DATABASE_URL names a file that is not a SQLite database, or is damaged"
    return None


def _unavailable(exc: Exception) -> str:
    if schema_missing(exc):
        return SCHEMA_MISSING
    if schema_out_of_step(exc):
        return SCHEMA_OUT_OF_STEP
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        return "the database is unavailable; retry later"
    refused = redis_refuses_writes(exc)
    if refused is not None:
        return f"Redis refuses writes: {refused}"
    if isinstance(exc, redis.RedisError):
        return "Redis is unavailable; retry later"
    # The pipeline's own errors are written for operators (e.g. a replay Kafka did not take);
    # driver errors may name hosts and are only logged.
    return str(exc)


def too_deep(_exc: RecursionError) -> ErrorResponse:
    """A JSON body nested deeper than the parser can follow is the client's error."""
    return http_error(BadRequest("the request body is nested too deeply"))


def install(app: Flask) -> None:
    for kind in (sqlalchemy.exc.SQLAlchemyError, redis.RedisError, PipelineError):
        app.register_error_handler(kind, dependency_error)
    app.register_error_handler(RecursionError, too_deep)

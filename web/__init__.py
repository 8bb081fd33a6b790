"""The read API: Flask-Smorest service over the read model.

`create_app(settings)` builds the whole service: the users, orders and inventory reads,
health, readiness and the pipeline's status, Prometheus metrics, the token-guarded dead-letter
queue endpoints, the OpenAPI 3 document at `/openapi.json`, interactive docs (Swagger UI) at
`/docs`, and the operators' console at `/console` (status and dead letters, in the browser).
`web.wsgi:app` is the same app for gunicorn (`gunicorn -c web/gunicorn_conf.py web.wsgi:app`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import swagger_ui_bundle  # type: ignore[import-untyped]
from flask import Flask, Response, send_from_directory
from werkzeug.routing import BaseConverter

from eventpipe.settings import Settings, get_settings
from web import errors, metrics, request_checks, services
from web.resources import register
from web.resources.dlq.schemas import SelectionSchema

__all__ = ["create_app"]

API_VERSION = "1.0.0"
OPENAPI_VERSION = "3.0.3"
# Swagger UI's assets are served by the app itself (from the swagger-ui-bundle wheel), so
# the interactive docs work where browsers cannot reach a CDN.
SWAGGER_UI_ASSETS = "/docs/assets/"
CONSOLE = Path(__file__).with_name("console")
# The console loads nothing but its own files and talks to nothing but this API.
CONSOLE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                  "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                  "form-action 'none'")


class IdConverter(BaseConverter):
    """Any one path segment, even empty, so that `/dlq/entries/` is a 422 naming the bad id."""

    regex = "[^/]*"
    part_isolating = True


class KeyConverter(BaseConverter):
    """An entity's key: the rest of the path, even empty (a 422 naming it) or holding '/',
    which the contract allows in an id: a client sends `tenant/42` as `tenant%2F42`, which
    the server has decoded by the time it routes. Line breaks too (`.` matches none)."""

    regex = r"[\s\S]*"
    part_isolating = False


def flask_config() -> dict[str, Any]:
    return {
        "API_TITLE": "eventpipe read API",
        "API_VERSION": API_VERSION,
        "OPENAPI_VERSION": OPENAPI_VERSION,
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": SWAGGER_UI_ASSETS,
        "API_SPEC_OPTIONS": {
            "info": {"description": "The read model of the eventpipe pipeline, its health, "
                                    "and its dead-letter queue. JSON in camelCase; money as "
                                    "decimal strings; times in ISO-8601 UTC."},
        },
        # A stack trace never reaches a client, even when the app runs in a debugger.
        "PROPAGATE_EXCEPTIONS": False,
        # Request bodies are small JSON selections: anything larger is refused (413).
        "MAX_CONTENT_LENGTH": 64 * 1024,
    }


def create_app(settings: Settings | None = None) -> Flask:
    """The API for `settings` (default: the process's settings from the environment)."""
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config.update(flask_config())
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the schemas' field order
    # A '%2F' in an id must not turn into a redirect to a merged path: it is just not found.
    app.url_map.merge_slashes = False
    app.url_map.converters["id"] = IdConverter
    app.url_map.converters["key"] = KeyConverter

    deps = services.Services.from_settings(settings)
    services.install(app, deps)
    errors.install(app)
    request_checks.install(app)

    api = errors.Api(app)
    api.register_converter(IdConverter, lambda _converter: {"type": "string"})
    api.register_converter(KeyConverter, lambda _converter: {"type": "string"})
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer",
                       "description": "The DLQ_API_TOKEN of the deployment"})
    register(api)
    # flask-smorest registers it for pagination, which this API does with a cursor instead.
    api.spec.components.schemas.pop("PaginationMetadata", None)
    for name in ("Selection", "ReplaySelection"):
        api.spec.components.schemas[name]["anyOf"] = SelectionSchema.ANY_OF
    metrics.install(app, deps.scraped_dead_letters)
    app.add_url_rule(f"{SWAGGER_UI_ASSETS}<path:filename>", "swagger_ui_assets",
                     _swagger_ui_asset)
    app.add_url_rule("/console", "console", _console_page)
    app.add_url_rule("/console/assets/<path:filename>", "console_assets", _console_asset)
    _document_metrics(app, api)
    return app


def _swagger_ui_asset(filename: str) -> Response:
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename, max_age=86400)


def _console_page() -> Response:
    return _console_file("index.html", max_age=0)


def _console_asset(filename: str) -> Response:
    return _console_file(filename, max_age=300)


def _console_file(filename: str, max_age: int) -> Response:
    response = send_from_directory(CONSOLE, filename, max_age=max_age)
    response.headers["Content-Security-Policy"] = CONSOLE_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _document_metrics(app: Flask, api: Any) -> None:
    # The exporter's route is plain Flask; list it in the document so clients see it too.
    rule = next(r for r in app.url_map.iter_rules() if r.rule == metrics.PATH)
    api.spec.path(rule=rule, operations={"get": {
        "operationId": "getMetrics",
        "tags": ["health"],
        "summary": "Prometheus metrics (text exposition format)",
        "responses": {"200": {"description": "Metrics",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }})

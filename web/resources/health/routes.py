"""GET /health (the process answers) and GET /ready (its dependencies answer too)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from web import services
from web.resources.health.checks import dependency_checks, run_checks
from web.resources.health.schemas import HealthSchema, ReadySchema

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/health")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.doc(operationId="getHealth")
    def get(self) -> dict[str, str]:
        """Liveness: the process serves requests (no dependency is called)"""
        return {"status": "ok"}


@blp.route("/ready")
class Ready(MethodView):
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="A dependency is unreachable")
    @blp.doc(operationId="getReadiness")
    def get(self) -> tuple[dict[str, Any], int]:
        """Readiness: the database, Redis and the Kafka broker each answer, in a short time"""
        results = run_checks(dependency_checks(services.current()))
        failed = [result.name for result in results if not result.ok]
        body = {"ready": not failed, "failed": failed, "checks": results}
        return body, 503 if failed else 200

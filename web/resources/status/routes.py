"""GET /status: the pipeline's state, as the console and `eventpipe status` show it."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint

from eventpipe.status import Status, collect
from web import services
from web.resources.status.schemas import StatusSchema

blp = Blueprint("status", __name__, description="The pipeline's state")


@blp.route("/status")
class PipelineStatus(MethodView):
    @blp.response(200, StatusSchema)
    @blp.doc(operationId="getStatus")
    def get(self) -> Status:
        """Per partition: committed offset, lag, in flight, queue depth, paused, who reads and
        who applies it; the processes heard from; events per second by type; the dead letters
        open by error class and event type; and the problems to act on"""
        deps = services.current()
        return collect(deps.settings, deps.engine, deps.redis, deps.broker)

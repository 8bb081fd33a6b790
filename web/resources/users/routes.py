"""GET /users/{userId}."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from web import services
from web.errors import not_found
from web.resources.users.queries import find_user
from web.resources.users.schemas import UserPathSchema, UserSchema

blp = Blueprint("users", __name__, url_prefix="/users", description="Users")


@blp.route("/<key:userId>")
class User(MethodView):
    @blp.arguments(UserPathSchema, location="path")
    @blp.response(200, UserSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.doc(operationId="getUser")
    def get(self, path: dict[str, str], **_: str) -> dict[str, Any]:
        """A user and their latest orders, newest first"""
        user = find_user(services.connection(), path["user_id"])
        if user is None:
            not_found(f"no user {path['user_id']!r}")
        return user

"""GET /orders/{orderId}."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from web import services
from web.errors import not_found
from web.resources.orders.queries import find_order
from web.resources.orders.schemas import OrderPathSchema, OrderSchema

blp = Blueprint("orders", __name__, url_prefix="/orders", description="Orders")


@blp.route("/<key:orderId>")
class Order(MethodView):
    @blp.arguments(OrderPathSchema, location="path")
    @blp.response(200, OrderSchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.doc(operationId="getOrder")
    def get(self, path: dict[str, str], **_: str) -> dict[str, Any]:
        """An order, its items, its payment status and its latest payment"""
        order = find_order(services.connection(), path["order_id"])
        if order is None:
            not_found(f"no order {path['order_id']!r}")
        return order

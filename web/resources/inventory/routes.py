"""GET /inventory/{sku}."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from eventpipe.tables import inventory
from web import services
from web.errors import not_found
from web.resources.inventory.schemas import InventorySchema, SkuPathSchema

blp = Blueprint("inventory", __name__, url_prefix="/inventory", description="Inventory")


@blp.route("/<key:sku>")
class Stock(MethodView):
    @blp.arguments(SkuPathSchema, location="path")
    @blp.response(200, InventorySchema)
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.doc(operationId="getStock")
    def get(self, path: dict[str, str], **_: str) -> dict[str, Any]:
        """The quantity in stock of one SKU and when it last changed"""
        row = services.connection().execute(
            select(inventory.c.sku, inventory.c.quantity, inventory.c.updated_at)
            .where(inventory.c.sku == path["sku"])
        ).mappings().first()
        if row is None:
            not_found(f"no inventory for SKU {path['sku']!r}")
        return dict(row)

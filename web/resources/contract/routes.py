"""GET /contract and /contract/{name}: the event contract as JSON Schema, for producers."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask.views import MethodView
from flask_smorest import Blueprint

from eventpipe.schemas import schemas
from web.errors import not_found
from web.resources.contract.schemas import ContractIndexSchema, NamePathSchema

blp = Blueprint("contract", __name__, url_prefix="/contract",
                description="The event contract as JSON Schema (draft 2020-12)")


@blp.route("")
class Index(MethodView):
    @blp.response(200, ContractIndexSchema)
    @blp.doc(operationId="listContractSchemas")
    def get(self) -> dict[str, Any]:
        """The schemas: the envelope, and one per event type"""
        return {"schemas": {name: f"{blp.url_prefix}/{name}" for name in schemas()}}


@blp.route("/<id:name>")
class Schema(MethodView):
    @blp.arguments(NamePathSchema, location="path")
    # A document of its own, described as such: no schema of this API's can say more.
    @blp.response(200, {"type": "object", "description": "A JSON Schema (draft 2020-12)"},
                  description="A JSON Schema document")
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.doc(operationId="getContractSchema")
    def get(self, path: dict[str, str], **_: str) -> Response:
        """One schema: `envelope`, `UserCreated`, `OrderPlaced`, `PaymentSettled` or
        `InventoryAdjusted`"""
        found = schemas().get(path["name"])
        if found is None:
            not_found(f"no schema {path['name']!r}: {', '.join(schemas())}")
        return jsonify(found)

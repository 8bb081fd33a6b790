"""The JSON of one SKU's stock, as sent and as documented."""

from __future__ import annotations

from marshmallow import fields

from web.schemas import CamelSchema, Id, UtcDateTime


class SkuPathSchema(CamelSchema):
    sku = Id("SKU")


class InventorySchema(CamelSchema):
    sku = fields.String(required=True)
    quantity = fields.Integer(
        required=True,
        metadata={"description": "Sum of the adjustments applied; may be below zero while "
                                 "adjustments arrive out of order"},
    )
    updated_at = UtcDateTime(
        required=True, metadata={"description": "The latest adjustedAt among the adjustments"})

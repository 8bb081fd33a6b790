"""The JSON of a user, as sent and as documented."""

from __future__ import annotations

from marshmallow import fields

from web.resources.orders.queries import LATEST_ORDERS
from web.resources.orders.schemas import OrderSummarySchema
from web.schemas import CamelSchema, Id, UtcDateTime


class UserPathSchema(CamelSchema):
    user_id = Id("user")


class UserSchema(CamelSchema):
    user_id = fields.String(required=True)
    email = fields.String(required=True, metadata={"format": "email"})
    name = fields.String(required=True)
    created_at = UtcDateTime(required=True)
    updated_at = UtcDateTime(
        required=True, metadata={"description": "When the pipeline last changed this user"})
    orders = fields.List(
        fields.Nested(OrderSummarySchema), required=True,
        metadata={"description": f"The user's latest {LATEST_ORDERS} orders, newest first "
                                 "(by placedAt)", "maxItems": LATEST_ORDERS},
    )

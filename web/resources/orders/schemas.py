"""The JSON of an order, as sent and as documented."""

from __future__ import annotations

from marshmallow import fields, validate

from web.resources.orders.queries import PENDING, SETTLED
from web.schemas import CamelSchema, Id, Money, UtcDateTime

CURRENCY = {"pattern": "^[A-Z]{3}$", "example": "EUR",
            "description": "ISO 4217 currency code"}


class OrderPathSchema(CamelSchema):
    order_id = Id("order")


class PaymentStatus(fields.String):
    def __init__(self) -> None:
        super().__init__(
            required=True, validate=validate.OneOf([PENDING, SETTLED]),
            metadata={"description": "settled once a payment for the order is recorded"},
        )


class OrderItemSchema(CamelSchema):
    sku = fields.String(required=True)
    quantity = fields.Integer(required=True, metadata={"minimum": 1})
    unit_price = Money(required=True)


class PaymentSchema(CamelSchema):
    payment_id = fields.String(required=True)
    amount = Money(required=True)
    currency = fields.String(required=True, metadata=CURRENCY)
    settled_at = UtcDateTime(required=True)


class OrderSchema(CamelSchema):
    order_id = fields.String(required=True)
    user_id = fields.String(required=True)
    items = fields.List(fields.Nested(OrderItemSchema), required=True)
    total_amount = Money(required=True)
    currency = fields.String(required=True, metadata=CURRENCY)
    placed_at = UtcDateTime(required=True)
    payment_status = PaymentStatus()
    payment = fields.Nested(
        PaymentSchema, required=True, allow_none=True,
        metadata={"description": "The latest settled payment, or null while pending"},
    )


class OrderSummarySchema(CamelSchema):
    order_id = fields.String(required=True)
    total_amount = Money(required=True)
    currency = fields.String(required=True, metadata=CURRENCY)
    placed_at = UtcDateTime(required=True)
    payment_status = PaymentStatus()

"""The read model computed from the events a test sent, independently of the pipeline's code.

Deliberately naive: for each entity the newest version wins; stock is the sum of the deltas of
distinct event ids; events the test marks as poison are left out (so the streams given to it
must not rely on the rules that span keys). Comparing it with the
database after a run says whether the pipeline applied every event exactly once in effect.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from eventpipe import readmodel

State = dict[str, dict[str, Any]]


def expected_state(documents: list[dict[str, Any]]) -> State:
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    deltas: dict[str, dict[str, int]] = {}
    for doc in documents:
        data, kind = doc["data"], doc["eventType"]
        if kind == "InventoryAdjusted":
            deltas.setdefault(data["sku"], {})[doc["eventId"]] = data["delta"]
            continue
        entity = {"UserCreated": data.get("userId"), "OrderPlaced": data.get("orderId"),
                  "PaymentSettled": data.get("paymentId")}[kind]
        version = (doc["occurredAt"], doc["eventId"])
        current = newest.get((kind, entity))
        if current is None or version > (current["occurredAt"], current["eventId"]):
            newest[(kind, entity)] = doc
    state: State = {"users": {}, "orders": {}, "payments": {}, "inventory": {}}
    for (kind, entity), doc in newest.items():
        data = doc["data"]
        if kind == "UserCreated":
            state["users"][entity] = (data["email"].lower(), data["name"])
        elif kind == "OrderPlaced":
            items = tuple((i["sku"], i["quantity"], Decimal(i["unitPrice"]))
                          for i in data["items"])
            state["orders"][entity] = (data["userId"], Decimal(data["totalAmount"]),
                                       data["currency"], items)
        else:
            state["payments"][entity] = (data["orderId"], Decimal(data["amount"]),
                                         data["currency"])
    state["inventory"] = {sku: sum(by_id.values()) for sku, by_id in deltas.items()}
    return state


def stored_state(engine: Engine) -> State:
    """What the read model shows (`eventpipe.readmodel`), in the shape of `expected_state`."""
    with engine.connect() as conn:
        model = readmodel.whole(conn)
    return {
        "users": {k: (r.email, r.name) for k, r in model.users.items()},
        "orders": {k: (r.user_id, r.total_amount, r.currency, tuple(model.items.get(k, ())))
                   for k, r in model.orders.items()},
        "payments": {k: (r.order_id, r.amount, r.currency) for k, r in model.payments.items()},
        "inventory": {sku: quantity for sku, (quantity, _) in model.inventory.items()},
    }

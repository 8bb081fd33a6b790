"""The API's resources, one folder each: `routes.py` (views) and `schemas.py` (JSON + doc)."""

from __future__ import annotations

from web.errors import Api
from web.resources.contract.routes import blp as contract
from web.resources.dlq.routes import blp as dlq
from web.resources.health.routes import blp as health
from web.resources.inventory.routes import blp as inventory
from web.resources.orders.routes import blp as orders
from web.resources.status.routes import blp as status
from web.resources.users.routes import blp as users


def register(api: Api) -> None:
    for blueprint in (users, orders, inventory, health, status, dlq, contract):
        api.register_blueprint(blueprint)

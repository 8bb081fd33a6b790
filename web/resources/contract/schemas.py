"""The JSON of the contract's index and the path of one schema."""

from __future__ import annotations

from marshmallow import fields

from web.schemas import CamelSchema, Id


class NamePathSchema(CamelSchema):
    name = Id("schema name: envelope or an event type")


class ContractIndexSchema(CamelSchema):
    schemas = fields.Dict(keys=fields.String(), values=fields.String(), required=True,
                          metadata={"description": "Schema name → where to get it"})

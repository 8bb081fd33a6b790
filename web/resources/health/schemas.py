"""The JSON of liveness and readiness."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from web.schemas import CamelSchema


class HealthSchema(ma.Schema):
    status = fields.String(required=True, validate=validate.OneOf(["ok"]))


class CheckSchema(CamelSchema):
    name = fields.String(required=True, validate=validate.OneOf(["database", "redis", "kafka"]))
    ok = fields.Boolean(required=True)
    duration_ms = fields.Float(required=True, metadata={"minimum": 0})
    error = fields.String(required=True, allow_none=True,
                          metadata={"description": "Why the check failed; null when ok"})


class ReadySchema(CamelSchema):
    ready = fields.Boolean(required=True)
    failed = fields.List(fields.String(), required=True,
                         metadata={"description": "Names of the checks that failed"})
    checks = fields.List(fields.Nested(CheckSchema), required=True)

"""The bearer token that guards every DLQ endpoint.

No token configured: the endpoints are disabled (403, saying how to enable them). A missing
or wrong token: 401. The comparison takes the same time whatever the token's prefix holds.
"""

from __future__ import annotations

import hmac

from flask import request
from flask_smorest import abort

from web import services

REALM = 'Bearer realm="eventpipe-dlq"'


def require_token() -> None:
    expected = services.current().settings.dlq_api_token
    if not expected:
        abort(403, message="the dead-letter queue endpoints are disabled: set DLQ_API_TOKEN "
                           "to a secret and send it as 'Authorization: Bearer <token>'")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Header values arrive latin-1 decoded (WSGI): encoding back gives the bytes sent.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("latin-1"), expected.encode("utf-8")
    ):
        abort(401, message="a valid 'Authorization: Bearer <token>' header is required",
              headers={"WWW-Authenticate": REALM})

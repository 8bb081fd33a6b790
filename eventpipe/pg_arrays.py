"""Arrays as parameters of PostgreSQL statements, in PostgreSQL's text form.

A batch's statements and the reconciler's lookups pass their values as one array per column
(`unnest(%s::text[], …)`, `key = ANY(%s::text[])`). psycopg builds such an array value by
value in Python, 0.15 µs a value in its binary form and 0.7 µs in its text form; written
here, strings are escaped by three replacements over all of them joined by NUL (a character
no PostgreSQL text holds), numbers joined as they print: 0.06 µs a value. PostgreSQL reads
the text as it binds the parameter, so it plans for the values it holds, as with psycopg's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pg_array_text(values: Sequence[Any]) -> str:
    """A one-dimensional array of these strings, integers or decimals (and None, as NULL) in
    PostgreSQL's text form: `{"a","b \\"quoted\\""}`, `{1,2}`. Strings are always quoted, so
    "NULL" and "" stay strings. Raises ValueError for a string holding NUL."""
    if not values:
        return "{}"
    if None in values:  # rare (a claim's worker left unnamed): value by value
        return "{" + ",".join("NULL" if value is None else pg_array_text([value])[1:-1]
                              for value in values) + "}"
    if not isinstance(values[0], str):
        return "{" + ",".join(map(str, values)) + "}"
    joined = "\x00".join(values)
    if joined.count("\x00") != len(values) - 1:
        raise ValueError("a string holds a NUL character, which PostgreSQL text cannot")
    return '{"' + joined.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", '","') + '"}'

"""`column IN (keys)` for sets of any size, written the way each database takes it best.

PostgreSQL gets one `column = ANY(:keys)` with the keys as one parameter, an array in
PostgreSQL's text form (`eventpipe.pg_arrays`): one statement and one parameter whatever the
set's size, planned at each execution for the set it is given (`eventpipe.database` prepares
none of these). SQLite gets one `column IN (SELECT value FROM json_each(:keys))`, the
keys as one JSON array, which it looks up one by one in the column's index. SQL Server gets
`IN (…)` lists in chunks, under its 2,100 parameters per statement, and so does SQLite for
keys holding a NUL, which its JSON cuts short.

One parameter whatever the set's size also keeps the statement in SQLAlchemy's cache: an
`IN (…)` list is rendered anew at each execution, a bound parameter per key, which cost a
SQLite worker more than the lookups themselves (docs/performance.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Row,
    Select,
    String,
    TypeDecorator,
    any_,
    bindparam,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeEngine

from eventpipe.pg_arrays import pg_array_text

CHUNK = 500


def chunked(values: Collection[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    ordered = sorted(values)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def in_keys(conn: Connection, column: Any, keys: Collection[Any]) -> list[ColumnElement[bool]]:
    """Conditions that together select `column IN keys`: run one statement per condition."""
    if not keys:
        return []
    dialect = conn.dialect.name
    if dialect == "postgresql":
        array = bindparam(None, pg_array_text(sorted(keys)), type_=_ArrayText(column.type))
        return [column == any_(array)]
    if dialect == "sqlite":
        listed = json.dumps(list(keys))
        # SQLite's JSON ends a string at an escaped NUL ("a\u0000b" reads as "a"): keys
        # holding one (no valid event carries one) go as lists, like SQL Server's.
        if "\\u0000" not in listed:
            each = func.json_each(bindparam(None, listed, type_=String))
            return [column.in_(select(each.table_valued("value").c.value))]
    return [column.in_(part) for part in chunked(keys)]


def rows_in(conn: Connection, query: Select[Any], column: Any,
            keys: Collection[Any]) -> list[Row[Any]]:
    """`query`'s rows whose `column` is one of `keys`: a statement per condition of
    `in_keys`, each result taken in one fetch (iterating a result fetches its rows from the
    driver one at a time, half a microsecond more a row)."""
    return [row for where in in_keys(conn, column, keys)
            for row in conn.execute(query.where(where)).all()]


class _ArrayText(TypeDecorator[str]):
    """An array of the column's type, as a parameter already in PostgreSQL's text form: sent
    as it is, with the statement's cast to the array type (`%(p)s::VARCHAR(64)[]`), so that
    PostgreSQL reads it as it binds the parameter and plans for the keys it holds."""

    impl = ARRAY
    cache_ok = True

    def __init__(self, item_type: TypeEngine[Any]) -> None:
        super().__init__(item_type)
        self.item_type = item_type  # part of the cache key: the cast differs with it

    def bind_processor(self, dialect: Dialect) -> None:
        return None  # `ARRAY`'s own would take the text for a list of characters

    def literal_processor(self, dialect: Dialect) -> Callable[[str], str]:
        """The text as an SQL string literal, for statements compiled with their values."""
        return lambda value: "'" + value.replace("'", "''") + "'"

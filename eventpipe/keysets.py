"""`column IN (keys)` for sets of any size, written the way each database takes it best.

PostgreSQL gets one `column = ANY(:keyset)` with the keys as one parameter, an array in
PostgreSQL's text form (`eventpipe.pg_arrays`): one statement and one parameter whatever the
set's size, planned at each execution for the set it is given (`eventpipe.database` prepares
none of these). SQLite gets one `column IN (SELECT value FROM json_each(:keyset))`, the
keys as one JSON array, which it looks up one by one in the column's index. SQL Server gets
`IN (…)` lists in chunks, under its 2,100 parameters per statement, and so does SQLite for
keys holding a NUL, which its JSON cuts short.

A `Keyed` statement is built once for each database, the keys given at each execution: an
`IN (…)` list is rendered anew at each execution, a bound parameter per key, and even one
parameter in a statement built anew costs SQLAlchemy its expression and its cache key. Both
cost a SQLite worker more than the lookups themselves (docs/performance.md): a statement
built for four keys, a hundred microseconds; built once, a tenth of that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Delete,
    Dialect,
    Row,
    Select,
    String,
    TypeDecorator,
    Update,
    any_,
    bindparam,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeEngine

from eventpipe.pg_arrays import pg_array_text

CHUNK = 500
KEYSET = "keyset"  # the parameter that carries the keys: one value, or a chunk's list

Restrictable = Select[Any] | Delete | Update


def chunked(values: Collection[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    ordered = sorted(values)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


class Keyed:
    """`statement` restricted to `column IN keys`, the keys given at each execution, with
    any other parameters the statement names. Hold one where it runs often: the statement
    for each database is built once. Parameters of an update named like a column of its
    table join its SET clause, as SQLAlchemy's do: name its own values otherwise (`fate`
    for `outcome`)."""

    def __init__(self, statement: Restrictable, column: ColumnElement[Any]) -> None:
        self.statement = statement
        self.column = column
        self._built: dict[tuple[str, bool], Restrictable] = {}

    def execute(self, conn: Connection, keys: Collection[Any], **params: Any) -> None:
        for statement, values in self._executions(conn, keys, params):
            conn.execute(statement, values)

    def rows(self, conn: Connection, keys: Collection[Any], **params: Any) -> list[Row[Any]]:
        """The rows of each execution, each taken in one fetch before the next runs
        (iterating a result fetches its rows from the driver one at a time, half a
        microsecond more a row; and SQL Server serves one result at a time)."""
        return [row for statement, values in self._executions(conn, keys, params)
                for row in conn.execute(statement, values).all()]

    def built(self, dialect: str, as_one: bool) -> Restrictable:
        """The statement this database runs: with the keys as one parameter, or as a list
        (`IN (…)`, rendered at each execution for the keys of a chunk)."""
        built = self._built.get((dialect, as_one))
        if built is None:
            condition = (_one_parameter_condition(dialect, self.column) if as_one
                         else self.column.in_(bindparam(KEYSET, expanding=True)))
            built = self._built[dialect, as_one] = self.statement.where(condition)
        return built

    def _executions(self, conn: Connection, keys: Collection[Any],
                    params: dict[str, Any]) -> Iterator[tuple[Restrictable, dict[str, Any]]]:
        if not keys:
            return
        dialect = conn.dialect.name
        keyset = _as_one_parameter(dialect, keys)
        if keyset is not None:
            yield self.built(dialect, True), {**params, KEYSET: keyset}
            return
        for part in chunked(keys):
            yield self.built(dialect, False), {**params, KEYSET: part}


def rows_in(conn: Connection, query: Select[Any], column: ColumnElement[Any],
            keys: Collection[Any]) -> list[Row[Any]]:
    """`query`'s rows whose `column` is one of `keys`, for a query run now and then (one run
    often is a `Keyed`)."""
    return Keyed(query, column).rows(conn, keys)


def _as_one_parameter(dialect: str, keys: Collection[Any]) -> str | None:
    """The keys as the one parameter this database takes them in; None where they go as
    lists."""
    if dialect == "postgresql":
        return pg_array_text(sorted(keys))
    if dialect == "sqlite":
        listed = json.dumps(list(keys))
        # SQLite's JSON ends a string at an escaped NUL ("a\u0000b" reads as "a"): keys
        # holding one (no valid event carries one) go as lists, like SQL Server's.
        return listed if "\\u0000" not in listed else None
    return None


def _one_parameter_condition(dialect: str, column: ColumnElement[Any]) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return column == any_(bindparam(KEYSET, type_=_ArrayText(column.type)))
    if dialect == "sqlite":
        each = func.json_each(bindparam(KEYSET, type_=String))
        return column.in_(select(each.table_valued("value").c.value))
    raise ValueError(f"{dialect} takes no set of keys as one parameter")


class _ArrayText(TypeDecorator[str]):
    """An array of the column's type, as a parameter already in PostgreSQL's text form: sent
    as it is, with the statement's cast to the array type (`%(keyset)s::VARCHAR(64)[]`), so
    that PostgreSQL reads it as it binds the parameter and plans for the keys it holds."""

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

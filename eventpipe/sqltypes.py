"""Column types that mean the same thing on SQL Server, PostgreSQL and SQLite.

Times are stored as UTC (timestamptz on PostgreSQL, DATETIME2 on SQL Server, ISO text on
SQLite) and always come back aware. Money is an exact NUMERIC(18, 4); SQLite has no exact
decimal, so there it is kept as text rather than let a float round it.
Event ids used as version tie-breakers compare by code point everywhere, as Python compares
them (`by_code_point` where a column's collation would not).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Dialect, Numeric, String, Unicode
from sqlalchemy.dialects import mssql, postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine


class UtcDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=False)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        if dialect.name == "mssql":
            return dialect.type_descriptor(mssql.DATETIME2(precision=6))  # type: ignore[no-untyped-call]
        return dialect.type_descriptor(DateTime(timezone=False))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: times must be aware")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    impl = Numeric(18, 4, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(24))
        return dialect.type_descriptor(Numeric(18, 4, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


def key_type(length: int = 64) -> TypeEngine[str]:
    """Text that names an entity or an event: compared exactly (by code point) on every
    database. SQL Server's default collations ignore case; PostgreSQL's and SQLite's don't."""
    return Unicode(length).with_variant(
        mssql.NVARCHAR(length, collation="Latin1_General_BIN2"), "mssql")


def event_id_type() -> TypeEngine[str]:
    """A 64-character id whose ordering is by code point on every database, as in Python."""
    return (
        Unicode(64)
        .with_variant(String(64, collation="C"), "postgresql")
        .with_variant(mssql.NVARCHAR(64, collation="Latin1_General_BIN2"), "mssql")
    )


def name_type(length: int) -> TypeEngine[str]:
    """ASCII that names a thing of Kafka's (a topic, a topic's id): compared exactly on every
    database, as Kafka does."""
    return String(length).with_variant(
        mssql.VARCHAR(length, collation="Latin1_General_BIN2"), "mssql")


class by_code_point(FunctionElement[str]):
    """A key or an id, ordered by code point, as Python orders text. On PostgreSQL a column
    without a collation of its own orders by the database's, which may be a language's
    (`a` before `B`): "C" orders by code point. SQL Server's binary collations compare
    NVARCHAR by UTF-16 code unit: a character above U+FFFF (a surrogate pair, D800–DFFF)
    comes before one of U+E000–U+FFFF there, after it everywhere else; so there the text is
    compared as UTF-8, whose bytes are in code point order. SQLite's is byte order."""

    type = String()
    inherit_cache = True
    name = "by_code_point"

    def __init__(self, text: ColumnElement[str]) -> None:
        super().__init__(text)


def code_point_tsql(text: str) -> str:
    """T-SQL of `text` (an NVARCHAR expression of at most 64 code units) in UTF-8, compared
    and ordered by code point (SQL Server 2019 and later)."""
    return f"CONVERT(VARCHAR(256), {text} COLLATE Latin1_General_100_BIN2_UTF8)"


@compiles(by_code_point)
def _as_is(element: by_code_point, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(by_code_point, "postgresql")
def _in_c(element: by_code_point, compiler: SQLCompiler, **kw: Any) -> str:
    return f'{compiler.process(element.clauses, **kw)} COLLATE "C"'


@compiles(by_code_point, "mssql")
def _in_utf8(element: by_code_point, compiler: SQLCompiler, **kw: Any) -> str:
    return code_point_tsql(compiler.process(element.clauses, **kw))

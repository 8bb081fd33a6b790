"""Arrays in PostgreSQL's text form (`eventpipe.pg_arrays`), as a batch's statements and the
reconciler's lookups pass them: PostgreSQL must read back exactly the values written."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Integer, String, any_, bindparam, literal_column, select
from sqlalchemy.dialects import postgresql

from eventpipe.keysets import _ArrayText
from eventpipe.pg_arrays import pg_array_text

# Any text PostgreSQL stores (no NUL, no lone surrogate); quotes, backslashes, braces, commas,
# spaces, "NULL" and the empty string are what the text form must get right.
_texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
                 max_size=20) | st.sampled_from(["NULL", "", " ", '"', "\\", "{}", "a,b", "\\\""])
_settings = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cursor(postgresql_url: str) -> Iterator[psycopg.Cursor[Any]]:
    with psycopg.connect(postgresql_url.replace("+psycopg", "")) as conn:
        yield conn.cursor()


def _read_back(cursor: psycopg.Cursor[Any], text: str, kind: str) -> Any:
    cursor.execute(f"SELECT %s::{kind}[]", (text,))
    row = cursor.fetchone()
    assert row is not None
    return row[0]


@given(st.lists(_texts | st.none(), max_size=12))
@_settings
def test_strings_and_nulls_read_back_as_written(cursor: psycopg.Cursor[Any],
                                                values: list[str | None]) -> None:
    assert _read_back(cursor, pg_array_text(values), "text") == values


@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=12))
@_settings
def test_integers_read_back_as_written(cursor: psycopg.Cursor[Any], values: list[int]) -> None:
    assert _read_back(cursor, pg_array_text(values), "bigint") == values


@given(st.lists(st.decimals(min_value=0, max_value=10**14 - 1, places=4) | st.decimals(
    min_value=-10**6, max_value=10**6, places=1), max_size=12))
@_settings
def test_amounts_read_back_as_written(cursor: psycopg.Cursor[Any],
                                      values: list[Decimal]) -> None:
    assert _read_back(cursor, pg_array_text(values), "numeric") == values


def test_a_value_the_text_cannot_hold_is_refused_not_split() -> None:
    assert pg_array_text(["a", 'b"\\c', None]) == '{"a","b\\"\\\\c",NULL}'
    assert pg_array_text([True, False, 2]) == "{1,0,2}"
    with pytest.raises(ValueError, match="NUL"):
        pg_array_text(["a\x00b"])
    for mixed in ([1, "2,3"], [Decimal(1), "2,3"], ["a", 1], [1.5]):
        with pytest.raises(TypeError):
            pg_array_text(mixed)


def test_the_keys_parameter_compiles_with_its_values_and_caches_by_its_type() -> None:
    """A keyset sends the text as it is, with a cast to the column's array type; compiled
    with its values (as offline migrations do) it is one SQL string literal, and statements
    that differ only in the keys' type never share a cached compilation."""
    dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
    keys = bindparam(None, pg_array_text(["a'b", 'c"d']), type_=_ArrayText(String(64)))
    bound = str(select(literal_column("1")).where(literal_column("k") == any_(keys)).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}))
    assert "ANY ('{\"a''b\",\"c\\\"d\"}')" in bound
    assert _ArrayText(Integer())._static_cache_key != _ArrayText(String(64))._static_cache_key

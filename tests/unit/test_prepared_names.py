"""Each PostgreSQL connection names its prepared statements as no other does
(`eventpipe.database._names_of_its_own`), through psycopg's record of what it prepared."""

from __future__ import annotations

from types import SimpleNamespace

from psycopg._preparing import PrepareManager

from eventpipe.database import _GAVE_UP, _names_of_its_own


def test_each_connection_starts_its_names_somewhere_of_its_own() -> None:
    connections = [SimpleNamespace(_prepared=PrepareManager()) for _ in range(2)]
    records = [SimpleNamespace(info={}) for _ in connections]
    for connection, record in zip(connections, records, strict=True):
        _names_of_its_own(connection, record)
    names = [connection._prepared._prepared_idx for connection in connections]
    assert names[0] != names[1] and 0 not in names
    assert all(_GAVE_UP not in record.info for record in records)


def test_a_psycopg_whose_record_is_not_as_known_gets_no_prepared_statements() -> None:
    """Were psycopg to keep its record otherwise, its names would be `_pg3_0` … again, which
    a pooler may mix up between clients: that connection prepares nothing."""
    record = SimpleNamespace(info={})
    _names_of_its_own(SimpleNamespace(_prepared=SimpleNamespace()), record)
    assert record.info[_GAVE_UP] is True

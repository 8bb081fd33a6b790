"""Times as text: `utc_iso` spells every time as `datetime.isoformat` does, in UTC with a 'Z'."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from eventpipe.times import utc_iso

_zones = st.just(UTC) | st.builds(timezone, st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
    | st.timedeltas(min_value=-timedelta(seconds=1), max_value=timedelta(seconds=1)))


@given(st.datetimes(timezones=_zones) | st.datetimes(timezones=_zones).map(
    lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000)))
@settings(max_examples=500, deadline=None)
def test_utc_iso_is_isoformat_in_utc(moment: datetime) -> None:
    """`utc_iso` spells the time from its fields (it runs for every time of every event's
    fingerprint); it must say what `isoformat` says: milliseconds, or microseconds when the
    given time has them, any year, any zone (offsets with microseconds too)."""
    with contextlib.suppress(OverflowError):  # a time beyond year 1 or 9999 once in UTC
        in_utc = moment.astimezone(UTC)
        timespec = "milliseconds" if moment.microsecond % 1000 == 0 else "microseconds"
        assert utc_iso(moment) == in_utc.isoformat(timespec=timespec).replace("+00:00", "Z")


def test_utc_iso_passes_other_precisions_on() -> None:
    moment = datetime(2026, 11, 24, 11, 15, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert utc_iso(moment) == "2026-11-24T10:15:00.123456Z"
    assert utc_iso(moment, "seconds") == "2026-11-24T10:15:00Z"
    assert utc_iso(moment.replace(microsecond=0)) == "2026-11-24T10:15:00.000Z"

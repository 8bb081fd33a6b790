"""The processing-rate meter: a sliding window that falls back to zero."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from eventpipe.metrics import RateMeter, event_type_label


def test_rate_is_events_over_the_last_full_window_and_decays() -> None:
    gauge = Gauge("test_rate", "test", ["event_type"], registry=CollectorRegistry())
    meter = RateMeter(gauge, window_s=10)
    meter._thread = object()  # type: ignore[assignment]  # no background thread in this test
    for second in range(100, 110):
        meter.add("OrderPlaced", 5, now=second + 0.5)
    meter.add("UserCreated", 20, now=109.9)
    assert meter.rates(now=110) == {"OrderPlaced": 5.0, "UserCreated": 2.0}
    # The current, unfinished second does not count yet.
    meter.add("OrderPlaced", 100, now=110.2)
    assert meter.rates(now=110.5)["OrderPlaced"] == 5.0
    # Ten quiet seconds later nothing is left in the window.
    assert meter.rates(now=121) == {"OrderPlaced": 0.0, "UserCreated": 0.0}


def test_event_type_labels_are_bounded() -> None:
    assert event_type_label("OrderPlaced") == "OrderPlaced"
    assert event_type_label("OrderShipped") == "unknown"
    assert event_type_label(None) == "unknown"

"""The processing-rate meter, and a batch's latencies observed at once."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from eventpipe.metrics import FewValues, RateMeter, event_type_label, observe_all, serve
from eventpipe.settings import Settings, SettingsError


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


_BOUNDS = (0.01, 0.05, 0.1, 1.0)
_latencies = st.lists(st.sampled_from(_BOUNDS) | st.floats(0, 5, allow_nan=False), max_size=40)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(sample.name, str(sorted(sample.labels.items()))): sample.value
            for metric in registry.collect() for sample in metric.samples
            if not sample.name.endswith("_created")}


@pytest.mark.parametrize("mode", ["in-process", "multiprocess"])
@given(latencies=_latencies)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_latencies_observed_at_once_read_as_observed_one_by_one(
    mode: str, latencies: list[float], tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`observe_all` writes a histogram's buckets itself: what it leaves must read exactly
    as `observe`, value by value, leaves, in a worker host's shared files as in one process
    (values on a bucket's bound included)."""
    readers = []
    for name in ("at_once", "one_by_one"):
        registry = CollectorRegistry()
        if mode == "multiprocess":
            folder = tmp_path_factory.mktemp(name)
            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
            monkeypatch.setattr(values, "ValueClass",
                                values.MultiProcessValue())  # type: ignore[no-untyped-call]
            histogram = Histogram("latency", "test", ["event_type"], buckets=_BOUNDS,
                                  registry=None)
            collector = CollectorRegistry()
            MultiProcessCollector(collector, path=str(folder))  # type: ignore[no-untyped-call]
            readers.append(collector)
        else:
            histogram = Histogram("latency", "test", ["event_type"], buckets=_BOUNDS,
                                  registry=registry)
            readers.append(registry)
        child = histogram.labels("OrderPlaced")
        if name == "at_once":
            observe_all(child, latencies)
        else:
            for latency in latencies:
                child.observe(latency)
    at_once, one_by_one = (_samples(reader) for reader in readers)
    assert at_once == pytest.approx(one_by_one)


def _listening_on(port: int) -> set[str]:
    """The IPv4 addresses a socket of this machine listens on at `port` (/proc/net/tcp)."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_metrics_listen_on_metrics_host_only() -> None:
    """Before: the bridge's and the worker hosts' /metrics listened on every interface, the
    API on WEB_HOST's 127.0.0.1 only. METRICS_HOST says where, 127.0.0.1 unless set."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    serve(port, "BRIDGE_METRICS_PORT", Settings().metrics_host, CollectorRegistry())
    assert _listening_on(port) == {"127.0.0.1"}


def test_a_metrics_host_not_of_this_machine_is_named() -> None:
    with pytest.raises(SettingsError, match=r"^METRICS_HOST=192\.0\.2\.1: .*no address of "
                                            r"this machine to listen on$"):
        serve(0, "BRIDGE_METRICS_PORT", "192.0.2.1", CollectorRegistry())


def test_a_label_whose_values_come_from_outside_has_few_of_them() -> None:
    """A hostile test's finding: 500 tasks of 500 made-up topics sent into the Celery broker
    made 500 series of `foreign_tasks_total` in the worker's metrics, and 500 error lines."""
    topics = FewValues(3)
    assert [topics.of(name) for name in ("a", "b", "a", "c", "d", "e", "b")] == [
        "a", "b", "a", "c", "(other)", "(other)", "b"]
    assert {topics.of(f"made-up-{n}") for n in range(500)} == {"(other)"}
    assert topics.of("x" * 500) == "(other)"
    assert FewValues(1).of("y" * 500) == "y" * 100

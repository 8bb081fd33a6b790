"""The fault soak, short: a hostile stream while workers, the bridge, Redis and the database
are broken on a seeded schedule; `eventpipe verify` must then find nothing lost or doubled,
and the run must end exactly as a calm run of the same stream does (issues 9 and 10).
`make soak` runs the same for ten minutes (`tests.support.soak`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from tests.support.soak import FAULTS, Soak, run


def test_a_short_soak_ends_verified_clean_and_as_a_calm_run_does(
    kafka_broker: str, tmp_path: Path,
) -> None:
    faulty = Soak(seconds=40, seed=11, rate=100, poison=0.02, fault_every_s=(2.0, 5.0),
                  outage_s=(3.0, 8.0), drain_timeout_s=300, now=datetime.now(UTC))
    said: list[str] = []
    result = run(faulty, kafka_broker, tmp_path / "faulty", say=said.append)
    print(result.summary())
    assert set(result.faults) == set(FAULTS), said  # every kind at least once
    assert result.poison > 0 and result.report.dead_lettered > 0
    assert (result.lost, result.doubled, result.stuck) == (0, 0, {}), result.summary()
    assert result.passed, result.summary()
    assert result.report.ambiguous == []

    calm = run(replace(faulty, faults=False), kafka_broker, tmp_path / "calm")
    assert calm.passed and sum(calm.faults.values()) == 0, calm.summary()
    assert calm.outcome is not None and result.outcome is not None
    assert calm.outcome.users == result.outcome.users
    assert calm.outcome.orders == result.outcome.orders
    assert calm.outcome.payments == result.outcome.payments
    assert calm.outcome.inventory == result.outcome.inventory
    assert calm.outcome.dead_letters == result.outcome.dead_letters
    assert len(calm.outcome.users) > 100 and len(calm.outcome.dead_letters) > 10

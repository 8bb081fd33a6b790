"""The pipeline's state as operators see it: `GET /status`, `eventpipe status`, the console.

Every process that moves events says what it is doing, about once a second, in one Redis hash
per consumer group (`{group}:status`, a field per process): the bridge its partitions
(committed offset, high watermark, events in flight, paused, why and since when, events lost
to Kafka's retention and offsets skipped below its log start whose count waits), each worker
process the partition queues it consumes, how long ago it applied a batch of each, and its
events per second by type. Each entry is stamped with the Redis server's clock (as the offset
ledger's leases are) and ages are relative, so hosts whose clocks disagree look neither dead
nor alive for it. A process not heard from for `STALE_S` is out of the view, and out of the
hash after `FORGET_S`. `collect` adds what only Redis and SQL know at the moment of asking:
each queue's depth and the dead letters open, by error class and by event type.

`assemble` is pure: the view, and the problems an operator must act on (no bridge, partitions
no worker consumes, a partition consumed by two workers, partitions still being assigned
after a minute, batches the Celery broker refused, events lost to Kafka's retention in the
last hour, skipped offsets whose count waits), from what was read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Engine, func, select

from eventpipe.broker_queues import QueueDepths, Unanswered
from eventpipe.dlq.letter import OPEN
from eventpipe.errors import NO_REDIS_DATABASE, no_redis_database, redis_database
from eventpipe.metrics import event_type_label
from eventpipe.redis_clients import decoded
from eventpipe.settings import Settings
from eventpipe.tables import dead_letters
from eventpipe.terminal import printable
from eventpipe.times import utc_iso

log = logging.getLogger(__name__)

BRIDGE = "bridge"
WORKER = "worker"
PUBLISH_EVERY_S = 1.0
STALE_S = 10.0
FORGET_S = 300.0
STUCK_S = 120.0  # tasks waiting and no batch for this long: the worker is stuck
LOSS_NAMED_S = 3600.0  # events lost to retention are a problem this long (as the alert)
# A partition still being assigned after this long waits on something that does not answer.
ASSIGNING_S = 60.0

# Why a bridge keeps a partition unread (`pausedFor`), and what ends it.
PAUSE_CAUSES = {
    "backpressure": "MAX_IN_FLIGHT_PER_PARTITION events in flight; read again once half are done",
    "draining": "tasks of an earlier reading still wait in its queue; read once workers take "
                "them, or none was taken for REDELIVERY_TIMEOUT_S",
    "assigning": "just assigned: read once its committed offset, the topic's id and what the "
                 "database holds of it are known and the offset ledger holds no marks of an "
                 "earlier topic",
    "broker": "the Celery broker refused a batch; sent again at each sync, read once it is "
              "taken",
    "stopping": "the bridge is stopping",
}

# KEYS: the hash. ARGV: field, JSON. Stamps the entry with the server's clock.
_PUBLISH = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1] .. '.' .. string.format('%06d', t[2]) .. ' ' .. ARGV[2])
return 1
"""


def process_name() -> str:
    """How a process is named on the board, in logs and in the fate record: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Member:
    """One process's last word: its role, its name (host:pid), how long ago, what it said."""

    role: str
    name: str
    age_s: float
    said: Mapping[str, Any]


class Board:
    """The hash every process publishes to, and reads the others from."""

    def __init__(self, client: redis.Redis, group: str) -> None:
        self.client = client
        self.key = f"{group}:status"
        self._publish = client.register_script(_PUBLISH)

    def publish(self, role: str, name: str, said: Mapping[str, Any]) -> None:
        self._publish(keys=[self.key], args=[f"{role} {name}", json.dumps(said)])

    def leave(self, role: str, name: str) -> None:
        self.client.hdel(self.key, f"{role} {name}")

    def members(self) -> list[Member]:
        """The processes heard from within `STALE_S`; older entries past `FORGET_S`, and
        entries no version of this code wrote, go."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hgetall(self.key)
            (seconds, micros), entries = pipe.execute()
        now = seconds + micros / 1e6
        alive, forgotten = [], []
        for raw_field, raw_value in entries.items():
            try:
                entry, value = decoded(raw_field), decoded(raw_value)
            except UnicodeDecodeError:  # not ours either: deleted by its bytes
                forgotten.append(raw_field)
                continue
            member = _member(entry, value, now)
            if member is None or member.age_s > FORGET_S:
                forgotten.append(raw_field)
            elif member.age_s <= STALE_S:
                alive.append(member)
        if forgotten:
            self.client.hdel(self.key, *forgotten)
        return sorted(alive, key=lambda m: (m.role, m.name))


def _numbered(key: object) -> bool:
    """A partition's number as the bridges write it: ASCII digits (`"²".isdigit()` too)."""
    return isinstance(key, str) and key.isascii() and key.isdigit()


def _member(entry: str, value: str, now: float) -> Member | None:
    """An entry read back, its word checked field by field: None if it is not one."""
    role, _, name = entry.partition(" ")
    stamp, _, raw = value.partition(" ")
    try:
        stamped = float(stamp)
        said = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the stack
        return None
    # A stamp of `inf` would be no age at all: never stale, never forgotten.
    if role not in (BRIDGE, WORKER) or not isinstance(said, dict) or not math.isfinite(stamped):
        return None
    age = max(0.0, now - stamped)
    checked: dict[str, Any] = {}
    if role == BRIDGE:
        topic = said.get("topic")
        if isinstance(topic, str) and len(topic) <= _TOPIC_MAX:
            checked["topic"] = topic
        partitions = said.get("partitions")
        checked["partitions"] = {
            str(p): {k: v for k, v in fields.items() if _fits(k, v)}
            for p, fields in (partitions.items() if isinstance(partitions, dict) else ())
            if _numbered(p) and isinstance(fields, dict)}
    else:
        queues, served, rates = said.get("queues"), said.get("served"), said.get("rates")
        checked["queues"] = [p for p in queues if _count(p)] if isinstance(queues, list) else []
        checked["served"] = {str(p): ago for p, ago in served.items()
                             if _numbered(p) and _amount(ago)} if isinstance(
                                 served, dict) else {}
        checked["rates"] = {str(kind): rate for kind, rate in rates.items()
                            if _amount(rate)} if isinstance(rates, dict) else {}
    return Member(role, name, round(age, 3), checked)


def _fits(name: str, value: Any) -> bool:
    check = _BRIDGE_FIELDS.get(name)
    return check is not None and (value is None or check(value))


def _cause(value: Any) -> bool:
    return isinstance(value, str) and value in PAUSE_CAUSES


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


WHY_MAX = 500  # characters of a Kafka client's error a bridge says
_TOPIC_MAX = 249  # Kafka's longest topic name


def _why(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= WHY_MAX


# Kafka's offsets are 64-bit: a larger number, or an infinity, is none a process said.
_LARGEST = 2**63


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _LARGEST


def _amount(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and 0 <= value < _LARGEST


_BRIDGE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "committed": _count, "highWatermark": _count, "inFlight": _count, "queued": _count,
    "paused": _flag, "pausedFor": _cause, "pausedS": _amount, "lost": _count, "skipped": _count,
    "lostAgoS": _amount, "stuckS": _amount, "unreadableAt": _count, "unreadableWhy": _why,
    "stalledS": _amount, "pastEndS": _amount}


# -- the view --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    committed: int | None  # the bridge's last commit: every event below it is done
    high_watermark: int | None  # the offset after the last message Kafka holds
    lag: int | None
    in_flight: int | None  # handed to Celery, not yet done
    queued: int | None  # tasks waiting in the partition's queue
    paused: bool | None  # the bridge stopped reading it
    paused_for: str | None  # why (`PAUSE_CAUSES`)
    paused_s: float | None  # for how long
    lost: int | None  # events Kafka deleted before the bridge read them, no task applied
    lost_ago_s: float | None  # since the last of them were counted
    skipped: int | None  # offsets skipped below Kafka's log start, whose count waits
    # For how long Kafka has handed over nothing of it while holding messages past its
    # reading; and a record batch it cannot hand over whose end is not found yet, and why.
    stuck_s: float | None
    unreadable_at: int | None
    unreadable_why: str | None
    # For how long none of its events in flight was done, while some are.
    stalled_s: float | None
    # For how long its committed offset has been past the end of Kafka's log.
    past_end_s: float | None
    bridge: str | None
    workers: list[str]  # the worker processes consuming its queue
    last_batch_ago_s: float | None
    last_batch_by: str | None


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    name: str
    seen_ago_s: float
    partitions: list[int]
    events_per_second: float


@dataclass(frozen=True, slots=True)
class DlqStatus:
    open: int  # as SQL records them
    in_stream: int  # entries the operators' stream holds
    by_error_class: dict[str, int]
    by_event_type: dict[str, int]


@dataclass(frozen=True, slots=True)
class Status:
    at: datetime
    topic: str
    group: str
    partitions: list[PartitionStatus]
    bridges: list[ProcessStatus]
    workers: list[ProcessStatus]
    events_per_second: dict[str, float]
    dlq: DlqStatus
    problems: list[str] = field(default_factory=list)


def assemble(at: datetime, topic: str, group: str, partition_count: int,
             members: Sequence[Member], queued: Mapping[int, int], dlq: DlqStatus) -> Status:
    """The view from what was read; `queued` holds the queue depths that could be measured."""
    bridges = [m for m in members if m.role == BRIDGE]
    workers = [m for m in members if m.role == WORKER]
    reported: dict[int, tuple[Member, Mapping[str, Any]]] = {}
    for bridge in sorted(bridges, key=lambda m: -m.age_s):  # the freshest word wins
        for key, said in bridge.said.get("partitions", {}).items():
            reported[int(key)] = (bridge, said)
    # Those a bridge reads beyond the count this host was given too (a stale KAFKA_PARTITIONS
    # here): shown, and named among the problems.
    partitions = [_partition(p, reported.get(p), workers, queued)
                  for p in sorted(set(range(partition_count)) | reported.keys())]
    rates: dict[str, float] = {}
    for worker in workers:
        for kind, rate in worker.said.get("rates", {}).items():
            rates[kind] = round(rates.get(kind, 0.0) + rate, 3)
    return Status(
        at=at, topic=topic, group=group, partitions=partitions,
        bridges=[_process(m, sorted(int(p) for p in m.said.get("partitions", {})), 0.0)
                 for m in bridges],
        workers=[_process(m, sorted(m.said.get("queues", [])),
                          sum(m.said.get("rates", {}).values())) for m in workers],
        events_per_second=dict(sorted(rates.items())), dlq=dlq,
        problems=_elsewhere(bridges, topic, partition_count) + problems(partitions, bridges,
                                                                        workers))


def _elsewhere(bridges: Sequence[Member], topic: str, partition_count: int) -> list[str]:
    """Bridges that read another topic than this host's settings name, or partitions past
    their count: the view's figures are theirs, not what the settings say."""
    found = []
    for bridge in bridges:
        read = bridge.said.get("topic")
        if read is not None and read != topic:
            found.append(f"bridge {bridge.name} reads topic {read!r}, not KAFKA_TOPIC={topic!r} "
                         "as here: the figures are its topic's")
        if beyond := sorted(p for p in map(int, bridge.said.get("partitions", {}))
                            if p >= partition_count):
            found.append(f"bridge {bridge.name} reads partition{'s' * (len(beyond) > 1)} "
                         f"{spans(beyond)}, beyond KAFKA_PARTITIONS={partition_count} here: "
                         "set it to the topic's count")
    return found


def problems(partitions: Sequence[PartitionStatus], bridges: Sequence[Member],
             workers: Sequence[Member]) -> list[str]:
    """What an operator must act on, one line each."""
    found = []
    if not bridges:
        found.append("no bridge is running: nothing is read from Kafka")
    elif unread := [p.partition for p in partitions if p.bridge is None]:
        found.append(f"{_these(unread)} read by no bridge")
    if not workers:
        found.append("no worker is running: no event is applied")
    elif idle := [p.partition for p in partitions if not p.workers]:
        found.append(f"{_these(idle)} consumed by no worker: their events wait in the queue")
    if assigning := [p.partition for p in partitions if p.paused_for == "assigning"
                     and (p.paused_s or 0) > ASSIGNING_S]:
        found.append(f"{_these(assigning)} not read for over {ASSIGNING_S:.0f} s since "
                     "assigned: the bridge cannot learn the committed offsets or the topic's id "
                     "from Kafka, what the database holds of them, or clear the offset ledger "
                     "in Redis (its log says which)")
    if refused := [p.partition for p in partitions if p.paused_for == "broker"]:
        found.append(f"{_these(refused)} paused: the Celery broker refused "
                     f"{'its batch' if len(refused) == 1 else 'their batches'} (is it up, or "
                     "full?)")
    for p in partitions:
        if p.workers and p.queued and (p.last_batch_ago_s or 0) > STUCK_S:
            found.append(f"partition {p.partition} has {p.queued} task(s) queued and no batch "
                         f"for {p.last_batch_ago_s:.0f} s: is {', '.join(p.workers)} stuck?")
        if len(p.workers) > 1:
            found.append(f"partition {p.partition} is consumed by {len(p.workers)} workers "
                         f"({', '.join(p.workers)}): its batches may be applied out of order")
        if p.lost and p.lost_ago_s is not None and p.lost_ago_s < LOSS_NAMED_S:
            found.append(f"partition {p.partition}: {p.lost:,} event(s) lost, the last within "
                         "the hour: Kafka's retention deleted them before the bridge read "
                         "them, and no task applied them (the bridge's log line 'events lost' "
                         "names their offsets)")
        if p.skipped:
            found.append(f"partition {p.partition}: {p.skipped:,} offset(s) skipped below the "
                         "start of Kafka's log (deleted by its retention): lost unless a task "
                         "sent before applies them, counted once none can")
        if p.in_flight and p.stalled_s is not None and p.stalled_s > STUCK_S:
            found.append(f"partition {p.partition}: {p.in_flight:,} event(s) in flight and "
                         f"none done for {p.stalled_s:.0f} s: their batches fail again and "
                         "again (the database?), or the offset ledger in Redis cannot be read "
                         "(the workers' and the bridge's logs say which)")
        if p.stuck_s is not None and p.stuck_s > STUCK_S:
            found.append(f"partition {p.partition}: Kafka holds messages up to offset "
                         f"{_number(None if p.high_watermark is None else p.high_watermark - 1)}"
                         f" but has handed none over for {p.stuck_s:.0f} s: " + (
                             f"it cannot hand over the record batch at offset "
                             f"{p.unreadable_at} ({p.unreadable_why}), whose end it does not "
                             "say" if p.unreadable_at is not None else
                             "a message larger than the consumer may fetch, or a record batch "
                             "the Kafka client cannot read? (docs/operations.md)"))
        if p.past_end_s is not None and p.past_end_s > STUCK_S:
            found.append(f"partition {p.partition}: its committed offset {_number(p.committed)} "
                         f"is past the end of Kafka's log (offset {_number(p.high_watermark)}) "
                         f"for {p.past_end_s:.0f} s: the log was cut (an unclean leader "
                         "election, a restore), or the offset set by hand; Apache Kafka's "
                         "client reads it again from the log's start, but on a broker that "
                         "answers with nothing the events written below it are not read "
                         "until its position is lowered (docs/operations.md)")
    return found


def _these(partitions: Sequence[int]) -> str:
    return (f"partition {partitions[0]} is" if len(partitions) == 1
            else f"partitions {spans(partitions)} are")


def spans(numbers: Iterable[int]) -> str:
    """`0-3,7` for 0, 1, 2, 3, 7: how `--partitions` spells a set of partitions."""
    ordered = sorted(set(numbers))
    runs: list[list[int]] = []
    for n in ordered:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _partition(partition: int, reported: tuple[Member, Mapping[str, Any]] | None,
               workers: Sequence[Member], queued: Mapping[int, int]) -> PartitionStatus:
    bridge, said = reported if reported is not None else (None, {})
    committed, high = said.get("committed"), said.get("highWatermark")
    last: tuple[float, str] | None = None
    for worker in workers:
        ago = worker.said.get("served", {}).get(str(partition))
        if ago is not None and (last is None or worker.age_s + ago < last[0]):
            last = (round(worker.age_s + ago, 3), worker.name)
    return PartitionStatus(
        partition=partition, committed=committed, high_watermark=high,
        lag=max(0, high - committed) if committed is not None and high is not None else None,
        in_flight=said.get("inFlight"),
        queued=queued.get(partition, said.get("queued")),
        paused=said.get("paused"), paused_for=said.get("pausedFor"),
        paused_s=_aged(said.get("pausedS"), bridge), lost=said.get("lost"),
        lost_ago_s=_aged(said.get("lostAgoS"), bridge),
        skipped=said.get("skipped"), stuck_s=_aged(said.get("stuckS"), bridge),
        unreadable_at=said.get("unreadableAt"), unreadable_why=said.get("unreadableWhy"),
        stalled_s=_aged(said.get("stalledS"), bridge),
        past_end_s=_aged(said.get("pastEndS"), bridge), bridge=bridge.name if bridge else None,
        workers=[w.name for w in workers if partition in w.said.get("queues", [])],
        last_batch_ago_s=last[0] if last else None, last_batch_by=last[1] if last else None)


def _aged(seconds: float | None, member: Member | None) -> float | None:
    """A duration a process said, as of now: its word is `age_s` old."""
    return None if seconds is None or member is None else round(seconds + member.age_s, 1)


def _process(member: Member, partitions: list[int], rate: float) -> ProcessStatus:
    return ProcessStatus(member.name, member.age_s, partitions, round(rate, 3))


# -- reading it --------------------------------------------------------------------------------


def collect(settings: Settings, engine: Engine, client: redis.Redis,
            broker: QueueDepths | None) -> Status:
    """The status now. `broker` reads the Celery broker's queue depths (None: a broker that
    cannot be asked; the bridge's last measure is shown then, as when the broker does not
    answer, and a problem says so)."""
    members = Board(client, settings.kafka_group_id).members()
    queued: dict[int, int] = {}
    unanswered = []
    if broker is not None:
        try:
            queued = broker.read(range(settings.kafka_partitions))
        except Unanswered as exc:
            log.warning("the Celery broker does not answer: %s", exc)
            unanswered.append(f"{_broker_unanswered(exc, settings)}: queue depths are the "
                              "bridge's last measure")
    status = assemble(datetime.now(UTC), settings.kafka_topic, settings.kafka_group_id,
                      settings.kafka_partitions, members, queued,
                      dlq_status(engine, client, settings.dlq_stream))
    status.problems[:0] = unanswered
    return status


def _broker_unanswered(exc: Unanswered, settings: Settings) -> str:
    """Why the broker could not be asked, as the other commands say it. Its URL stays out:
    `GET /status` asks no token, and the URL holds the broker's host and password."""
    if exc.__cause__ is not None and no_redis_database(exc.__cause__):
        number = max(redis_database(url) for url in settings.celery_broker_url.split(";"))
        return f"CELERY_BROKER_URL: {NO_REDIS_DATABASE.format(number=number)}"
    return f"the Celery broker does not answer ({exc.kind})"


def dlq_status(engine: Engine, client: redis.Redis, stream: str) -> DlqStatus:
    with engine.connect() as conn:
        rows = conn.execute(
            select(dead_letters.c.error_class, dead_letters.c.event_type, func.count())
            .where(dead_letters.c.state == OPEN)
            .group_by(dead_letters.c.error_class, dead_letters.c.event_type)).all()
    by_class: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for error_class, event_type, count in rows:
        by_class[error_class] = by_class.get(error_class, 0) + count
        # A poison message's type is whatever its bytes said: the contract's types only.
        kind = event_type_label(event_type)
        by_type[kind] = by_type.get(kind, 0) + count
    return DlqStatus(open=sum(by_class.values()), in_stream=int(client.xlen(stream)),
                     by_error_class=dict(sorted(by_class.items())),
                     by_event_type=dict(sorted(by_type.items())))



# -- for a terminal ----------------------------------------------------------------------------


def render(status: Status) -> str:
    """The status as `eventpipe status` prints it to a terminal. Names, problems and kinds
    come from what other processes wrote into Redis: each is shown on its one line, escapes
    spelled out (`eventpipe.terminal`)."""
    lines = [f"topic {_shown(status.topic)}, group {_shown(status.group)}, "
             f"at {utc_iso(status.at, 'seconds')}"]
    lines += [f"problem: {_shown(problem)}" for problem in status.problems] or ["no problems"]
    lines.append("")
    header = ("partition", "committed", "high", "lag", "in flight", "queued", "paused",
              "bridge", "worker", "last batch")
    rows = [tuple(_shown(cell) for cell in (
                str(p.partition), _number(p.committed), _number(p.high_watermark),
                _number(p.lag), _number(p.in_flight), _number(p.queued),
                (p.paused_for or "paused") if p.paused else "", p.bridge or "-",
                ", ".join(p.workers) or "-",
                f"{_ago(p.last_batch_ago_s)} by {p.last_batch_by}" if p.last_batch_by else "-"))
            for p in status.partitions]
    lines += _table(header, rows, right=range(1, 6))
    lines.append("")
    for role, processes in (("bridge", status.bridges), ("worker", status.workers)):
        lines += [f"{role:6}  {_shown(p.name)}  seen {_ago(p.seen_ago_s)}, partitions "
                  f"{spans(p.partitions) or '-'}"
                  + (f", {p.events_per_second:g} events/s" if role == "worker" else "")
                  for p in processes]
    rates = ", ".join(f"{_shown(kind)} {rate:g}"
                      for kind, rate in status.events_per_second.items())
    lines.append(f"events/s: {rates or 'none'}")
    dlq = status.dlq
    lines.append(f"dead letters: {dlq.open} open ({dlq.in_stream} in the stream)"
                 + (": " + ", ".join(f"{_shown(k)} {n}" for k, n in dlq.by_error_class.items())
                    if dlq.open else ""))
    return "\n".join(lines)


def _shown(text: str) -> str:
    return printable(text, one_line=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           right: Iterable[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    aligned = set(right)
    return ["  ".join(cell.rjust(width) if i in aligned else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in (header, *rows)]


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "now" if seconds < 1 else f"{seconds:.0f} s ago"

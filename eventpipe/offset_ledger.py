"""The offset ledger in Redis: which Kafka offsets are done, and which are spoken for.

Workers write it, the bridge reads it. An offset is *done* once its event's fate (applied,
stale, duplicate, held, dead-lettered) is committed in SQL; only then may the bridge commit
past it. An offset is *leased* while a worker holds it (a batch in progress, a batch waiting
to retry after a failure of the world): the bridge does not re-read a leased offset while its
lease lives. Offsets that are neither, for too long, were lost on the way (a worker killed,
the Celery broker's queue flushed) and the bridge reads them again from Kafka.

Leases are written and judged by one clock, the Redis server's (`TIME` inside the scripts),
so a worker whose clock is off cannot make a lease last an hour or expire on arrival.

Losing the ledger costs nothing but work: the bridge re-reads from its last commit and the
events come back as duplicates.

It also remembers, per partition, which range of offsets each run of a worker is applying
right now, until the run ends. A run that finds an unfinished range overlapping its own knows
the process applying it died (`begin` counts how many times in a row), which is how a message
that kills its worker is isolated and, in the end, dead-lettered
(`eventpipe.failures.after_crashes`). A dead run's record stays while other batches of the
partition are applied, until a run takes its messages up again.

Keys, per consumer group, topic and partition: `{prefix}:{group}:done-ranges:{topic}:{p}`
and `…:lease-ranges:…` (sorted sets of ranges of offsets, `"<first>-<last>"`, scored by the
last offset and by the lease deadline in Redis time); `…:recorded-ranges:…`, the same done
ranges again, marked by workers that record the ranges of offsets they give fates in the
database too (`eventpipe.positions.record_done`): a bridge looks there for those it takes
for done, and takes those of workers of a version before for done unchecked, so that an
upgrade is never taken for work the database lost (a bridge of that version reads
`done-ranges` alone, and commits on as before); `…:runs:…` (a hash: `"<first> <last>
<run>"` → deaths before that run); `{prefix}:{group}:topic-ids:{topic}`, the ids the topic's
ledger was filed under (for `forget`). The topic is named with Kafka's id of it (`filed_under`),
which the bridge reads as it is given partitions and sends with each task: a topic deleted
and made again under its name starts a ledger of its own, and a task of the earlier topic run
late (an unacknowledged task handed out again, a retry's countdown) marks nothing of the new
topic's offsets, which the bridge would commit past unapplied.

A batch's offsets are one range, or a few: Redis keeps a member per range, not per offset
(one offset a member cost Redis two thirds of its CPU under load, a sorted-set insert per
offset twice). A lease left on a range of which some offsets are done is harmless: the
bridge asks about leases only for offsets not done. The keys are not those of the ledger of
one member per offset, which older bridges read: during an upgrade neither kind of process
sees the other's marks, which costs redeliveries (duplicates), never a commit past work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from eventpipe.redis_clients import decoded
from eventpipe.spans import spans, uncovered

_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# What the scripts share. ARGV[from..to] are ranges of offsets, "<first>-<last>", throughout.
_STEPS = _NOW + """
local function hold(lease, until_time, from)
  for i = from, #ARGV, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #ARGV) do
      args[#args + 1] = until_time
      args[#args + 1] = ARGV[j]
    end
    redis.call('ZADD', lease, unpack(args))
  end
end

local function mark_done(done, recorded, lease, from, to)
  for i = from, to, 500 do
    local members, scores = {}, {}
    for j = i, math.min(i + 499, to) do
      scores[#scores + 1] = string.match(ARGV[j], '(%d+)$')
      scores[#scores + 1] = ARGV[j]
      members[#members + 1] = ARGV[j]
    end
    redis.call('ZADD', done, unpack(scores))
    redis.call('ZADD', recorded, unpack(scores))
    redis.call('ZREM', lease, unpack(members))
  end
end
"""

# KEYS[1] lease zset. ARGV[1] seconds to live, ARGV[2..] ranges.
_LEASE = _STEPS + """
hold(KEYS[1], now + tonumber(ARGV[1]), 2)
return now
"""

# KEYS[1] lease zset. ARGV[1] seconds to live, ARGV[2..] ranges: the leases of these ranges
# that are there, made to last at least that long; a lease that lasts longer is kept, and one
# that is gone (marked done, forgotten with its topic) is not made again.
_EXTEND = _NOW + """
local until_time = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < until_time then
    redis.call('ZADD', KEYS[1], until_time, ARGV[i])
  end
end
return now
"""

# KEYS: done zset, recorded zset, lease zset. ARGV[1] = number of done ranges, then the done
# ranges, then pairs (range, seconds to live) of leases to renew.
_SETTLE = _STEPS + """
local count = tonumber(ARGV[1])
mark_done(KEYS[1], KEYS[2], KEYS[3], 2, count + 1)
for i = count + 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[i + 1]), ARGV[i])
end
return now
"""

# KEYS: triples (done zset, recorded zset, lease zset) per partition. ARGV: the low mark of
# each partition. Returns, per partition, {done ranges ending at or after low, recorded ones,
# ranges with a live lease}.
_READ = _NOW + """
local result = {}
for i = 1, #ARGV do
  local done = redis.call('ZRANGEBYSCORE', KEYS[3 * i - 2], ARGV[i], '+inf')
  local recorded = redis.call('ZRANGEBYSCORE', KEYS[3 * i - 1], ARGV[i], '+inf')
  local leased = redis.call('ZRANGEBYSCORE', KEYS[3 * i], now, '+inf')
  result[i] = {done, recorded, leased}
end
return result
"""

# KEYS: triples (done zset, recorded zset, lease zset). ARGV: the committed offset of each
# partition.
_TRIM = _NOW + """
for i = 1, #ARGV do
  redis.call('ZREMRANGEBYSCORE', KEYS[3 * i - 2], '-inf', '(' .. ARGV[i])
  redis.call('ZREMRANGEBYSCORE', KEYS[3 * i - 1], '-inf', '(' .. ARGV[i])
  redis.call('ZREMRANGEBYSCORE', KEYS[3 * i], '-inf', '(' .. now)
end
return now
"""

# The records of runs, in a hash per partition: "<first> <last> <run>" → deaths before it.
_RUNS = """
local function drop_run(runs, run)
  local suffix = ' ' .. run
  for _, name in ipairs(redis.call('HKEYS', runs)) do
    if string.sub(name, -#suffix) == suffix then
      redis.call('HDEL', runs, name)
    end
  end
end

local function record(runs, name, deaths, ttl)
  redis.call('HSET', runs, name, deaths)
  redis.call('EXPIRE', runs, ttl)
end
"""

# KEYS: runs hash, lease zset. ARGV: first, last, this run's record name, seconds records
# live, seconds leases live, a run to forgive ('' for none), then the ranges to lease. Records
# overlapping ours are of runs whose process died: returns the range of the one that died
# most and how many times, and takes them up into ours. The forgiven run's are no death more
# than it had found: it ended alive, but the ledger did not answer its end.
_BEGIN = _STEPS + _RUNS + """
hold(KEYS[2], now + tonumber(ARGV[5]), 7)
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local mine = redis.call('HGET', KEYS[1], ARGV[3])
if mine then
  -- This run began already and its answer was lost: say again what it found (over its own
  -- range: the dead run's record is gone), and count no death for its own record.
  -- A count that is no number (a hand edit) is none: never an error for every batch.
  local found = tonumber(mine) or 0
  if found > 0 then return {first, last, found} end
  return {}
end
local result = {}
local count = 0
local names = redis.call('HGETALL', KEYS[1])
for i = 1, #names, 2 do
  local f, l, r = string.match(names[i], '^(%d+) (%d+) (.+)$')
  if f and first <= tonumber(l) and last >= tonumber(f) then
    -- The forgiven run's deaths are the ones it had found, no more; a record whose count is
    -- no number is of no run of ours: it goes, and counts no death.
    local before = tonumber(names[i + 1])
    local deaths = before and before + (r == ARGV[6] and 0 or 1) or 0
    if deaths > count then
      count = deaths
      result = {tonumber(f), tonumber(l), deaths}
    end
    redis.call('HDEL', KEYS[1], names[i])
  end
end
record(KEYS[1], ARGV[3], count, ARGV[4])
return result
"""

# KEYS: runs hash. ARGV: the run, its new record name, deaths before it, seconds it lives.
_NARROW = _RUNS + """
drop_run(KEYS[1], ARGV[1])
record(KEYS[1], ARGV[2], ARGV[3], ARGV[4])
return 0
"""

# KEYS: runs hash, done zset, recorded zset, lease zset. ARGV: the run, a record to leave in
# its place ('' for none), its deaths, seconds it lives, then the ranges done. Marks them done
# and removes the run's record: only the run's own, not one another process wrote since.
_FINISH = _STEPS + _RUNS + """
mark_done(KEYS[2], KEYS[3], KEYS[4], 5, #ARGV)
drop_run(KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  record(KEYS[1], ARGV[2], ARGV[3], ARGV[4])
end
return 0
"""

RUNNING_TTL_S = 86_400
_BLIP_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3)
_DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES = "done-ranges", "recorded-ranges", "lease-ranges"
_BEFORE_RANGES = ("done", "lease")  # the keys of a member per offset, of earlier versions


def filed_under(topic: str, topic_id: str) -> str:
    """The name the ledger keeps a topic's marks under: with Kafka's id of the topic, or alone
    where there is none ("": a broker before topic ids, a task from a bridge before them).
    Kafka's topic names hold no `@`."""
    return f"{topic}@{topic_id}" if topic_id else topic



def ranges(offsets: Iterable[int]) -> list[str]:
    """The offsets as the fewest ranges, `"<first>-<last>"`, in order."""
    return [f"{first}-{last}" for first, last in spans(offsets)]


def offsets_of(members: Iterable[bytes | str], low: int = 0,
               high: int | None = None) -> set[int]:
    """Every offset of these ranges from `low` to `high` (included: the last the reader waits
    for; past it nothing is its business, and a range any longer would be only memory)."""
    found: set[int] = set()
    for first, last in _spans_of(members):
        found.update(range(max(first, low), (last if high is None else min(last, high)) + 1))
    return found


def _spans_of(members: Iterable[bytes | str]) -> Iterator[tuple[int, int]]:
    """The ranges as (first, last). A member that is none (written by hand, or by something
    that is no worker: "abc", "-5--5") marks nothing: left out, never read as a number."""
    for member in members:
        first, _, last = decoded(member).partition("-")
        if first.isascii() and first.isdigit() and last.isascii() and last.isdigit() \
                and int(first) <= int(last):
            yield int(first), int(last)


def count_covered(members: Iterable[bytes | str], first: int, end: int) -> int:
    """How many offsets from `first` to `end` (excluded) these ranges cover, however they
    overlap: counted on the ranges, never offset by offset."""
    if end <= first:
        return 0
    held = list(_spans_of(members))
    return end - first - uncovered([(first, end - 1)], held)


class Marks(NamedTuple):
    """What the ledger says of a partition's offsets from a low mark on."""

    done: set[int]
    leased: set[int]  # held by a live lease, and not done
    # Done, by workers of a version before the ranges of offsets recorded in the database
    # (`eventpipe.positions.record_done`): the database cannot vouch for them.
    unrecorded: set[int]


@dataclass(frozen=True, slots=True)
class Crashed:
    """A range of offsets whose processes died applying it, `deaths` times in a row."""

    first: int
    last: int
    deaths: int

    def deaths_of(self, offset: int) -> int:
        return self.deaths if self.first <= offset <= self.last else 0


class OffsetLedger:
    def __init__(self, client: redis.Redis, group: str, prefix: str = "eventpipe") -> None:
        self.client = client
        self.base = f"{prefix}:{group}"
        self._lease = client.register_script(_LEASE)
        self._extend = client.register_script(_EXTEND)
        self._settle = client.register_script(_SETTLE)
        self._read = client.register_script(_READ)
        self._trim = client.register_script(_TRIM)
        self._begin = client.register_script(_BEGIN)
        self._narrow = client.register_script(_NARROW)
        self._finish = client.register_script(_FINISH)

    def _key(self, kind: str, topic: str, partition: int) -> str:
        return f"{self.base}:{kind}:{topic}:{partition}"

    def lease(self, topic: str, partition: int, offsets: Iterable[int], ttl_s: float) -> None:
        """Hold `offsets` for `ttl_s` seconds of Redis time."""
        members = ranges(offsets)
        if members:
            self._lease(keys=[self._key(_LEASE_RANGES, topic, partition)], args=[ttl_s, *members])

    def extend(self, topic: str, partition: int, offsets: Iterable[int], ttl_s: float) -> None:
        """Make the lease `lease` gave `offsets` (the same offsets) last at least `ttl_s`
        seconds of Redis time: one that lasts longer already is kept, and one that is gone
        (the offsets done, or forgotten) is not made again."""
        members = ranges(offsets)
        if members:
            self._extend(keys=[self._key(_LEASE_RANGES, topic, partition)], args=[ttl_s, *members])

    def settle(self, topic: str, partition: int, done: Iterable[int],
               leases: Mapping[int, float] | None = None, *, recorded: bool = True) -> None:
        """Mark `done` offsets and renew `leases` (offset → seconds to live), atomically.
        `recorded`: the ranges of the offsets are recorded in the database with their fates;
        False only for a worker with no database (`bench.noop_worker`)."""
        done_members = ranges(done)
        by_ttl: dict[float, list[int]] = {}
        for offset, ttl in (leases or {}).items():
            by_ttl.setdefault(ttl, []).append(offset)
        renewals: list[Any] = [value for ttl, offsets in by_ttl.items()
                               for member in ranges(offsets) for value in (member, ttl)]
        if done_members or renewals:
            self._settle(keys=self._keys(topic, partition, _DONE_RANGES,
                                         _RECORDED_RANGES if recorded else _DONE_RANGES,
                                         _LEASE_RANGES),
                         args=[len(done_members), *done_members, *renewals])

    def _keys(self, topic: str, partition: int, *kinds: str) -> list[str]:
        return [self._key(kind, topic, partition) for kind in kinds]

    def read(self, topic: str, lows: Mapping[int, int],
             highs: Mapping[int, int] | None = None) -> dict[int, Marks]:
        """For each partition, what the ledger says of its offsets from its low mark on, to
        its high one (included) if given."""
        if not lows:
            return {}
        keys = [key for p in lows
                for key in self._keys(topic, p, _DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES)]
        replies: Any = self._read(keys=keys, args=list(lows.values()))
        found = {}
        for (partition, low), (done_ranges, recorded_ranges, leased_ranges) in zip(
                lows.items(), replies, strict=True):
            high = highs.get(partition) if highs else None
            done = offsets_of(done_ranges, low, high)
            # A lease is released as the range it was taken for: what of it is done is not
            # held any more.
            # Compared as members first: a worker of this version marks the same in both.
            legacy = set(done_ranges) - set(recorded_ranges)
            unrecorded = offsets_of(legacy, low, high) - offsets_of(recorded_ranges, low, high) \
                if legacy else set()
            found[partition] = Marks(done, offsets_of(leased_ranges, low, high) - done,
                                     unrecorded)
        return found

    def applied_or_held(self, topic: str, partition: int, first: int, end: int) -> int:
        """How many of the partition's offsets from `first` to `end` (excluded) are done, or
        held by a live lease (a worker applying them, a retry waiting)."""
        [(done, _, leased)] = self._read(
            keys=self._keys(topic, partition, _DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES),
            args=[first])
        return count_covered([*done, *leased], first, end)

    def forget(self, topic: str, partitions: Iterable[int]) -> None:
        """Drop everything known of these partitions (`topic` as `filed_under` names it):
        done marks, leases, running ranges, and those of the ledger of one member per offset
        (`_BEFORE_RANGES`), whose marks would otherwise outlive a topic recreated here,
        should this version be rolled back; and those filed under the topic's name alone or
        under the ids of its earlier topics, which a bridge rolled back or given no id would
        read. The ids a topic's ledger was filed under are recorded here (with no partitions:
        only that)."""
        name, _, topic_id = topic.partition("@")
        ids = f"{self.base}:topic-ids:{name}"
        if topic_id:
            self.client.sadd(ids, topic_id)
        chosen = list(partitions)
        if not chosen:
            return
        filed = {name, *(filed_under(name, decoded(i)) for i in self.client.smembers(ids))}
        self.client.delete(*(self._key(kind, where, p) for p in chosen for where in filed
                             for kind in (_DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES,
                                          "runs", *_BEFORE_RANGES)))

    def trim(self, topic: str, committed: Mapping[int, int]) -> None:
        """Forget the done ranges that end below each committed offset (Kafka remembers
        those offsets for us) and leases that have expired."""
        if committed:
            keys = [key for p in committed for key in self._keys(
                topic, p, _DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES)]
            self._trim(keys=keys, args=list(committed.values()))

    def begin(self, topic: str, partition: int, offsets: Sequence[int], ttl_s: float, *,
              run: str, forgive: str = "") -> Crashed | None:
        """Lease `offsets` for `ttl_s` seconds and record that `run` (a name no other run
        has) is applying them, in one round trip. When earlier runs at overlapping ranges never
        finished, their processes died: the range of the one that died most, and how many times
        in a row; but `forgive`'s, a run that ended alive while the ledger did not answer.
        Tried again over a blip of the connection: a failure there would leave the record
        behind, which the next attempt would count as one more death."""
        keys = [self._key("runs", topic, partition), self._key(_LEASE_RANGES, topic, partition)]
        args: list[int | float | str] = [offsets[0], offsets[-1],
                                         f"{offsets[0]} {offsets[-1]} {run}", RUNNING_TTL_S,
                                         ttl_s, forgive, *ranges(offsets)]
        # Asked again over a blip: a script that ran and whose answer was lost knows its run.
        found: Any = _BLIP_RETRY.call_with_retry(lambda: self._begin(keys=keys, args=args),
                                                 lambda _error: None)
        return Crashed(int(found[0]), int(found[1]), int(found[2])) if found else None

    def narrow(self, topic: str, partition: int, first: int, last: int, deaths: int, *,
               run: str) -> None:
        """Record that `run` now applies first..last on its own, and how many times processes
        died applying it already: if it dies now, the next attempt knows where."""
        self._narrow(keys=[self._key("runs", topic, partition)],
                     args=[run, f"{first} {last} {run}", deaths, RUNNING_TTL_S])

    def finish(self, topic: str, partition: int, done: Iterable[int] = (), *, run: str,
               owed: Crashed | None = None) -> None:
        """Mark `done` offsets done and remove `run`'s record, in one round trip; with `owed`,
        leave instead the deaths `begin` found, as they were before it counted this run, for
        the attempt that takes up the messages left. Being idempotent, it is tried again over
        a blip of the connection: lost, the marks would cost the whole batch again as
        duplicates."""
        keys = self._keys(topic, partition, "runs", _DONE_RANGES, _RECORDED_RANGES, _LEASE_RANGES)
        left = (f"{owed.first} {owed.last} owed", owed.deaths - 1) if owed else ("", 0)
        args: list[int | str] = [run, *left, RUNNING_TTL_S, *ranges(done)]
        _BLIP_RETRY.call_with_retry(lambda: self._finish(keys=keys, args=args),
                                      lambda _error: None)

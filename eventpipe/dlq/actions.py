"""What operators do to dead letters — replay and purge — one path for the CLI and the API.

Replay publishes an entry's original key and value back to the topic and partition it was
read from; the pipeline then decides the message afresh (a dead letter that fails again
reopens with its earlier life kept as an episode: the SQL record holds the history, no
message header carries it). It works in chunks: each entry is claimed in SQL first (`open` →
`replaying`), and only if its letter last failed when the entry says, so two replays running
at once never publish the same entry twice, nor the second the first's copy that failed
again; each entry leaves the stream, and becomes `replayed`, once Kafka acknowledged its own
message; one that Kafka refused goes back to `open`, and the others of its chunk are not held
back. Kafka refusing a message itself (larger than the topic takes, a topic it refuses) is told
apart from Kafka not acknowledging in time: a replay of it again fails alike, so it is said with
Kafka's reason, never as a wait to retry. A replayer that dies leaves its claims to lapse
(`REPLAY_CLAIM_S`): the reconciler returns them to the DLQ. A held event replayed while what
holds it still does (its parent still missing, its email still another's) comes back too:
its copy is a duplicate, which changes nothing, and the next reconciler round, which every
replay's end queues its entity for, finds it still held and its letter gone, and reopens it.
A replay can be bounded, by a number of entries or a deadline: it then says whether entries
were left, and hands its caller the entries it is done with, chunk by chunk (the API's
replays over several calls, `eventpipe.dlq.replays`, go on past them).

Purge deletes entries for good (`purged` in SQL, kept there as the event's fate): Kafka
handing the same message over again leaves it purged; only a new copy of it, at another
offset, is a new dead letter. An entry a replay has claimed is the replay's, and left to it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from confluent_kafka import KafkaError, KafkaException, Message
from sqlalchemy import Engine

from eventpipe import metrics, reconcile
from eventpipe.dlq import projection, records
from eventpipe.dlq.letter import OPEN, REPLAYING
from eventpipe.dlq.stream import DeadLetterStream, Filter, StreamEntry
from eventpipe.effects import Position
from eventpipe.errors import TransientError
from eventpipe.kafka import MessageReader, make_producer
from eventpipe.messages import RawMessage
from eventpipe.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 500
FLUSH_TIMEOUT_S = 10.0
# How long a replay waits for Kafka to tell a topic's partitions, whatever its publisher's
# wait for acknowledgements (the command line's is longer): "does not answer" comes this soon.
ANSWER_TIMEOUT_S = 10.0
REPLAY_CLAIM_S = 300.0
# What Kafka answers of a topic it does not have, or whose name it refuses.
_NO_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_EXCEPTION})
# A message's answer until Kafka's comes (`Publisher.flush` serves every one it waited out).
_UNANSWERED = KafkaError(KafkaError._MSG_TIMED_OUT)
# Kafka refuses a record batch too large for the topic whole, each of its messages with it.
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
# What Kafka, or its client before sending, answers about the message itself: the same message
# is refused alike however often it is sent again (until the topic's bounds or ACLs change).
_REFUSED_FOR_GOOD = _TOO_LARGE | frozenset({
    KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION, KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.INVALID_REQUIRED_ACKS, KafkaError._INVALID_ARG,
    # A topic Kafka does not have (librdkafka's too, once its metadata says so for long).
    KafkaError._UNKNOWN_TOPIC})


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Replayed:
    replayed: int = 0
    refused: int = 0  # Kafka did not acknowledge them: back in the DLQ
    rejected: int = 0  # Kafka refuses the messages themselves: back in the DLQ, and a replay
    # again fails alike (`why_rejected`: the first one's reason)
    why_rejected: str | None = None
    skipped: int = 0  # not open any more (another replay has them, or they are gone), or
    # failed again since they were read: left in the DLQ for a later replay
    no_bytes: int = 0  # in neither the stream nor Kafka (its retention passed, or it did not
    # answer): back in the DLQ
    more: bool = False  # it stopped at its limit or deadline with entries left to replay


class Publisher:
    """A producer for one replay that reports each message's own delivery."""

    def __init__(self, settings: Settings, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        # Compressed: Kafka bounds a topic's messages as they are sent (max.message.bytes), and
        # a message its producer compressed must come back within the bound it was taken in.
        self.producer = make_producer(settings, **{"message.timeout.ms": int(timeout_s * 1000),
                                                   "compression.type": "zstd"})
        self._partitions: dict[str, int | None] = {}  # topic → partitions now (`_count`)
        self._reader: MessageReader | None = None  # made when an entry lacks its bytes
        self._unread = False  # Kafka did not answer a read: the rest go without theirs

    def answers(self, topic: str | None) -> None:
        """Raise a `TransientError` unless Kafka tells this topic's partitions, asked before
        anything is claimed: a Kafka that does not answer would cost each chunk of a replay
        the whole wait (ten minutes for 30,000 letters, past any HTTP server's timeout) and
        hold its letters claimed meanwhile, for nothing. One that stops answering later makes
        the rest refused, as it always did."""
        if self._count(topic or self.settings.kafka_topic) is None:
            # The setting, not its value: the API answers with this line.
            raise TransientError("Kafka does not answer at KAFKA_BOOTSTRAP_SERVERS: nothing "
                                 "was replayed; retry once it does")

    def with_bytes(self, entry: StreamEntry) -> StreamEntry | None:
        """The entry with its message's bytes: the DLQ shows none of a message larger than
        DLQ_MAX_BYTES, nor of one rebuilt while Kafka was away, but Kafka may still have it
        at its position. None when it does not, or holds another message there (a topic
        made anew), which must not be published in its place."""
        if entry.raw is not None:
            return entry
        if self._unread:  # each read would wait as long again: this replay asks no more
            return None
        if self._reader is None:
            self._reader = MessageReader(self.settings, timeout_s=self.timeout_s)
        try:
            message = projection.fetched(self._reader.fetch, entry.letter)
        except TransientError as exc:
            log.warning("bytes of %s not read from Kafka (nor those of the rest of this "
                        "replay): %s", entry.letter.dlq_key, exc)
            self._unread = True
            return None
        return None if message is None else StreamEntry.of(entry.letter, message)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def publish(self, entry: StreamEntry, done: Callable[[KafkaError | None], None]) -> None:
        """Send the entry's message; `done` is told Kafka's error, or None once it took it."""
        sent_at = time.monotonic()

        def report(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                metrics.KAFKA_PRODUCE.observe(time.monotonic() - sent_at)
            done(error)

        topic = entry.letter.position.topic or self.settings.kafka_topic
        if self._count(topic) == 0:  # sent, it would wait out the timeout, at every call again
            done(KafkaError(KafkaError._UNKNOWN_TOPIC, f"Kafka has no topic {topic!r}"))
            return
        try:
            message = entry.raw
            assert message is not None  # `with_bytes` is asked first
            self.producer.produce(topic, value=message.value, key=message.key,
                                  headers=list(message.headers) or None, on_delivery=report,
                                  partition=self._partition(topic, entry.letter.position))
        except (KafkaException, BufferError) as exc:  # refused before it left: not sent
            log.warning("replay of %s not sent: %s", entry.letter.dlq_key, exc)
            done(exc.args[0] if isinstance(exc, KafkaException)
                 else KafkaError(KafkaError._QUEUE_FULL))
        self.producer.poll(0)

    def _partition(self, topic: str, position: Position) -> int:
        """Where the message was read, as the original was, rather than where librdkafka's
        hash of its key (or chance, without one) would put it; -1, the partitioner's choice,
        when none was recorded or the topic no longer has it (made anew with fewer)."""
        if position.partition is None:
            return -1
        return position.partition if position.partition < (self._count(topic) or 0) else -1

    def _count(self, topic: str) -> int | None:
        """How many partitions the topic has (0: no such topic); None when Kafka did not
        answer, or not of it (its leader being elected, say). Asked once per topic and replay,
        answered or not: a Kafka that does not answer would otherwise cost every entry the
        whole wait."""
        if topic not in self._partitions:
            try:
                found = self.producer.list_topics(
                    topic, timeout=min(self.timeout_s, ANSWER_TIMEOUT_S)).topics.get(topic)
            except KafkaException:
                self._partitions[topic] = None
            else:
                error = None if found is None else found.error
                self._partitions[topic] = \
                    0 if found is None or (error is not None and error.code() in _NO_TOPIC) \
                    else None if error is not None else len(found.partitions)
        return self._partitions[topic]

    def flush(self) -> None:
        """Wait for Kafka; what it did not take in time is dropped (and reported refused)
        rather than sent later behind the caller's back."""
        if self.producer.flush(self.timeout_s):
            self.producer.purge()
            self.producer.flush(0)  # serve the purged messages' reports


def replay(engine: Engine, stream: DeadLetterStream, entries: Iterable[StreamEntry],
           publisher: Publisher, *, now: Callable[[], datetime] = _utc_now,
           progress: Callable[[int], None] | None = None, limit: int | None = None,
           deadline: float | None = None,
           done: Callable[[list[StreamEntry]], None] | None = None) -> Replayed:
    """Replay `entries`, in chunks of `CHUNK`: all of them, or the first `limit`, or those it
    gets to before `deadline` (`time.monotonic()`): past it, it takes none but the first (so
    that calls made again get through a DLQ of any size), and reads no message's bytes from
    Kafka but the first's. `done` is handed each chunk's entries it is done with, replayed
    or not (refused, without bytes, another replay's); `more` says whether entries were
    left."""
    result = Replayed()
    chunk: list[StreamEntry] = []
    taken = 0
    try:
        for entry in entries:
            full = limit is not None and taken >= limit
            late = deadline is not None and taken > 0 and time.monotonic() >= deadline
            if full or late:
                result.more = True
                break
            if not taken:  # once, before anything is claimed
                publisher.answers(entry.letter.position.topic)
            chunk.append(entry)
            taken += 1
            if len(chunk) >= CHUNK:
                _replay_chunk(engine, stream, chunk, publisher, now, result, progress,
                              deadline, done, first=taken == len(chunk))
                chunk = []
        if chunk:
            _replay_chunk(engine, stream, chunk, publisher, now, result, progress, deadline,
                          done, first=taken == len(chunk))
    finally:
        publisher.close()
    return result


def _with_kept(entry: StreamEntry, kept: Mapping[str, RawMessage]) -> StreamEntry:
    message = kept.get(entry.letter.dlq_key)
    if entry.raw is not None or message is None:
        return entry
    return StreamEntry.of(entry.letter, message)


def _replay_chunk(engine: Engine, stream: DeadLetterStream, chunk: list[StreamEntry],
                  publisher: Publisher, now: Callable[[], datetime], result: Replayed,
                  progress: Callable[[int], None] | None, deadline: float | None = None,
                  done: Callable[[list[StreamEntry]], None] | None = None, *,
                  first: bool = True) -> None:
    """Claim the chunk's letters in one transaction, publish them, then end the claims in
    one transaction per outcome: a transaction per letter made a large replay take minutes
    on a database that syncs each commit to disk. Past `deadline`, the letters whose bytes
    only Kafka has are left (back in the DLQ, for a later call), but the replay's first
    (`first`: the chunk begins the replay), so that it gets through one."""
    claim = now() + timedelta(seconds=REPLAY_CLAIM_S)
    with engine.begin() as conn:
        # Each letter as its entry showed it (the first, for a key named twice).
        shown = {entry.letter.dlq_key: entry.letter.last_failure_at for entry in reversed(chunk)}
        claimed = records.claim_for_replay(conn, list(shown), claim, shown)
        # Entries shown without their bytes: SQL may keep them (`records.keep_messages`),
        # where Kafka's retention may have passed.
        kept = records.kept_messages(conn, [e.letter.dlq_key for e in chunk if e.raw is None])
    if kept:
        chunk = [_with_kept(entry, kept) for entry in chunk]
    answers: dict[str, KafkaError | None] = {}  # Kafka's error, None once it took it
    sent: dict[str, StreamEntry] = {}
    no_bytes: list[str] = []
    left: set[str] = set()
    for place, entry in enumerate(chunk):
        key = entry.letter.dlq_key
        if key not in claimed or key in answers or key in no_bytes or key in left:
            result.skipped += 1  # another replay's, gone, or named twice
        elif entry.raw is None and (place or not first) and deadline is not None \
                and time.monotonic() >= deadline:
            left.add(key)  # a read from Kafka may wait long: not in this call
        elif (whole := publisher.with_bytes(entry)) is None:
            no_bytes.append(key)
        else:
            answers[key], sent[key] = _UNANSWERED, whole
            publisher.publish(whole, _recorder(answers, key))
    publisher.flush()
    if len(sent) > 1:  # sent again one at a time: a message is refused for its own size only
        for key in [key for key, error in answers.items()
                    if error is not None and error.code() in _TOO_LARGE]:
            publisher.publish(sent[key], _recorder(answers, key))
            publisher.flush()
    published = [key for key, error in answers.items() if error is None]
    rejected = {key: error for key, error in answers.items()
                if error is not None and error.code() in _REFUSED_FOR_GOOD}
    refused = [key for key, error in answers.items() if error is not None and key not in rejected]
    # What Kafka took first: a failure there is the caller's (those claims lapse, and the
    # reconciler returns the letters to the DLQ though their copies are out), while the
    # others' claims lapse back to the DLQ anyway, as if the replayer had died.
    for key in _end_claims(engine, published, now, claim, published=True):
        stream.remove(key)  # the others' claims lapsed, and their entries may be live again
    try:
        _end_claims(engine, [*no_bytes, *refused, *rejected, *left], now, claim,
                    published=False)
    except Exception as exc:
        log.warning("claims of %d letters not published not ended (they lapse in %.0f s): "
                    "%s", len(no_bytes) + len(refused) + len(rejected) + len(left),
                    REPLAY_CLAIM_S, exc)
    for key, error in rejected.items():
        log.error("replay of %s refused by Kafka for the message itself, which stays in the "
                  "DLQ (a replay again fails alike): %s", key, error.str(),
                  extra={"dlqKey": key, "kafkaError": error.name()})
        result.why_rejected = result.why_rejected or error.str()
    result.no_bytes += len(no_bytes)
    result.refused += len(refused)
    result.rejected += len(rejected)
    result.replayed += len(published)
    result.more = result.more or bool(left)
    if done is not None:
        done([entry for entry in chunk if entry.letter.dlq_key not in left])
    if progress is not None:
        progress(len(chunk))


def _end_claims(engine: Engine, keys: list[str], now: Callable[[], datetime],
                claim: datetime, *, published: bool) -> list[str]:
    """End a replay's claims on these letters (not published: back in the DLQ), and queue
    their entities for the next reconciler round, which evaluates them again: the claims hid
    the letters from the rounds, so a parent may have come meanwhile; and a replayed event
    still held (its copy is a duplicate, which changes nothing) must have its letter live
    again. The keys whose claims were still this replay's."""
    if not keys:
        return []
    with engine.begin() as conn:
        ended = records.finish_replay(conn, keys, now(), published=published, claim=claim)
        reconcile.queue_entities(conn, ended.values(), now())
    return list(ended)


def _recorder(answers: dict[str, KafkaError | None],
              key: str) -> Callable[[KafkaError | None], None]:
    def record(error: KafkaError | None) -> None:
        answers[key] = error

    return record


@dataclass(slots=True)
class UntilNow:
    """The entries matching `where` of the letters in the DLQ when this began, each once.
    The stream is read as the caller goes (for minutes, on a large DLQ), and an entry
    changes its place meanwhile: put again (the stream rebuilt, a claim given back), or a
    letter failing again (a duplicate of its message, the replayed copy of one a replay
    took), it comes back at the stream's end. Taken by key, not by place, such a letter
    comes once, and one that failed only after this began not at all.

    With `fresh_only`, for a replay, a letter that failed again since this began is passed
    over and counted (`passed_over`), left for a later replay, as the API's replays leave it:
    two replays at once would otherwise both publish it, the second its copy that failed
    after the first's. Failed again: another revision than when this began, and a last
    failure since then (by the Redis server's clock: a claim given back changes the one,
    not the other)."""

    stream: DeadLetterStream
    where: Filter
    fresh_only: bool = False
    passed_over: int = 0

    def __iter__(self) -> Iterator[StreamEntry]:
        began = self.stream.server_time()
        wanted = self.stream.revisions()
        scanned = iter(self.stream.scan(self.where))
        while part := list(itertools.islice(scanned, CHUNK)):
            # An entry does not hold its letter's revision: the index does, as it is now.
            now = self.stream.revisions([entry.letter.dlq_key for entry in part]) \
                if self.fresh_only else {}
            for entry in part:
                key = entry.letter.dlq_key
                if key not in wanted:
                    continue
                then = wanted.pop(key)
                if self.fresh_only and then is not None and then != now.get(key) \
                        and entry.letter.last_failure_at >= began:
                    self.passed_over += 1
                    continue
                yield entry
            if not wanted:
                return


@dataclass(slots=True)
class Purged:
    deleted: int = 0
    replaying: int = 0  # a replay in progress has them: out once Kafka takes them, else back


def purge(engine: Engine, stream: DeadLetterStream, entries: Iterable[StreamEntry],
          now: Callable[[], datetime] = _utc_now) -> Purged:
    result = Purged()
    chosen = list(entries)
    for start in range(0, len(chosen), CHUNK):  # a transaction a chunk, as replays
        keys = list(dict.fromkeys(entry.letter.dlq_key for entry in chosen[start:start + CHUNK]))
        with engine.begin() as conn:
            found = records.purge(conn, keys, now())
        for key in keys:
            if found.get(key) == REPLAYING:
                result.replaying += 1
                continue
            # An entry SQL does not hold as open is a stray of the projection: removed too.
            result.deleted += stream.remove(key) or found.get(key) == OPEN
    return result

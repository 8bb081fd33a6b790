"""The delivery ledger in Redis: which Kafka offsets are done, and which are spoken for.

Workers write it, the bridge reads it. An offset is *done* once its event is durably applied
(or was a duplicate/stale) or dead-lettered; only then may the bridge commit past it. An
offset is *leased* while a worker holds it (a batch in progress, a retry waiting for its
parent or for the database): the bridge does not re-read a leased offset while its lease
lives. Offsets that are neither, for too long, were lost on the way (a worker killed, the
Celery broker's queue flushed) and the bridge reads them again from Kafka.

Keys, per topic and partition: `{prefix}:done:{topic}:{p}` and `{prefix}:lease:{topic}:{p}`,
sorted sets of offsets (scored by offset, and by lease deadline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis


class DeliveryLedger:
    def __init__(self, client: redis.Redis, prefix: str = "eventpipe") -> None:
        self.client = client
        self.prefix = prefix

    def _done(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:done:{topic}:{partition}"

    def _lease(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:lease:{topic}:{partition}"

    def claim(self, topic: str, partition: int, worker: str, ttl_s: float) -> str | None:
        """Record `worker` as the one serving the partition; the previous one, if another.

        Only one worker should serve a partition (its events are then applied in order);
        a different previous owner that is still alive means two do.
        """
        previous = self.client.set(f"{self.prefix}:owner:{topic}:{partition}", worker,
                                   px=max(1, int(ttl_s * 1000)), get=True)
        if previous is None:
            return None
        text = previous.decode() if isinstance(previous, bytes) else str(previous)
        return None if text == worker else text

    def lease(self, topic: str, partition: int, offsets: Iterable[int], until: float) -> None:
        mapping = {str(offset): until for offset in offsets}
        if mapping:
            self.client.zadd(self._lease(topic, partition), mapping)

    def settle(
        self, topic: str, partition: int, done: Iterable[int], leases: Mapping[int, float]
    ) -> None:
        """Mark `done` offsets and renew `leases` (offset → deadline) in one transaction."""
        done_members = {str(offset): offset for offset in done}
        lease_members = {str(offset): until for offset, until in leases.items()}
        with self.client.pipeline(transaction=True) as pipe:
            if done_members:
                pipe.zadd(self._done(topic, partition), done_members)
                pipe.zrem(self._lease(topic, partition), *done_members)
            if lease_members:
                pipe.zadd(self._lease(topic, partition), lease_members)
            pipe.execute()

    def read(
        self, topic: str, partitions: Mapping[int, int], now: float
    ) -> dict[int, tuple[set[int], set[int]]]:
        """For each partition → (done offsets ≥ its low mark, offsets with a live lease)."""
        with self.client.pipeline(transaction=False) as pipe:
            for partition, low in partitions.items():
                pipe.zrangebyscore(self._done(topic, partition), low, "+inf")
                pipe.zrangebyscore(self._lease(topic, partition), now, "+inf")
            replies = pipe.execute()
        result = {}
        for index, partition in enumerate(partitions):
            done, leased = replies[2 * index], replies[2 * index + 1]
            result[partition] = ({int(o) for o in done}, {int(o) for o in leased})
        return result

    def forget(self, topic: str, partitions: Iterable[int]) -> None:
        """Drop everything known of these partitions: done marks and leases."""
        keys = [key for p in partitions for key in (self._done(topic, p), self._lease(topic, p))]
        if keys:
            self.client.delete(*keys)

    def trim(self, topic: str, partitions: Mapping[int, int], now: float) -> None:
        """Forget done offsets below each committed offset (Kafka remembers those for us)
        and leases that have expired."""
        with self.client.pipeline(transaction=False) as pipe:
            for partition, committed in partitions.items():
                pipe.zremrangebyscore(self._done(topic, partition), "-inf", f"({committed}")
                pipe.zremrangebyscore(self._lease(topic, partition), "-inf", f"({now}")
            pipe.execute()

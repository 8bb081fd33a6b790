"""A worker that only marks its messages done: the pipeline with no database behind it, to
measure what the bridge, Celery and Redis carry on their own (`bench.pipeline_throughput`).

`celery -A bench.noop_worker worker --pool solo`, configured from the environment as the real
workers are.
"""

from __future__ import annotations

from typing import Any

from eventpipe import redis_clients
from eventpipe.offset_ledger import OffsetLedger, filed_under
from eventpipe.queues import APPLY_TASK, TOPIC_ID_HEADER, TaskMessage, make_celery, queue_name
from eventpipe.settings import get_settings

settings = get_settings()
app = make_celery(settings, main="bench-noop")
app.conf.task_queues = {queue_name(p): {"exchange": queue_name(p), "routing_key": queue_name(p)}
                        for p in range(settings.kafka_partitions)}
ledger = OffsetLedger(redis_clients.pipeline(settings.redis_url), settings.kafka_group_id)


@app.task(name=APPLY_TASK, bind=True)
def apply_events(self: Any, topic: str, partition: int, messages: list[list[Any]]) -> None:
    ledger.settle(filed_under(topic, self.request.get(TOPIC_ID_HEADER) or ""), partition,
                  [TaskMessage.from_wire(m).offset for m in messages], recorded=False)

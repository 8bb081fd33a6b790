"""What a worker says of the dead letters a committed change saved, wherever it was made (a
batch, a reconciler round): a line for each, found by its `eventId`, and one count in
`dlq_entries_total` for each that entered the DLQ.

A letter enters once, when it opens: new, at the end of its wait for a parent, or back after it
had left (resolved, replayed, purged). A copy of its event arriving again (a duplicate, a
redelivery) adds an attempt to the letter it already has: it is said, not counted again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from eventpipe import metrics
from eventpipe.dlq.letter import DeadLetter

log = logging.getLogger(__name__)


def say(letters: Iterable[DeadLetter]) -> int:
    """Log each letter and count those that entered the DLQ; how many entered."""
    entered = 0
    for letter in letters:
        context = {"eventId": letter.event_id, "eventType": letter.event_type,
                   "topic": letter.position.topic, "partition": letter.position.partition,
                   "offset": letter.position.offset, "dlqKey": letter.dlq_key,
                   "errorClass": letter.error_class, "attempt": letter.attempts,
                   "state": letter.state}
        if letter.entered:
            entered += 1
            metrics.DLQ_ENTRIES.labels(metrics.event_type_label(letter.event_type)).inc()
            log.warning("dead-lettered: %s: %s", letter.error_class, letter.reason,
                        extra=context)
        elif letter.parked:
            log.info("held until its parent arrives: %s", letter.reason, extra=context)
        elif letter.was == letter.state:
            log.info("dead letter seen again: %s", letter.error_class, extra=context)
        else:  # resolved (its condition cleared), or back from a replay that did not happen
            log.info("dead letter %s: %s", letter.state, letter.error_class, extra=context)
    return entered

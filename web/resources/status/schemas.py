"""The JSON of `GET /status` (an `eventpipe.status.Status`); `eventpipe status --json` prints
the same document."""

from __future__ import annotations

from marshmallow import fields, validate

from eventpipe.status import PAUSE_CAUSES
from web.schemas import CamelSchema, UtcDateTime


class PartitionStatusSchema(CamelSchema):
    partition = fields.Integer(required=True)
    committed = fields.Integer(required=True, allow_none=True, metadata={
        "description": "The bridge's last commit: every event below it is done"})
    high_watermark = fields.Integer(required=True, allow_none=True, metadata={
        "description": "The offset after the last message Kafka holds, as the bridge last "
                       "fetched it"})
    lag = fields.Integer(required=True, allow_none=True,
                         metadata={"description": "highWatermark - committed"})
    in_flight = fields.Integer(required=True, allow_none=True, metadata={
        "description": "Events handed to Celery and not yet done"})
    queued = fields.Integer(required=True, allow_none=True, metadata={
        "description": "Tasks waiting in the partition's Celery queue"})
    paused = fields.Boolean(required=True, allow_none=True, metadata={
        "description": "The bridge stopped reading it; `pausedFor` says why"})
    paused_for = fields.String(
        required=True, allow_none=True, validate=validate.OneOf(list(PAUSE_CAUSES)),
        metadata={"description": "Why the bridge keeps it unread, null while it reads it: "
                                 + "; ".join(f"`{cause}`: {meaning}"
                                             for cause, meaning in PAUSE_CAUSES.items())})
    paused_s = fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds it has been paused; `problems` names a partition still "
                       "`assigning` after a minute"})
    lost = fields.Integer(required=True, allow_none=True, metadata={
        "description": "Events Kafka's retention deleted before the bridge read them and no "
                       "task applied, counted since this bridge was given the partition "
                       "(Prometheus keeps the history: `bridge_events_lost_to_retention_total`"
                       " and the alert EventpipeEventsLostToRetention)"})
    lost_ago_s = fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds since the last of them were counted; `problems` names them "
                       "for an hour"})
    skipped = fields.Integer(required=True, allow_none=True, metadata={
        "description": "Offsets the reading skipped below the start of Kafka's log whose "
                       "count waits: lost unless a task sent before applies them"})
    stuck_s = fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds Kafka has handed over nothing of it while holding messages "
                       "past its reading; `problems` names it past two minutes"})
    unreadable_at = fields.Integer(required=True, allow_none=True, metadata={
        "description": "The offset of a record batch Kafka cannot hand over, whose end the "
                       "bridge has not found yet"})
    unreadable_why = fields.String(required=True, allow_none=True, metadata={
        "description": "Why Kafka's client cannot hand that batch over"})
    stalled_s = fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds none of its events in flight was done, while some are; "
                       "`problems` names it past two minutes"})
    past_end_s = fields.Float(required=True, allow_none=True, metadata={
        "description": "Seconds its committed offset has been past the end of Kafka's log (a "
                       "log cut, or an offset set by hand: the events written below it are not "
                       "read); `problems` names it past two minutes"})
    bridge = fields.String(required=True, allow_none=True,
                           metadata={"description": "The bridge reading it (host:pid)"})
    workers = fields.List(fields.String(), required=True, metadata={
        "description": "The worker processes consuming its queue (host:pid): one, normally"})
    last_batch_ago_s = fields.Float(required=True, allow_none=True)
    last_batch_by = fields.String(required=True, allow_none=True)


class ProcessStatusSchema(CamelSchema):
    name = fields.String(required=True, metadata={"description": "host:pid"})
    seen_ago_s = fields.Float(required=True, metadata={
        "description": "Seconds since it last reported (it reports every second)"})
    partitions = fields.List(fields.Integer(), required=True, metadata={
        "description": "A bridge: the partitions it reads; a worker: the queues it consumes"})
    events_per_second = fields.Float(required=True, metadata={
        "description": "Events processed per second over the last 10 s (workers)"})


class DlqStatusSchema(CamelSchema):
    open = fields.Integer(required=True,
                          metadata={"description": "Dead letters open, as SQL records them"})
    in_stream = fields.Integer(required=True, metadata={
        "description": "Entries in the operators' Redis stream (the same, once projected)"})
    by_error_class = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    by_event_type = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class StatusSchema(CamelSchema):
    at = UtcDateTime(required=True)
    topic = fields.String(required=True)
    group = fields.String(required=True)
    partitions = fields.List(fields.Nested(PartitionStatusSchema), required=True)
    bridges = fields.List(fields.Nested(ProcessStatusSchema), required=True,
                          metadata={"description": "Bridges heard from in the last 10 s"})
    workers = fields.List(fields.Nested(ProcessStatusSchema), required=True,
                          metadata={"description": "Worker processes heard from in the last "
                                                   "10 s"})
    events_per_second = fields.Dict(keys=fields.String(), values=fields.Float(), required=True,
                                    metadata={"description": "By event type, all workers"})
    dlq = fields.Nested(DlqStatusSchema, required=True)
    problems = fields.List(fields.String(), required=True, metadata={
        "description": "What an operator must act on, one line each; empty when all is well"})

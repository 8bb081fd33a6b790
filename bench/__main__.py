"""Benchmarks that print figures: `python -m bench [validate|apply|logging|pipeline|
instructions]` (default: all but instructions). What they measure and the figures of a
2-core machine: docs/performance.md.

- validate: events parsed and validated per second, one core.
- apply:    events applied per second by `apply_batch` on SQLite and PostgreSQL, by batch size.
- logging:  the worker's rate at each log level (what per-event records cost).
- pipeline: end to end on PostgreSQL and SQLite: the pipeline as shipped, one event per task,
            the database's ceiling; latency at 1,000 events/s over the broker's own; peak
            RSS per process; CPU per message by kind of process.
- instructions: CPU instructions a worker spends per event, counted by valgrind (to compare
            two versions of the code on a noisy machine).
"""

from __future__ import annotations

import sys

from bench import apply_throughput, instructions, logging_cost, pipeline_throughput, validation


def main(argv: list[str]) -> None:
    wanted = set(argv) or {"validate", "apply", "logging", "pipeline"}
    if "validate" in wanted:
        validation.run()
    if "apply" in wanted:
        apply_throughput.run()
    if "logging" in wanted:
        logging_cost.run()
    if "pipeline" in wanted:
        pipeline_throughput.run()
    if "instructions" in wanted:
        instructions.run()


if __name__ == "__main__":
    main(sys.argv[1:])

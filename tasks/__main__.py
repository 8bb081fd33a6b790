"""`python -P -m tasks worker …`, or `python <path>/tasks/__main__.py worker …`: Celery's
command line with this package as its app, as `celery -A tasks worker …` is, whatever the
working directory holds.

Celery imports the module `-A` names with the working directory first on the path, so a
`tasks.py` or a `tasks/` there (the name Celery's own guide gives a project's tasks) would
take this package's place. Here this package is imported first, from where this file is,
and Celery takes the module already imported. `eventpipe worker` and `eventpipe up` start
their Celery processes by this file's path, which also runs again as it is when Celery
restarts a worker at SIGHUP. Celery's `--detach` and `multi` start `python -m celery`
instead, without this app: refused.
"""

import sys
from pathlib import Path

if not __package__:  # run by its path, whose directory leads the path: its project instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from celery.bin.celery import celery

import tasks  # noqa: F401  # before Celery looks in the working directory


def _detaches(args: list[str]) -> bool:
    """Whether Celery would detach (`--detach`, `-D`, however grouped: `-DE`) or run `multi`,
    as its command line parses `args`, with nothing of theirs run."""
    group = celery.make_context("celery", list(args), resilient_parsing=True)
    # The group's options, then its command, then what is left (`group.args`).
    name = args[len(args) - len(group.args) - 1] if args else None
    if name == "multi":
        return True
    command = celery.get_command(group, name) if name else None
    if command is None:
        return False
    given = command.make_context(name, list(group.args), parent=group, resilient_parsing=True)
    return bool(given.params.get("detach"))


_ARGS = sys.argv[1:]
if _detaches(_ARGS):
    sys.exit("python -m tasks: Celery's --detach and multi would start `python -m celery` "
             "without this app; run the worker under a supervisor (eventpipe worker, systemd)")
sys.exit(celery(["-A", "tasks", *_ARGS], prog_name="celery", auto_envvar_prefix="CELERY"))

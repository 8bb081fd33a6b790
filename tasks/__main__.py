"""`python -P -m tasks worker …`: Celery's command line with this package as its app, as
`celery -A tasks worker …` is, whatever the working directory holds.

Celery imports the module `-A` names with the working directory first on the path, so a
`tasks.py` or a `tasks/` there (the name Celery's own guide gives a project's tasks) would
take this package's place. Run with `-P`, which keeps the working directory off the path,
this package is imported before Celery looks, and Celery takes the module already imported.
`eventpipe worker` and `eventpipe up` start their Celery processes so.
"""

import sys

from celery.bin.celery import celery

sys.exit(celery(["-A", "tasks", *sys.argv[1:]], prog_name="celery", auto_envvar_prefix="CELERY"))

"""eventpipe: the pieces the bridge, the workers and the web API share.

Settings, the event contract, the tables, the effect of an event on the read model, the
dead-letter queue, logging and metrics live here once; `bridge`, `tasks` and `web` import them.
"""

__version__ = "0.1.0"

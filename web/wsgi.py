"""The WSGI entry point for gunicorn: `gunicorn -c web/gunicorn_conf.py web.wsgi:app`.

Each gunicorn worker imports this module after the fork, so each builds its own engine and
Redis pool (connections must never be shared across processes).
"""

from __future__ import annotations

from eventpipe import logs
from eventpipe.settings import get_settings
from web import create_app

settings = get_settings()
logs.configure("web", settings.log_level, settings.log_format)
app = create_app(settings)

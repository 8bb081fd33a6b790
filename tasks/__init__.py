"""The Celery workers that apply events to the read model: `celery -A tasks worker`."""

from tasks.app import app

__all__ = ["app"]

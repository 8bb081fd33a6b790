"""The Celery workers that apply events to the read model."""

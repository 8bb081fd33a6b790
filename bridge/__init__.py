"""The Kafka bridge: forwards each partition's events to its Celery queue and commits offsets."""

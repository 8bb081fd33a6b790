"""A RabbitMQ virtual host of its own, for a pipeline whose Celery broker is RabbitMQ.

The pipeline's Celery queues are named by partition (`events.p3`), so two pipelines on one
broker need a virtual host each, in a test as in production. The host is made and removed
with `rabbitmqctl`, beside the server the test reaches; a server that does not answer fails
the test, naming it (never a skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.services import unavailable

RABBITMQ_ADDRESS = os.environ.get("TEST_RABBITMQ_ADDRESS", "127.0.0.1:5672")


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        unavailable("rabbitmqctl", "PATH", FileNotFoundError("rabbitmqctl"))
    done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        unavailable("RabbitMQ", RABBITMQ_ADDRESS, RuntimeError(
            f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}"))


@contextmanager
def rabbitmq_vhost(user: str = "guest", password: str = "guest") -> Iterator[str]:
    """The broker URL of a new virtual host, removed with everything in it afterwards."""
    host, port = RABBITMQ_ADDRESS.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        unavailable("RabbitMQ", RABBITMQ_ADDRESS, exc)
    vhost = f"eventpipe-test-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"amqp://{user}:{password}@{RABBITMQ_ADDRESS}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)

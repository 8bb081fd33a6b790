"""Redis clients as the pipeline configures them (`eventpipe.redis_clients`), against real
Redis servers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from eventpipe import redis_clients
from launcher.embedded import start_redis
from tests.support.tcp_proxy import TcpProxy


@pytest.mark.parametrize("make", [redis_clients.pipeline, redis_clients.request,
                                  redis_clients.operator], ids=lambda make: make.__name__)
def test_a_client_left_on_a_replica_by_a_failover_writes_to_the_new_primary(
        make: Callable[[str], redis.Redis]) -> None:
    """A failover that moves the name Redis is reached by (a DNS name, a virtual address) and
    leaves the old primary up as a replica: a connection made before it still reaches the
    replica, which refuses every write, and answers the health check's PING. The refused write
    drops the connection, so the next one goes where the name leads now. (Before: the client
    kept its connection to the replica, and every write failed until the process restarted.)"""
    with start_redis() as old, start_redis() as new:
        proxy = TcpProxy("127.0.0.1", old.port)  # the name, leading to the old primary
        try:
            with redis.Redis(port=old.port) as admin:
                admin.replicaof("127.0.0.1", new.port)  # demoted by the failover
            client = make(f"redis://127.0.0.1:{proxy.port}/0")
            with pytest.raises(redis.exceptions.ReadOnlyError):
                client.set("probe", "1")
            proxy.target = ("127.0.0.1", new.port)  # the name moved; old connections stay
            assert client.set("probe", "2")
            with redis.Redis(port=new.port) as primary:
                assert primary.get("probe") == b"2"
            client.close()
        finally:
            proxy.close()

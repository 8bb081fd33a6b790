"""Ports a process is to listen on, checked before it starts: IPv4 and IPv6 alike."""

from __future__ import annotations

import socket

import pytest

from eventpipe.ports import ensure_free
from eventpipe.settings import SettingsError


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_a_port_is_free_or_named_as_taken_on_either_family(family: int, host: str) -> None:
    with socket.create_server((host, 0), family=family) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError) as caught:
            ensure_free("WEB_PORT", port, host)
        assert str(caught.value).startswith(f"WEB_PORT={port}: ")
        assert str(caught.value).endswith("another process listens there; set WEB_PORT to a "
                                          "free port")
    ensure_free("WEB_PORT", port, host)  # closed: free again
    ensure_free("WEB_PORT", 0, host)  # any


def test_a_host_that_is_no_address_of_this_machine_is_the_hosts_setting() -> None:
    with pytest.raises(SettingsError, match=r"^WEB_HOST=192\.0\.2\.1: .*no address of this "
                                            r"machine"):
        ensure_free("WEB_PORT", 8000, "192.0.2.1", host_setting="WEB_HOST")

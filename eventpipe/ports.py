"""Ports a process is to listen on. One that another process holds is a bad setting, named
in one line, before anything starts: not a traceback, nor a child that exits and leaves its
reason in a log file."""

from __future__ import annotations

import errno
import socket

from eventpipe.settings import SettingsError


def unusable(setting: str, port: int, exc: OSError, *, any_port: bool = False,
             host: str = "", host_setting: str | None = None) -> SettingsError:
    """The bad setting a failed bind on `host`:`setting`=`port` makes: a host that is no
    address of this machine is `host_setting`'s."""
    if host_setting and (_unresolved(exc) or exc.errno == errno.EADDRNOTAVAIL):
        return SettingsError(f"{host_setting}={host}: {exc.strerror or exc}: no address of "
                             "this machine to listen on")
    if exc.errno != errno.EADDRINUSE:
        return SettingsError(f"{setting}={port}: {exc.strerror or exc}: cannot listen there")
    hint = f"set {setting} to a free port" + (" (0: any)" if any_port else "")
    return SettingsError(f"{setting}={port}: {exc.strerror or exc}: another process listens "
                         f"there; {hint}")


def ensure_free(setting: str, port: int, host: str = "", *, any_port: bool = False,
                host_setting: str | None = None) -> None:
    """Raise the bad setting if nothing could listen on `host`:`port` now (0 is always free:
    the process picks one)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as werkzeug chooses
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise unusable(setting, port, exc, any_port=any_port, host=host,
                       host_setting=host_setting) from None


def _unresolved(exc: OSError) -> bool:
    """The host named no address: socket.create_server gives the resolver's error as a plain
    OSError, its errno one of getaddrinfo's EAI_* codes, which are negative."""
    return isinstance(exc, socket.gaierror) or (exc.errno is not None and exc.errno < 0)

"""Child processes that never outlive their parent, and stop in order."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send `sig` to the child when its parent dies; None
    elsewhere.

    Without it a crashed or SIGKILLed parent leaves brokers listening and workers consuming.
    Best effort: the signal fires when the *thread* that started the child exits, so start
    children from a long-lived thread (normally the main one).
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, in the parent: the hook runs between fork and exec, where loading a
    # library could deadlock on a lock held by another thread of the parent. The process's
    # own symbols (CDLL(None)) include libc's.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    number = int(sig)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, number)

    return hook


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def restart_delay(lived_s: float, last_delay_s: float) -> float:
    """How long to wait before starting again a child that exited after `lived_s` seconds:
    at once if it had run a while, else twice the last wait, from 1 s up to 30 s (one that
    dies right after starting would die again, and its log fill with the same lines)."""
    return 0.0 if lived_s > 30 else min(30.0, max(1.0, 2 * last_delay_s))

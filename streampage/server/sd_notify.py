"""A small sd_notify(3) client: newline-separated assignments in one datagram to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call does nothing. An address starting with "@" names a
Linux abstract-namespace socket (the "@" stands for a leading NUL byte).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None, _watchdog_usec(environ))

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *assignments: str) -> None:
        if self._address is None:
            return
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            # The service manager going away must not take the server down with it.
            logger.warning("sd_notify to %r failed: %s", self._address, exc)

    def status(self, text: str) -> None:
        self.send("STATUS=" + " ".join(text.split()))

    def ready(self, status: str) -> None:
        self.send("READY=1", "STATUS=" + " ".join(status.split()))

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", "STATUS=" + " ".join(status.split()))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC, when it is meant for this process (WATCHDOG_PID unset or ours)."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None

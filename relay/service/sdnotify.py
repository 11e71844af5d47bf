"""sd_notify(3) as the one datagram it is: tell systemd the service is ready, reloading, stopping.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: a filesystem path, or an abstract
socket name written with a leading ``@``. The protocol is newline-separated ``KEY=VALUE`` lines in
one ``AF_UNIX``/``SOCK_DGRAM`` datagram (see sd_notify(3)); no library is needed for that.

Not running under systemd (no variable), a vanished socket or a full queue are not errors for the
service: every function here returns False then and never raises.

The lifecycle the server follows:
- ``ready()`` once every listener is bound and the store is open (systemd then starts dependants and
  ``systemctl start`` returns);
- ``reloading()`` on SIGHUP, then ``ready()`` when the new certificate/config is in place. It sends
  ``MONOTONIC_USEC`` too, which ``Type=notify-reload`` (systemd >= 253) requires and older systemd
  ignores, so the same code is right for both;
- ``stopping()`` on SIGTERM, before the drain;
- ``status(text)`` at any time: shown by ``systemctl status``.
"""

from __future__ import annotations

import os
import socket
import time

# A send to a live notify socket never takes long; this bounds the worst case (a wedged PID 1)
# without making the call asynchronous. systemd's own sd_notify blocks likewise.
_SEND_TIMEOUT = 2.0


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@' (unix(7)).
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock:... and other forms systemd >= 254 may pass are not supported: stay silent.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to $NOTIFY_SOCKET.

    Returns True when the datagram was sent, False when there is no socket to send to or the send
    failed. Never raises for a missing or broken socket.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value or not state:
        return False
    address = _address(value)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: a status text must not be able to send READY=1.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """READY=1: listeners bound, store open (also ends a reload)."""
    msg = "READY=1"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def reloading(status_text: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC now, in microseconds), as
    ``Type=notify-reload`` expects; follow with ``ready()`` when the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = f"RELOADING=1\nMONOTONIC_USEC={usec}"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun (the drain window runs now)."""
    msg = "STOPPING=1"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def status(text: str) -> bool:
    """STATUS=...: one free-form line shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text))


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for more time in the current start/stop phase (systemd >= 236).

    The drain may use this so a long ``limits.drain_timeout`` is not cut by ``TimeoutStopSec``.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

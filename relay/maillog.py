"""The mail log: one line per event, key=value, stable (operators' tools and fail2ban read it).

Logged to the ``relaybox.mail`` logger. Values that come from clients are made safe: no spaces,
quotes, control characters or newlines survive (a login cannot forge a second log line or field).
Never pass a password or an AUTH payload here. :func:`printable` is the milder form for text
that is stored or shown whole (the audit log, remote replies, CLI tables).
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("relaybox.mail")

_UNSAFE = re.compile(r"[^\x21-\x7e]|[\"'=\\]")


def safe(value: object, limit: int = 200) -> str:
    """A client-supplied value as one token: unsafe characters become '?', long ones are cut."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    text = _UNSAFE.sub("?", text)
    return text or "-"


def printable(value: object, limit: int | None = 1000, *, ascii_only: bool = False) -> str:
    """Outside text (a login, a remote server's reply) made safe to store and to show on a
    terminal: every character that is not printable becomes '?' (C0 and C1 controls, DEL, line
    breaks and tabs, the bidi overrides and isolates and every other format character, lone
    surrogates), so nothing can start an escape sequence, forge a line or reorder what follows.
    Printable non-ASCII (an SMTPUTF8 address) is kept unless ``ascii_only``; text over ``limit``
    characters is cut and ends in "...". The audit log, outbound replies and the CLI use it."""
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return "".join(
        ch if ch.isprintable() and (ch.isascii() or not ascii_only) else "?" for ch in text
    )


def event(name: str, **fields: object) -> None:
    """``<name> k=v k=v``; field order as given."""
    parts = [name] + [f"{k}={safe(v)}" for k, v in fields.items()]
    log.info(" ".join(parts))


def auth_ok(user: str, ip: str, mech: str, which: str = "current") -> None:
    event("auth ok", user=user, ip=ip, mech=mech, password=which)


def auth_failed(user: str, ip: str, mech: str, reason: str) -> None:
    # fail2ban: ^auth failed user=\S+ ip=<HOST> (see conf/fail2ban/)
    event("auth failed", user=user, ip=ip, mech=mech, reason=reason)


def auth_throttled(ip: str, user: str = "-") -> None:
    event("auth throttled", user=user, ip=ip)


def queued(msg_id: str, sender: str, rcpt: int, size: int, user: str, ip: str) -> None:
    event("queued", id=msg_id, **{"from": sender}, rcpt=rcpt, size=size, user=user, ip=ip)


def rejected(stage: str, reason: str, ip: str, user: str = "-", **fields: object) -> None:
    event("rejected", stage=stage, reason=reason, user=user, ip=ip, **fields)


# --- delivery (relay/delivery.py, relay/bounce.py) ---


def delivered(msg_id: str, to: str, relay: str, delay: float, attempts: int) -> None:
    event("delivered", id=msg_id, to=to, relay=relay, delay=f"{delay:.2f}", attempts=attempts)


def deferred(
    msg_id: str, to: str, relay: str, delay: float, attempts: int, reply: str, retry_in: float
) -> None:
    event(
        "deferred",
        id=msg_id,
        to=to,
        relay=relay,
        delay=f"{delay:.2f}",
        attempts=attempts,
        retry_in=f"{retry_in:.0f}",
        reply=reply,
    )


def bounced(msg_id: str, to: str, relay: str, delay: float, attempts: int, reply: str) -> None:
    event(
        "bounced",
        id=msg_id,
        to=to,
        relay=relay,
        delay=f"{delay:.2f}",
        attempts=attempts,
        reply=reply,
    )


def bounce_queued(msg_id: str, dsn_id: str, to: str, failed: int) -> None:
    """A DSN (RFC 3464) for ``failed`` recipients of ``msg_id`` was queued as ``dsn_id``."""
    event("bounce queued", id=msg_id, dsn=dsn_id, to=to, failed=failed)


def bounce_dropped(msg_id: str, failed: int) -> None:
    """No DSN: the message had the null sender (RFC 5321 6.1/4.5.5, never bounce a bounce)."""
    event("bounce dropped", id=msg_id, reason="null-sender", failed=failed)

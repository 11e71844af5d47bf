"""Delivery events as Standard Webhooks (https://www.standardwebhooks.com/): pure, no I/O.

What an app receives: a POST whose body is ``{"type", "timestamp", "data"}`` (JSON) and whose
headers are ``webhook-id`` (the event's id, the same on every retry: receivers deduplicate on it),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature: v1,<base64 of
HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``, the key being the base64 after ``whsec_`` in the
endpoint's secret. So ``standardwebhooks`` (Python, Node...) and ``svix`` verify it as it is.

Every string of an event that came from outside (a remote reply, a Message-ID, an address) is
made printable here (:func:`relay.maillog.printable`) and cut; JSON escapes the rest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from relay import clock, grammar
from relay.errors import Invalid
from relay.maillog import printable

EVENT_TYPES = (
    "message.accepted",
    "message.delivered",
    "message.deferred",
    "message.bounced",
    "message.suppressed",
)
TEST_TYPE = "webhook.test"  # what `relaybox webhook test` sends (never queued)
SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
KEY_BYTES = 32
URL_LIMIT = 2000
TEXT_LIMIT = 500  # characters kept of a remote reply's text
FIELD_LIMIT = 320

_REPLY = re.compile(r"^(\d{3})(?:[ -](\d\.\d{1,3}\.\d{1,3}))?(?:[ -](.*))?$", re.S)


def new_secret() -> str:
    """``whsec_`` and 32 random bytes in base64 (the form the standard's libraries read)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def new_endpoint_id() -> str:
    return "wh_" + secrets.token_hex(8)


def new_event_id(now: float) -> str:
    """``evt_``, the time in ms (hex, so ids sort by time) and 8 random bytes."""
    return f"evt_{int(now * 1000):012x}{secrets.token_hex(8)}"


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` (Standard Webhooks, "Signature")."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, event_id, timestamp, body),
        "content-type": "application/json",
    }


def body(event_type: str, at: float, data: dict[str, Any]) -> str:
    """The JSON body; fixed when the event is written, so every retry sends the same bytes."""
    doc = {"type": event_type, "timestamp": clock.iso(at), "data": data}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)


def reply_fields(reply: str | None) -> dict[str, Any] | None:
    """``{"code": 550, "enhanced": "5.1.1", "text": "..."}`` of an SMTP reply line, or None."""
    if not reply:
        return None
    m = _REPLY.match(reply.strip())
    if m is None:
        return {"code": None, "enhanced": None, "text": printable(reply, TEXT_LIMIT)}
    text = printable((m.group(3) or "").strip(), TEXT_LIMIT)
    return {"code": int(m.group(1)), "enhanced": m.group(2), "text": text}


def message_data(
    *,
    queue_id: str | None,
    message_id: str | None,
    user: str | None,
    sender: str,
    recipient: str,
    attempt: int,
    remote_host: str | None,
    reply: str | None,
) -> dict[str, Any]:
    """The ``data`` of a message.* event: one recipient's, every key always present."""

    def text(value: str | None) -> str | None:
        return None if value is None else printable(value, FIELD_LIMIT)

    return {
        "queue_id": queue_id,
        "message_id": text(message_id),
        "user": text(user),
        "sender": text(sender),
        "recipient": text(recipient),
        "attempt": attempt,
        "remote_host": text(remote_host) or None,
        "reply": reply_fields(reply),
    }


def message_id_of(message: bytes) -> str | None:
    """The Message-ID field's value (unfolded, trimmed) of ``message``, or None."""
    fields = grammar.header_fields(message, ["Message-ID"])
    if not fields:
        return None
    return fields[0].text().strip() or None


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """``url`` if relaybox may post to it: ``https://`` with a host, or ``http://`` to loopback
    only (127.0.0.0/8, ::1, localhost: a receiver on the same box); no user:password part (it
    would be shown by ``webhook list``). Invalid otherwise, naming the rule."""
    text = url.strip()
    if not text or len(text) > URL_LIMIT or not text.isprintable() or " " in text:
        raise Invalid(f"not a URL: {printable(url, 100)!r}")
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        _port = parts.port
    except ValueError:
        raise Invalid(f"not a URL: {printable(url, 100)!r}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise Invalid(f"not an http(s) URL: {printable(url, 100)!r}")
    if parts.username is not None or parts.password is not None:
        raise Invalid("a webhook URL must not carry a user or password")
    if parts.scheme == "http" and not is_loopback(host):
        raise Invalid(f"webhook URLs must be https:// (http:// only to loopback): {text}")
    return text


def check_events(names: Iterable[str]) -> tuple[str, ...]:
    """The event types named (sorted as :data:`EVENT_TYPES`); none named: all of them."""
    wanted = {n.strip() for n in names if n.strip()}
    unknown = sorted(wanted - set(EVENT_TYPES))
    if unknown:
        raise Invalid(
            f"unknown event type(s): {', '.join(unknown)} (known: {', '.join(EVENT_TYPES)})"
        )
    return tuple(t for t in EVENT_TYPES if t in wanted) or EVENT_TYPES

"""Delivery status notifications (bounces): RFC 3464 ``multipart/report`` back to the sender.

A DSN goes to the original envelope sender from the null reverse-path ``<>`` (RFC 5321 4.5.5), and
is queued through the same spool as any message. A message whose sender is already null is itself a
notification: it never gets a DSN (RFC 5321 6.1, RFC 3464 2.1), so a bounce cannot loop.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from relay import grammar
from relay.config import Config
from relay.store import suppressions
from relay.store.db import StoreError
from relay.store.spool import DueRecipient, Message, NewMessage, Outcome
from relay.store.suppressions import Suppress

log = logging.getLogger("relaybox.delivery")

_ENHANCED = re.compile(r"^\s*\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
MAX_DIAGNOSTIC = 400  # keeps every DSN line far below RFC 5322's 998 octets
MAX_HEADERS = 64 * 1024  # the returned header block (RFC 3462 text/rfc822-headers)


@dataclass(frozen=True)
class Failure:
    """One recipient that will not be delivered."""

    address: str
    reply: str  # the remote reply ("550 5.1.1 No such user") or our own reason
    relay: str = ""  # "mx.example.com[192.0.2.7]" or "" if no server was reached
    expired: bool = False  # gave up after delivery.max_age of temporary failures
    attempted_at: float | None = None


def status_of(failure: Failure) -> str:
    """The RFC 3463 status for the DSN: the reply's enhanced code if any, else from its class."""
    if failure.expired:
        return "5.4.7"  # RFC 3463 X.4.7: delivery time expired
    m = _ENHANCED.match(failure.reply)
    if m and m.group(1).startswith("5"):
        return m.group(1)
    return "5.0.0"


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _oneline(text: str) -> str:
    text = " ".join(text.split())
    return text[:MAX_DIAGNOSTIC]


def header_block(body: bytes | None) -> bytes:
    """The original message's header fields, CRLF-terminated, as relay.grammar reads them: whole
    fields only (never a cut inside one, so never a lone CR) up to MAX_HEADERS, each name
    written the modern way ("From :" returned as "From:", the field it is). Empty when there is
    no body, or when the section has a line that is not part of a field (only a message queued
    before DATA refused those could): what the DSN returns is never read two ways."""
    if not body:
        return b""
    head = grammar.header_block(body)
    if len(head) > MAX_HEADERS:
        head = head[: _fields_end(head, MAX_HEADERS)]
    fields = grammar.header_fields(head)
    if fields is None:
        return b""
    return b"".join(f.name.encode("ascii") + b":" + f.value + b"\r\n" for f in fields)


def _fields_end(head: bytes, limit: int) -> int:
    """The end of the last whole field that ends within ``limit`` octets (0 if none does): just
    after a CRLF that the next line does not continue (a continuation starts with WSP)."""
    end = head.rfind(b"\r\n", 0, limit)
    while end >= 0 and head[end + 2 : end + 3] in (b" ", b"\t"):
        end = head.rfind(b"\r\n", 0, end)
    return end + 2 if end >= 0 else 0


def build(cfg: Config, message: Message, failures: Sequence[Failure], *, now: float) -> bytes:
    """The DSN message bytes (CRLF line endings)."""
    host = cfg.public_hostname
    boundary = f"=_relaybox_{secrets.token_hex(12)}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{message.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now)}",
        f"Message-ID: <dsn.{message.id}.{secrets.token_hex(4)}@{host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: never answered automatically
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message (RFC 3464 delivery status notification).",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"It was queued as {message.id} at {_date(message.created_at)}.",
        "",
    ]
    for f in failures:
        why = "delivery time expired, last reply: " if f.expired else ""
        lines.append(f"<{f.address}>: {why}{_oneline(f.reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Relaybox-Queue-ID: {message.id}",
        f"Arrival-Date: {_date(message.created_at)}",
    ]
    for f in failures:
        lines += ["", f"Final-Recipient: rfc822; {f.address}", "Action: failed"]
        lines.append(f"Status: {status_of(f)}")
        if f.relay:
            lines.append(f"Remote-MTA: dns; {f.relay.partition('[')[0]}")
        lines.append(f"Diagnostic-Code: smtp; {_oneline(f.reply)}")
        lines.append(f"Last-Attempt-Date: {_date(f.attempted_at or now)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return head + header_block(message.body) + f"\r\n--{boundary}--\r\n".encode("ascii")


def for_failures(
    cfg: Config, message: Message, failures: Sequence[Failure], *, now: float
) -> NewMessage | None:
    """The DSN to queue for these failures, or None when the message had the null sender."""
    if not failures or not message.sender:
        return None
    body = build(cfg, message, failures, now=now)
    return NewMessage(sender="", recipients=(message.sender,), body=body, user=None)


async def suppress(
    into: Suppress,
    codes: Sequence[str],
    msg: Message,
    rcpts: Sequence[DueRecipient],
    outcomes: Sequence[Outcome],
    now: float,
) -> None:
    """Suppress the bounced recipients whose reply says the address is bad (``codes``), for the
    sending user's domain, the one its RCPT TO is checked against (a sender of a subdomain,
    allowed by --allow-from, is its user's domain's; a DSN, sender "", never gets here).
    The outcomes are recorded already: a failure here is logged and changes nothing else.
    One write per such bounce; none for delivered or deferred mail."""
    domain = grammar.domain_part(msg.user or msg.sender)
    for r, o in zip(rcpts, outcomes, strict=True):
        code = suppressions.suppresses(o.reply, codes)
        if o.state != "bounced" or code is None:
            continue
        try:
            await into(domain, r.address, code, o.reply, now)
        except StoreError as exc:
            log.error("could not suppress %s for %s: %s", r.address, domain, exc)
        except Exception:
            log.exception("could not suppress %s for %s", r.address, domain)

"""DSN composition (RFC 3464): structure, status codes, the returned headers, no bounce loops."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from relay.config import Config
from relay.delivery import bounce
from relay.delivery.bounce import Failure
from relay.store.spool import Message

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: Report\r\n"
    b"Message-ID: <r1@example.com>\r\n\r\nsecret body text\r\n"
)


def _message(sender: str = "alice@example.com", body: bytes | None = ORIGINAL) -> Message:
    return Message("06hhgn2g03uvrjst", sender, "alice@example.com", 123, 1_800_000_000.0, body)


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def test_dsn_is_a_multipart_report(cfg: Config) -> None:
    failures = [
        Failure("bob@example.net", "550 5.1.1 No such user", "mx.example.net[192.0.2.7]"),
        Failure("carol@example.net", "552 mailbox full", "mx.example.net[192.0.2.7]"),
    ]
    new = bounce.for_failures(cfg, _message(), failures, now=1_800_000_100.0)
    assert new is not None
    assert new.sender == "" and new.recipients == ("alice@example.com",) and new.user is None
    assert b"\n" not in new.body.replace(b"\r\n", b"")  # CRLF only
    msg = _parse(new.body)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.iter_parts()
    assert "<bob@example.net>: 550 5.1.1 No such user" in text.get_content()
    assert "06hhgn2g03uvrjst" in text.get_content()
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 3  # per-message block + one per recipient
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Remote-MTA"] == "dns; mx.example.net"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert blocks[2]["Status"] == "5.0.0"  # no enhanced code in the reply: from its class
    returned = headers.get_payload()
    assert "Subject: Report" in str(returned)
    assert b"secret body text" not in new.body  # headers only (text/rfc822-headers)


def test_status_codes() -> None:
    assert bounce.status_of(Failure("a@x", "550 5.7.1 policy")) == "5.7.1"
    assert bounce.status_of(Failure("a@x", "550-5.2.2 full")) == "5.2.2"
    assert bounce.status_of(Failure("a@x", "451 4.3.0 later", expired=True)) == "5.4.7"
    assert bounce.status_of(Failure("a@x", "451 4.3.0 later")) == "5.0.0"
    assert bounce.status_of(Failure("a@x", "556 5.1.10 null MX")) == "5.1.10"


def test_never_a_bounce_for_a_bounce(cfg: Config) -> None:
    failures = [Failure("alice@example.com", "550 5.1.1 gone")]
    assert bounce.for_failures(cfg, _message(sender=""), failures, now=0) is None
    assert bounce.for_failures(cfg, _message(), [], now=0) is None


def test_long_replies_are_folded_to_one_short_line(cfg: Config) -> None:
    reply = "550 5.7.1 " + "very long explanation\r\n " * 100
    new = bounce.for_failures(cfg, _message(), [Failure("b@example.net", reply)], now=0)
    assert new is not None
    assert max(len(line) for line in new.body.split(b"\r\n")) < 998  # RFC 5322 2.1.1
    assert b"explanation very long" in new.body


def test_message_without_body_still_bounces(cfg: Config) -> None:
    new = bounce.for_failures(cfg, _message(body=None), [Failure("b@x.test", "550 no")], now=0)
    assert new is not None
    assert _parse(new.body).get_content_type() == "multipart/report"

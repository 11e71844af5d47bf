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


# --- the returned header section: whole fields, read as relay.grammar reads them (issue 12) -------


def _returned(cfg: Config, body: bytes) -> bytes:
    """The text/rfc822-headers part of the DSN for a message with this body, as sent."""
    new = bounce.for_failures(cfg, _message(body=body), [Failure("b@x.test", "550 no")], now=0)
    assert new is not None
    assert b"\n" not in new.body.replace(b"\r\n", b"")  # CRLF only: no lone CR or LF anywhere
    assert b"\r" not in new.body.replace(b"\r\n", b"")
    part = new.body.split(b"Content-Type: text/rfc822-headers\r\n\r\n", 1)[1]
    return part.rsplit(b"\r\n--", 1)[0]


def test_the_returned_header_is_cut_between_fields_never_inside_one(cfg: Config) -> None:
    """MAX_HEADERS used to cut the section at an octet count: inside a field, even between its
    CR and its LF (a lone CR in the DSN). Now the last field that does not fit is left out whole."""
    first = b"From: Alice <alice@example.com>\r\n"
    filler = b"X-Filler: " + b"f" * 80 + b"\r\n"
    count = (bounce.MAX_HEADERS - len(first)) // len(filler)
    head = first + filler * count
    # The next field is folded across the limit, and the limit falls between a CR and its LF.
    pad = bounce.MAX_HEADERS - len(head) - len(b"X-Folded: a\r\n ") - 1
    assert pad > 0
    folded = b"X-Folded: a\r\n " + b"b" * pad + b"\r\n tail\r\n"
    assert (head + folded)[bounce.MAX_HEADERS - 1 : bounce.MAX_HEADERS] == b"\r"
    body = head + folded + b"Subject: after\r\n\r\nbody\r\n"
    returned = _returned(cfg, body)
    assert returned == head
    assert len(returned) <= bounce.MAX_HEADERS


def test_a_header_that_fits_is_returned_whole(cfg: Config) -> None:
    body = b"From: a@example.com\r\nSubject: one\r\n two\r\n\r\nbody\r\n"
    assert _returned(cfg, body) == b"From: a@example.com\r\nSubject: one\r\n two\r\n"
    # A message of headers only, without a final CRLF: its last field is returned CRLF-ended.
    assert _returned(cfg, b"From: a@example.com\r\nSubject: s") == (
        b"From: a@example.com\r\nSubject: s\r\n"
    )


def test_fields_with_white_space_before_the_colon_are_returned_as_those_fields(
    cfg: Config,
) -> None:
    body = b"From : a@example.com\r\nX-Note\t: hi\r\n there\r\nSubject: s\r\n\r\nX : body\r\n"
    returned = _returned(cfg, body)
    assert returned == b"From: a@example.com\r\nX-Note: hi\r\n there\r\nSubject: s\r\n"
    headers = _parse(b"\r\n".join([returned, b"body"]))
    assert headers["From"] == "a@example.com" and headers["X-Note"] == "hi there"


def test_a_header_with_a_line_that_is_not_a_field_is_not_returned(cfg: Config) -> None:
    """Only a message queued before DATA refused such lines can have one: the DSN still goes out,
    without returning a header that a reader could take two ways."""
    body = b"From: a@example.com\r\nnot a field\r\nFrom: ceo@other.test\r\n\r\nbody\r\n"
    assert _returned(cfg, body) == b""

"""Delivery webhooks (issue 16, items 2-4), against the real server, sink and an HTTP receiver.

The server runs in the test's loop with a controllable clock, delivering to the sink; a receiver
(tests/webhookreceiver.py) on loopback gets the posts. Each event type arrives signed so that
``standardwebhooks``' own verifier accepts it and refuses it once one byte of the body changes;
a receiver answering 500 twice gets the event on the third try, with the back-off doubling on
the server's clock; one that never answers 2xx has the event failed after ``max_age``, listed
by ``webhook deliveries --failed`` and posted again, same ``webhook-id``, by ``webhook replay``.
Endpoints are added through the store or the CLI and taken up by a reload (what SIGHUP does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay import webhook
from relay.clock import ManualClock
from relay.config import Config
from relay.errors import Invalid
from relay.store import outbox, webhooks
from relay.store.webhooks import Endpoint
from relay.units import Duration
from tests import leaks
from tests.relayserver import RelayHandle, start_relay
from tests.sink import Sink
from tests.test_suppression import GONE, HARD, LOGIN, delivering, mail_log, rcpt_reply, send
from tests.webhookreceiver import Receiver, running

LATER, FINE = "later@dest.test", "fine@dest.test"


def hooked(cfg: Config, sink: Sink, **settings: Any) -> Config:
    """Delivering to the sink, with these ``[webhooks]`` settings."""
    cfg = delivering(cfg, sink)
    return dataclasses.replace(cfg, webhooks=dataclasses.replace(cfg.webhooks, **settings))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running() as r:
        yield r


@pytest.fixture
async def box(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock, sink: Sink
) -> AsyncIterator[RelayHandle]:
    cfg = hooked(relay_cfg, sink, backoff=Duration(10), max_age=Duration(30))
    handle = await start_relay(cfg, tls_files[2], clock)
    yield handle
    await handle.server.shutdown()
    handle.close()


async def add_endpoint(relay: RelayHandle, url: str, **kwargs: Any) -> Endpoint:
    """An endpoint in the store, then a reload (SIGHUP's) so that the server reads it."""
    assert relay.server.db is not None
    ep = await webhooks.add(relay.server.db, url, now=relay.clock(), actor="test", **kwargs)
    leaks.add(ep.secret)
    await relay.server.reload(relay.server.cfg, notify=False)
    return ep


async def idle(relay: RelayHandle) -> None:
    """Until the poster has nothing due, nothing in flight and every outcome recorded."""
    await relay.server.webhooks.posters[0].wait_idle()


async def rows(relay: RelayHandle) -> list[outbox.Delivery]:
    spool = relay.server.spool
    assert spool is not None
    return await outbox.deliveries(spool.db)


def verified(ep: Endpoint, body: bytes, headers: dict[str, str]) -> Any:
    return Webhook(ep.secret).verify(body, headers)


# --- pure parts ------------------------------------------------------------------------------


def test_urls_are_https_unless_on_loopback() -> None:
    for ok in (
        "https://app.example/hooks/relaybox",
        "http://127.0.0.1:8080/h",
        "http://127.9.9.9/h",
        "http://[::1]:9/h",
        "http://localhost/h",
    ):
        assert webhook.check_url(ok) == ok
    for bad in (
        "http://app.example/h",
        "http://10.0.0.1/h",
        "http://[::2]/h",
        "ftp://127.0.0.1/h",
        "https://user:pw@app.example/h",
        "https:///nohost",
        "not a url",
        "",
    ):
        with pytest.raises(Invalid):
            webhook.check_url(bad)


def test_our_signature_is_the_standard_one() -> None:
    secret = webhook.new_secret()
    body = b'{"type":"webhook.test"}'
    now = 1_800_000_000
    ours = webhook.signature(secret, "evt_1", now, body)
    assert ours.startswith("v1,")
    theirs = Webhook(secret).sign(
        "evt_1", __import__("datetime").datetime.fromtimestamp(now), body.decode()
    )
    assert ours == theirs


def test_outside_strings_in_an_event_are_printable_and_cut() -> None:
    hostile = "550 5.1.1 gone\x1b[2J\u202e\r\nX-Forged: 1 " + "x" * 2000
    data = webhook.message_data(
        queue_id="q", message_id="<a\x00b@x>\u2067", user="u@x", sender="s\n@x",
        recipient="r\x1b@x", attempt=1, remote_host="mx\x07", reply=hostile,
    )  # fmt: skip
    text = json.dumps(data, ensure_ascii=False)
    assert all(ch.isprintable() for ch in text)
    assert data["reply"]["code"] == 550 and data["reply"]["enhanced"] == "5.1.1"
    assert data["reply"]["text"].startswith("gone?[2J???X-Forged: 1 xx")
    assert len(data["reply"]["text"]) <= webhook.TEXT_LIMIT + 3
    assert (data["message_id"], data["sender"], data["recipient"]) == ("<a?b@x>?", "s?@x", "r?@x")
    assert webhook.reply_fields("no code at all") == {
        "code": None, "enhanced": None, "text": "no code at all",
    }  # fmt: skip
    assert webhook.reply_fields("421 shutting down") == {
        "code": 421, "enhanced": None, "text": "shutting down",
    }  # fmt: skip
    message = b"Subject: x\r\nMessage-ID:\r\n <folded@x>\r\n\r\nbody\r\n"
    assert webhook.message_id_of(message) == "<folded@x>"
    assert webhook.message_id_of(b"Subject: none\r\n\r\n") is None


# --- against the server ----------------------------------------------------------------------


async def test_each_event_type_arrives_signed_and_verifiable(
    box: RelayHandle, sink: Sink, receiver: Receiver, clock: ManualClock
) -> None:
    password = await box.add_user(LOGIN)
    ep = await add_endpoint(box, receiver.url)
    sink.script_rcpt(GONE, HARD)
    sink.script_rcpt(LATER, "451 4.2.0 try later")
    await send(box, password, GONE, LATER, FINE)
    assert (await rcpt_reply(box, password, GONE)).startswith("550 5.1.1 ")
    got = await receiver.wait_for(lambda reqs: len(reqs) >= 7)
    await idle(box)
    assert len(receiver.requests) == 7

    events: dict[str, list[dict[str, Any]]] = {}
    for req in got:
        assert req.method == "POST" and req.path == "/hook"
        assert req.headers["content-type"] == "application/json"
        doc = verified(ep, req.body, req.headers)  # standardwebhooks' own verifier
        assert doc["timestamp"] == datetime.fromtimestamp(clock(), UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        events.setdefault(doc["type"], []).append(doc["data"])
        tampered = bytearray(req.body)
        tampered[len(tampered) // 2] ^= 0x01  # one byte of the body changed
        with pytest.raises(WebhookVerificationError):
            verified(ep, bytes(tampered), req.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(webhook.new_secret()).verify(req.body, req.headers)  # another secret
    assert sorted(events) == sorted(webhook.EVENT_TYPES)
    assert len({r.event_id for r in got}) == 7  # one id per event

    [received] = [r for r in sink.received if r.mail_from == LOGIN]  # (and the DSN)
    mid = re.search(rb"^Message-ID: (<[^>]+>)\r$", received.data, re.M | re.I)
    assert mid is not None
    accepted = events["message.accepted"]
    assert sorted(a["recipient"] for a in accepted) == sorted([GONE, LATER, FINE])
    queue_id = accepted[0]["queue_id"]
    assert accepted[0]["reply"] == {
        "code": 250,
        "enhanced": "2.0.0",
        "text": f"queued as {queue_id}",
    }
    assert {a["attempt"] for a in accepted} == {0} and {a["remote_host"] for a in accepted} == {
        None
    }
    [bounced] = events["message.bounced"]
    remote = bounced.pop("remote_host")
    assert remote.startswith("127.0.0.1")
    assert bounced == {
        "queue_id": queue_id,
        "message_id": mid.group(1).decode(),
        "user": LOGIN,
        "sender": LOGIN,
        "recipient": GONE,
        "attempt": 1,
        "reply": {"code": 550, "enhanced": "5.1.1", "text": "no such user"},
    }
    [deferred] = events["message.deferred"]
    assert (deferred["recipient"], deferred["reply"]["code"], deferred["reply"]["enhanced"]) == (
        LATER, 451, "4.2.0",
    )  # fmt: skip
    [delivered] = events["message.delivered"]
    assert (delivered["recipient"], delivered["reply"]["code"]) == (FINE, 250)
    [suppressed] = events["message.suppressed"]
    assert suppressed["queue_id"] is None and suppressed["recipient"] == GONE
    assert suppressed["reply"]["code"] == 550 and suppressed["reply"]["enhanced"] == "5.1.1"
    assert all(d.state == "delivered" and d.attempts == 1 for d in await rows(box))
    metrics = box.server.metrics.render().decode()
    for kind in webhook.EVENT_TYPES:
        n = 3 if kind == "message.accepted" else 1
        line = f'relaybox_webhook_events_total{{outcome="delivered",type="{kind}"}} {n}.0'
        assert line in metrics


async def test_without_endpoints_nothing_is_written(
    box: RelayHandle, sink: Sink, receiver: Receiver
) -> None:
    """No endpoint, or none that wants the event (another domain, other types): no row."""
    password = await box.add_user(LOGIN)
    await box.add_domain("other.test")
    await send(box, password, FINE)
    await add_endpoint(box, receiver.url, domain="other.test")
    await add_endpoint(box, receiver.url, event_types=["message.bounced"])
    await send(box, password, FINE)
    assert await rows(box) == []
    assert receiver.requests == []


async def test_a_receiver_answering_500_twice_gets_the_event_on_the_third_try(
    box: RelayHandle, receiver: Receiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    password = await box.add_user(LOGIN)
    ep = await add_endpoint(box, receiver.url, event_types=["message.accepted"])
    receiver.script(500, 500)
    start = clock()
    await send(box, password, FINE)
    poster = box.server.webhooks.posters[0]
    for n, delay in ((1, 10), (2, 20)):  # backoff 10s, doubling, on the server's clock
        await receiver.wait_for(lambda reqs, n=n: len(reqs) >= n)
        await idle(box)
        [row] = await rows(box)
        assert (row.state, row.attempts, row.last_status) == ("pending", n, 500)
        assert row.next_attempt_at == clock() + delay
        clock.advance(delay - 1)
        poster.wake()
        await idle(box)
        assert len(receiver.requests) == n  # not due yet
        clock.advance(1)
        poster.wake()
    got = await receiver.wait_for(lambda reqs: len(reqs) >= 3)
    await idle(box)
    assert [r.status for r in got] == [500, 500, 200]
    assert len({r.event_id for r in got}) == 1  # the same webhook-id every time
    assert len({r.body for r in got}) == 1
    for r in got:
        verified(ep, r.body, r.headers)
    [row] = await rows(box)
    assert (row.state, row.attempts, row.last_status, row.event_id) == (
        "delivered", 3, 200, got[0].event_id,
    )  # fmt: skip
    assert clock() == start + 30
    failed = mail_log(caplog, "webhook failed ")
    assert failed == [
        f"webhook failed endpoint={ep.id} event={got[0].event_id} type=message.accepted"
        f" status=500 error=HTTP_500 attempt={n} next={d}s"
        for n, d in ((1, 10), (2, 20))
    ]
    metrics = box.server.metrics.render().decode()
    assert 'relaybox_webhook_events_total{outcome="retried",type="message.accepted"} 2.0' in metrics
    assert 'relaybox_webhook_outbox_backlog{spool="spool-0"}' in metrics

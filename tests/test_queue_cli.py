"""`relaybox queue ...` through Click's runner, against a real spool file."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from relay.clock import iso
from relay.config import Config
from relay.store.spool import Outcome, Spool
from tests.userhelpers import json_of

BODY = b"From: a@example.com\r\nSubject: q\r\n\r\nx\r\n"
SUMMARY_KEYS = [
    "id",
    "created_at",
    "sender",
    "user",
    "size",
    "recipients",
    "states",
    "next_attempt_at",
    "last_reply",
]


@pytest.fixture
def queue(conf: Config) -> dict[str, str]:
    """Three messages: one queued, one deferred (451), one delivered."""

    async def fill() -> dict[str, str]:
        sp = await Spool.open(conf)
        try:
            ids = {}
            for name in ("deferred", "delivered", "queued"):
                ids[name] = await sp.enqueue(
                    sender="a@example.com", recipients=[f"{name}@example.net"], body=BODY, user="u"
                )
                if name != "queued":
                    await sp.claim_due(10)
            later = time.time() + 3600
            await sp.record(
                [
                    Outcome(ids["deferred"], 0, "deferred", 451, "451 4.3.0 busy", "mx", later),
                    Outcome(ids["delivered"], 0, "delivered", 250, "250 ok", "mx"),
                ]
            )
            return ids
        finally:
            await sp.close()

    return asyncio.run(fill())


def test_empty_queue(relaybox: Any) -> None:
    assert relaybox("queue", "list").stdout.strip() == "queue is empty"
    assert json_of(relaybox("queue", "list", "--json")) == []
    stats = json_of(relaybox("queue", "stats", "--json"))
    assert stats["messages"] == 0 and stats["recipients"]["queued"] == 0


def test_list_by_state(relaybox: Any, queue: dict[str, str]) -> None:
    pending = json_of(relaybox("queue", "list", "--json"))
    assert [m["id"] for m in pending] == [queue["deferred"], queue["queued"]]
    assert list(pending[0]) == SUMMARY_KEYS
    assert pending[0]["states"] == {"queued": 0, "deferred": 1, "delivered": 0, "bounced": 0}
    assert pending[0]["last_reply"] == "451 4.3.0 busy"
    delivered = json_of(relaybox("queue", "list", "--state", "delivered", "--json"))
    assert [m["id"] for m in delivered] == [queue["delivered"]]
    assert len(json_of(relaybox("queue", "list", "--state", "all", "--json"))) == 3
    text = relaybox("queue", "list").stdout
    assert queue["deferred"] in text and "451 4.3.0 busy" in text
    bad = relaybox("queue", "list", "--state", "lost")
    assert bad.exit_code == 2


def test_show(relaybox: Any, queue: dict[str, str]) -> None:
    data = json_of(relaybox("queue", "show", queue["deferred"], "--json"))
    assert data["id"] == queue["deferred"] and data["sender"] == "a@example.com"
    [r] = data["recipients"]
    assert r["address"] == "deferred@example.net" and r["state"] == "deferred"
    assert r["attempts"] == 1 and r["last_code"] == 451 and r["in_flight"] is False
    assert r["next_attempt_at"].endswith("Z")
    text = relaybox("queue", "show", queue["deferred"]).stdout
    assert "deferred@example.net" in text and "451 4.3.0 busy" in text
    missing = relaybox("queue", "show", "nosuchmessage")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "Error: no message nosuchmessage in the queue"


def test_retry_makes_deferred_due_and_is_audited(relaybox: Any, queue: dict[str, str]) -> None:
    result = json_of(relaybox("queue", "retry", queue["deferred"], "--json"))
    assert result == {"target": queue["deferred"], "retried": 1}
    data = json_of(relaybox("queue", "show", queue["deferred"], "--json"))
    assert data["recipients"][0]["next_attempt_at"] <= _iso_soon()
    assert json_of(relaybox("queue", "retry", "--all", "--json"))["retried"] >= 0
    assert relaybox("queue", "retry").exit_code == 2
    audit = json_of(relaybox("audit", "--json"))
    assert [(e["action"], e["target"]) for e in audit][:2] == [
        ("queue.retry", "all"),
        ("queue.retry", queue["deferred"]),
    ]


def _iso_soon() -> str:

    now = iso(time.time() + 1)
    assert now is not None
    return now


def test_delete_needs_yes_and_sends_no_bounce(relaybox: Any, queue: dict[str, str]) -> None:
    refused = relaybox("queue", "delete", queue["queued"])
    assert refused.exit_code == 1 and "--yes" in refused.stderr
    assert len(json_of(relaybox("queue", "list", "--json"))) == 2
    done = relaybox("queue", "delete", queue["queued"], "--yes")
    assert done.exit_code == 0 and "no bounce" in done.stdout
    assert [m["id"] for m in json_of(relaybox("queue", "list", "--json"))] == [queue["deferred"]]
    stats = json_of(relaybox("queue", "stats", "--json"))
    assert stats["messages"] == 2  # nothing (no DSN) was queued by the delete
    audit = json_of(relaybox("audit", "--json"))
    assert audit[0]["action"] == "queue.delete" and audit[0]["target"] == queue["queued"]


def test_stats(relaybox: Any, queue: dict[str, str]) -> None:
    stats = json_of(relaybox("queue", "stats", "--json"))
    assert list(stats) == [
        "messages",
        "pending_messages",
        "recipients",
        "in_flight",
        "oldest_pending_at",
        "next_attempt_at",
    ]
    assert stats["messages"] == 3 and stats["pending_messages"] == 2
    assert stats["recipients"] == {"queued": 1, "deferred": 1, "delivered": 1, "bounced": 0}
    assert "messages:" in relaybox("queue", "stats").stdout


def test_cli_leaves_in_flight_work_to_the_server(relaybox: Any, conf: Config) -> None:
    async def claim() -> str:
        sp = await Spool.open(conf)
        msg_id = await sp.enqueue(sender="a@x.test", recipients=["b@y.test"], body=BODY, user=None)
        await sp.claim_due(10)
        await sp.close()
        return msg_id

    msg_id = asyncio.run(claim())
    for _ in range(2):
        data = json_of(relaybox("queue", "show", msg_id, "--json"))
        assert data["recipients"][0]["in_flight"] is True
    assert json_of(relaybox("queue", "stats", "--json"))["in_flight"] == 1

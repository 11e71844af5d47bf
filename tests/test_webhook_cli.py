"""`relaybox webhook ...` (issue 16, item 2): the real CLI, on its own state dir or the server's.

``add`` prints the id and the generated secret once (``list`` never shows it, nor does the audit
log); only https:// URLs are taken, or http:// to loopback; errors are one line, exit 1. With the
server running: ``test`` posts a signed webhook.test to a loopback receiver and prints its
answer; an event given up after ``max_age`` is listed by ``deliveries --failed`` and ``replay``
posts it again with the same webhook-id; an endpoint removed has its pending events failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from standardwebhooks.webhooks import Webhook

from admin.cli import cli
from relay import webhook
from relay.clock import ManualClock
from relay.config import Config
from relay.store import events
from tests import leaks, test_webhooks
from tests.relayserver import RelayHandle
from tests.test_suppression import LOGIN, mail_log, send
from tests.test_webhooks import add_endpoint, idle, rows
from tests.userhelpers import json_of, one_line_error
from tests.webhookreceiver import Receiver

Cli = Callable[..., Awaitable[Result]]
box, receiver = test_webhooks.box, test_webhooks.receiver  # the fixtures, shared
KEYS = ["id", "url", "domain", "events", "created_at"]


@pytest.fixture
def server_cli(relay_cfg: Config, tmp_path: Path) -> Cli:
    """The CLI on the server's state dir, in a thread (it runs its own event loop)."""
    conf = tmp_path / "server-cli.toml"
    conf.write_text(f'state_dir = "{relay_cfg.state_dir}"\n')

    async def invoke(*args: str) -> Result:
        return await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(conf), *args])

    return invoke


def added(result: Result) -> dict[str, Any]:
    data: dict[str, Any] = json_of(result)
    leaks.add(data["secret"])
    return data


def test_add_prints_the_secret_once_and_list_never(relaybox: Any, domain: str) -> None:
    out = relaybox("webhook", "add", "https://app.example/hooks", "--events", "message.bounced")
    assert out.exit_code == 0, out.output
    first, second, third = out.stdout.splitlines()
    endpoint_id = first.split()[1].rstrip(":")
    assert first == f"added {endpoint_id}: https://app.example/hooks"
    secret = second.removeprefix("secret: ")
    leaks.add(secret)
    assert secret.startswith("whsec_") and len(secret) > 40 and "shown once" in third
    Webhook(secret)  # the standard's libraries read it
    made = added(
        relaybox("webhook", "add", "http://127.0.0.1:9/h", "--domain", domain.upper(), "--json")
    )
    assert list(made) == [*KEYS, "secret"] and made["domain"] == domain
    assert made["events"] == list(webhook.EVENT_TYPES)

    listed = json_of(relaybox("webhook", "list", "--json"))
    assert [e["id"] for e in listed] == [endpoint_id, made["id"]]
    assert all(list(e) == KEYS for e in listed)
    table = relaybox("webhook", "list")
    assert secret not in table.stdout and made["secret"] not in table.stdout
    assert endpoint_id in table.stdout and "message.bounced" in table.stdout

    done = relaybox("webhook", "remove", endpoint_id)
    assert done.stdout == f"removed {endpoint_id}: https://app.example/hooks\n"
    one_line_error(relaybox("webhook", "remove", endpoint_id), "no such webhook endpoint")
    assert [e["id"] for e in json_of(relaybox("webhook", "list", "--json"))] == [made["id"]]
    audit = relaybox("audit", "--json")
    assert secret not in audit.stdout and made["secret"] not in audit.stdout
    actions = [e["action"] for e in json.loads(audit.stdout)]
    assert actions.count("webhook.add") == 2 and actions.count("webhook.remove") == 1


def test_only_https_unless_loopback_and_other_refusals(relaybox: Any, domain: str) -> None:
    one_line_error(
        relaybox("webhook", "add", "http://app.example/hooks"),
        "webhook URLs must be https:// (http:// only to loopback)",
    )
    one_line_error(relaybox("webhook", "add", "http://10.1.2.3/h"), "must be https://")
    one_line_error(relaybox("webhook", "add", "https://u:p@app.example/h"), "user or password")
    one_line_error(relaybox("webhook", "add", "ftp://127.0.0.1/h"), "not an http(s) URL")
    one_line_error(
        relaybox("webhook", "add", "https://app.example/h", "--events", "message.opened"),
        "unknown event type(s): message.opened",
    )
    one_line_error(
        relaybox("webhook", "add", "https://app.example/h", "--domain", "nope.test"),
        "no such domain: nope.test",
    )
    for url in ("http://localhost:8080/h", "http://[::1]/h", "http://127.0.0.2/h"):
        assert relaybox("webhook", "add", url, "--json").exit_code == 0
    assert len(json_of(relaybox("webhook", "list", "--json"))) == 3
    one_line_error(relaybox("webhook", "test", "wh_nope"), "no such webhook endpoint")
    one_line_error(relaybox("webhook", "replay", "evt_nope"), "no such event: evt_nope")
    assert relaybox("webhook", "deliveries").stdout == "no deliveries\n"


async def test_test_posts_a_signed_event_and_prints_the_answer(
    relaybox: Any, domain: str, receiver: Receiver
) -> None:
    made = added(await asyncio.to_thread(relaybox, "webhook", "add", receiver.url, "--json"))
    ok = await asyncio.to_thread(relaybox, "webhook", "test", made["id"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout == f"{made['id']} answered HTTP 200\n"
    [req] = receiver.requests
    doc = Webhook(made["secret"]).verify(req.body, req.headers)
    assert doc["type"] == "webhook.test" and doc["data"] == {"endpoint_id": made["id"]}
    receiver.script(500)
    one_line_error(
        await asyncio.to_thread(relaybox, "webhook", "test", made["id"]),
        f"{made['id']} answered HTTP 500",
    )
    await receiver.stop()
    one_line_error(
        await asyncio.to_thread(relaybox, "webhook", "test", made["id"]), "no answer (ConnectError)"
    )


async def test_given_up_listed_as_failed_then_replayed_with_the_same_id(
    box: RelayHandle,
    receiver: Receiver,
    clock: ManualClock,
    server_cli: Cli,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    password = await box.add_user(LOGIN)
    ep = await add_endpoint(box, receiver.url, event_types=["message.accepted"])
    receiver.default = 500
    await send(box, password, "fine@dest.test")
    poster = box.server.webhooks.posters[0]
    for n, delay in ((1, 10), (2, 20), (3, 0)):  # max_age 30s: the third failure is the last
        await receiver.wait_for(lambda reqs, n=n: len(reqs) >= n)
        await idle(box)
        clock.advance(delay)
        poster.wake()
    await idle(box)
    assert len(receiver.requests) == 3
    [failed] = json_of(await server_cli("webhook", "deliveries", "--failed", "--json"))
    event_id = receiver.requests[0].event_id
    assert failed["event_id"] == event_id and failed["endpoint_id"] == ep.id
    assert (failed["state"], failed["attempts"], failed["last_status"]) == ("failed", 3, 500)
    assert (failed["type"], failed["last_error"], failed["next_attempt_at"]) == (
        "message.accepted", "HTTP 500", None,
    )  # fmt: skip
    assert mail_log(caplog, "webhook failed ")[-1].endswith(" attempt=3 next=failed")

    receiver.default = 200
    replayed = await server_cli("webhook", "replay", event_id)
    assert replayed.stdout == f"queued {event_id} again for 1 endpoint(s)\n", replayed.output
    await box.server.reload(box.server.cfg, notify=False)  # SIGHUP: posted at once
    got = await receiver.wait_for(lambda reqs: len(reqs) >= 4)
    await idle(box)
    assert got[3].event_id == event_id and got[3].body == got[0].body
    Webhook(ep.secret).verify(got[3].body, got[3].headers)
    [row] = await rows(box)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, 200)
    assert json_of(await server_cli("webhook", "deliveries", "--failed", "--json")) == []
    assert box.server.db is not None
    assert "webhook.replay" in [e.action for e in await events.recent(box.server.db)]


async def test_an_endpoint_removed_has_its_pending_events_failed(
    box: RelayHandle,
    receiver: Receiver,
    server_cli: Cli,
    clock: ManualClock,
) -> None:
    password = await box.add_user(LOGIN)
    ep = await add_endpoint(box, receiver.url, event_types=["message.accepted"])
    receiver.default = 503
    await send(box, password, "fine@dest.test")
    await receiver.wait_for(lambda reqs: len(reqs) >= 1)
    await idle(box)
    assert (await server_cli("webhook", "remove", ep.id)).exit_code == 0
    await box.server.reload(box.server.cfg, notify=False)
    clock.advance(10)
    box.server.webhooks.posters[0].wake()
    await idle(box)
    [row] = await rows(box)
    assert (row.state, row.last_error, row.attempts) == ("failed", "endpoint removed", 2)
    assert len(receiver.requests) == 1

"""relay/store/domains.py: the store and the verification state machine, against a real DNS
server (relay/grammar.py's domain names too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import dns.asyncresolver
import pytest

from relay import dkimkeys, dnscheck, grammar
from relay.clock import ManualClock
from relay.config import Config
from relay.dnscheck import CheckResult
from relay.errors import Conflict, Invalid, NotFound
from relay.store import domains, events, users
from relay.store.db import Database
from relay.store.passwords import Hasher
from relay.units import Duration
from tests import leaks
from tests.dnsserver import TestDNSServer

D = "example.com"
HOUR = 3600.0


@pytest.fixture
def cfg_ed(dns_cfg: Config) -> Config:
    """ed25519 keys: the state machine does not care, and they cost microseconds, not RSA's ms."""
    return dataclasses.replace(
        dns_cfg,
        dns=dataclasses.replace(dns_cfg.dns, dkim_key_type="ed25519", failure_grace=Duration(HOUR)),
    )


@pytest.fixture
def resolver(dns_cfg: Config) -> dns.asyncresolver.Resolver:
    return dnscheck.make_resolver(dns_cfg)


async def added(db: Database, cfg: Config, clock: ManualClock, name: str = D) -> domains.Domain:
    d = await domains.add(db, name, cfg=cfg, now=clock(), actor="alice")
    key = await domains.signing_key(db, d.name)
    assert key is not None
    leaks.add(key.private_pem)
    return d


@dataclass(frozen=True)
class Box:
    """The store, a clock, and the DNS server the resolver asks: what a verification test needs."""

    db: Database
    cfg: Config
    clock: ManualClock
    zone: TestDNSServer
    resolver: dns.asyncresolver.Resolver

    async def add(self, name: str = D) -> domains.Domain:
        return await added(self.db, self.cfg, self.clock, name)

    async def verify(self, cfg: Config | None = None, actor: str = "a") -> domains.Domain:
        return await domains.verify(
            self.db, D, resolver=self.resolver, cfg=cfg or self.cfg, now=self.clock(), actor=actor
        )

    async def recheck(self) -> list[domains.Domain]:
        return await domains.recheck(
            self.db, resolver=self.resolver, cfg=self.cfg, now=self.clock()
        )


@pytest.fixture
def box(
    db: Database,
    cfg_ed: Config,
    clock: ManualClock,
    dns_server: TestDNSServer,
    resolver: dns.asyncresolver.Resolver,
) -> Box:
    return Box(db, cfg_ed, clock, dns_server, resolver)


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("  mail.example.com ", "mail.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert grammar.normalize_domain(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", ".", "localhost", "a..example", "-a.example", "a-.example", "a_b.example", "192.0.2.1",
     "x" * 64 + ".example", "a b.example", "user@example.com", ("a." * 127) + "example"],
)  # fmt: skip
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(Invalid):
        grammar.normalize_domain(raw)


# --- store ----------------------------------------------------------------------------------------


async def test_add_get_list(db: Database, cfg: Config, clock: ManualClock) -> None:
    d = await added(db, cfg, clock, "Bücher.Example")
    assert d.name == "xn--bcher-kva.example"
    assert (d.state, d.dkim_selector, d.dkim_algorithm) == ("pending", "relaybox", "rsa")
    assert d.created_at == clock() and d.checks == () and d.last_checked_at is None
    assert not d.can_send
    assert await domains.get(db, "bücher.example") == d
    assert await domains.get(db, "other.example") is None
    assert await domains.get(db, "not a name") is None
    await added(db, cfg, clock, "a.example")
    assert [x.name for x in await domains.list_all(db)] == ["a.example", "xn--bcher-kva.example"]
    with pytest.raises(Conflict, match="domain xn--bcher-kva.example already exists"):
        await domains.add(db, "XN--BCHER-KVA.example.", cfg=cfg, now=clock(), actor="alice")


async def test_domain_carries_no_private_key(db: Database, cfg: Config, clock: ManualClock) -> None:
    d = await added(db, cfg, clock)
    key = await domains.signing_key(db, D)
    assert key is not None and key.private_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert key.private_pem not in repr(d) and key.private_pem not in repr(key)
    assert "private" not in {f.name for f in dataclasses.fields(d)}
    assert await domains.signing_key(db, "other.example") is None


async def test_records(db: Database, cfg_ed: Config, clock: ManualClock) -> None:
    d = await added(db, cfg_ed, clock)
    recs = domains.records(d, cfg_ed)
    assert [(r.purpose, r.type, r.name) for r in recs] == [
        ("ownership", "TXT", "_relaybox.example.com"),
        ("spf", "TXT", "example.com"),
        ("dkim", "TXT", "relaybox._domainkey.example.com"),
        ("dmarc", "TXT", "_dmarc.example.com"),
    ]
    assert recs[0].value == f"relaybox-verification={d.token}"
    assert recs[1].value == "v=spf1 ip4:192.0.2.10 ~all"
    assert recs[2].value == f"v=DKIM1; k=ed25519; p={d.dkim_public_key}"
    assert recs[3].value == "v=DMARC1; p=none"


async def test_remove_refuses_while_users_exist(
    db: Database, cfg_ed: Config, clock: ManualClock, hasher: Hasher
) -> None:
    await added(db, cfg_ed, clock)
    ok = [CheckResult(c, "pass", "", "", "") for c in cfg_ed.dns.required]
    await domains.record_results(db, D, ok, cfg=cfg_ed, now=clock())
    pw = leaks.add("correct horse battery staple")
    await users.create(db, f"app@{D}", pw, hasher=hasher, cfg=cfg_ed, now=clock(), actor="alice")
    with pytest.raises(Conflict, match=r"has 1 user\(s\)"):
        await domains.remove(db, D, with_users=False, now=clock(), actor="alice")
    assert await domains.get(db, D) is not None
    await domains.remove(db, D, with_users=True, now=clock(), actor="alice")
    assert await domains.get(db, D) is None
    assert await users.get(db, f"app@{D}") is None
    with pytest.raises(NotFound, match="no such domain: example.com"):
        await domains.remove(db, D, with_users=True, now=clock(), actor="alice")
    log = await events.recent(db, target=D)
    assert [(e.action, e.actor, e.detail) for e in log][:2] == [
        ("domain.remove", "alice", "users_deleted=1"),
        ("domain.state", "system", "pending -> verified (ownership=pass spf=pass dkim=pass)"),
    ]


# --- verification against DNS -----------------------------------------------------------------

_NO_TXT = "no TXT record"


@pytest.mark.parametrize(
    ("unpublished", "extra", "state", "not_passed"),
    [
        pytest.param(
            {"ownership", "spf", "dkim", "dmarc"},
            [],
            "pending",
            [("ownership", "fail", _NO_TXT), ("spf", "fail", _NO_TXT),
             ("dkim", "fail", _NO_TXT), ("dmarc", "fail", _NO_TXT)],
            id="nothing-published",
        ),
        pytest.param(
            {"ownership"},
            [("_relaybox.example.com", "relaybox-verification=0000")],
            "pending",
            [("ownership", "fail", "token mismatch")],
            id="wrong-token",
        ),
        # An SPF record that gives our outbound address softfail or neutral is a failed spf check.
        pytest.param(
            {"spf"},
            [(D, "v=spf1 ~ip4:192.0.2.10 -all")],
            "pending",
            [("spf", "fail", "SPF does not authorize 192.0.2.10 (result softfail)")],
            id="spf-softfail",
        ),
        pytest.param(
            {"spf"},
            [(D, "v=spf1 ?ip4:192.0.2.10 -all")],
            "pending",
            [("spf", "fail", "SPF does not authorize 192.0.2.10 (result neutral)")],
            id="spf-neutral",
        ),
        # DMARC is not in dns.required by default: its failure leaves the domain verified.
        pytest.param({"dmarc"}, [], "verified", [("dmarc", "fail", _NO_TXT)], id="no-dmarc"),
        pytest.param(set(), [], "verified", [], id="everything"),
    ],
)  # fmt: skip
async def test_verify_a_new_domain(
    box: Box,
    unpublished: set[str],
    extra: list[tuple[str, str]],
    state: str,
    not_passed: list[tuple[str, str, str]],
) -> None:
    """``domain verify`` of a pending domain with some of its records published (and maybe other
    TXT records): the state it ends in, and every check that did not pass, in check order."""
    d = await box.add()
    box.zone.publish(r for r in domains.records(d, box.cfg) if r.purpose not in unpublished)
    for name, value in extra:
        box.zone.add_txt(name, value)
    v = await box.verify()
    assert v.state == state and v.can_send == (state == "verified")
    assert [c.check for c in v.checks] == ["ownership", "spf", "dkim", "dmarc"]
    assert [(c.check, c.result, c.reason) for c in v.checks if c.result != "pass"] == not_passed


async def test_verify_passing_domain(box: Box) -> None:
    d = await box.add()
    box.zone.publish(domains.records(d, box.cfg))
    box.clock.advance(60)
    v = await box.verify(actor="alice")
    assert v.state == "verified" and v.can_send
    assert [(c.check, c.result) for c in v.checks] == [
        ("ownership", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
    ]
    assert v.verified_at == v.last_checked_at == box.clock() and v.failing_since is None
    assert await domains.get(box.db, D) == v
    actions = [(e.action, e.actor) for e in await events.recent(box.db, target=D)]
    assert actions == [
        ("domain.state", "alice"),
        ("domain.verify", "alice"),
        ("domain.add", "alice"),
    ]


async def test_verify_rsa_record_split_across_strings(
    db: Database,
    dns_cfg: Config,
    clock: ManualClock,
    dns_server: TestDNSServer,
    resolver: dns.asyncresolver.Resolver,
) -> None:
    box = Box(db, dns_cfg, clock, dns_server, resolver)  # RSA keys: dns_cfg's default key type
    d = await box.add()
    recs = domains.records(d, dns_cfg)
    assert len(dkimkeys.split_txt(recs[2].value)) == 2
    dns_server.publish(recs)  # the DKIM value goes out as two strings
    v = await box.verify()
    assert v.state == "verified", v.checks


async def test_dmarc_is_required_only_when_configured(box: Box) -> None:
    d = await box.add()
    box.zone.publish(domains.records(d, box.cfg)[:3])
    v = await box.verify()
    assert v.state == "verified" and v.checks[3].result == "fail"
    strict = dataclasses.replace(
        box.cfg, dns=dataclasses.replace(box.cfg.dns, required=("ownership", "dmarc"))
    )
    v = await box.verify(strict)
    assert v.state == "failing"


@pytest.mark.parametrize("fault", ["servfail", "timeout"])
async def test_temperror_changes_no_state(box: Box, fault: str) -> None:
    d = await box.add()
    box.zone.publish(domains.records(d, box.cfg))
    if fault == "servfail":
        box.zone.servfail(None)
    else:
        box.zone.blackhole(True)
    # pending stays pending
    v = await box.verify()
    assert v.state == "pending"
    assert {c.result for c in v.checks} == {"temperror"}
    reason = "DNS server failure (SERVFAIL)" if fault == "servfail" else "DNS timeout"
    assert v.checks[0].reason == reason
    assert v.last_checked_at == box.clock()  # the results are stored as the last results

    # verified stays verified, however long the outage lasts
    box.zone.servfail(None, on=False)
    box.zone.blackhole(False)
    await box.verify()
    if fault == "servfail":
        box.zone.servfail("relaybox._domainkey.example.com")  # one required check only
    else:
        box.zone.blackhole(True)
    for _ in range(3):
        box.clock.advance(2 * HOUR)
        [after] = await box.recheck()
        assert (after.state, after.failing_since) == ("verified", None)


async def test_failing_then_suspended_then_verified_again(box: Box) -> None:
    d = await box.add()
    recs = domains.records(d, box.cfg)
    box.zone.publish(recs)
    [v] = await box.recheck()
    assert v.state == "verified"
    verified_at = v.verified_at

    box.zone.remove(recs[2].name)  # the DKIM record disappears
    box.clock.advance(HOUR)
    t_fail = box.clock()
    [v] = await box.recheck()
    assert (v.state, v.failing_since, v.verified_at) == ("failing", t_fail, verified_at)
    assert v.can_send  # still inside the grace window
    assert v.checks[2].reason == "no TXT record"

    box.clock.advance(HOUR - 1)  # grace is 1h: one second short
    [v] = await box.recheck()
    assert (v.state, v.failing_since) == ("failing", t_fail)

    box.zone.blackhole(True)  # an outage past the grace: still no decision
    box.clock.advance(10)
    [v] = await box.recheck()
    assert v.state == "failing"
    box.zone.blackhole(False)

    [v] = await box.recheck()
    assert (v.state, v.failing_since) == ("suspended", t_fail)
    assert not v.can_send
    box.clock.advance(HOUR)
    [v] = await box.recheck()
    assert v.state == "suspended"

    box.zone.publish(recs[2:3])  # fixed
    box.clock.advance(HOUR)
    [v] = await box.recheck()
    assert (v.state, v.failing_since, v.verified_at) == ("verified", None, box.clock())
    transitions = [e.detail.split(" (")[0] for e in await events.recent(box.db, target=D)]
    assert [t for t in transitions if "->" in t] == [
        "suspended -> verified",
        "failing -> suspended",
        "verified -> failing",
        "pending -> verified",
    ]


async def test_recovery_inside_grace_clears_failing(box: Box) -> None:
    d = await box.add()
    recs = domains.records(d, box.cfg)
    box.zone.publish(recs)
    await box.recheck()
    box.zone.remove(D, "TXT")
    box.zone.add_txt(D, "v=spf1 ip4:203.0.113.7 -all")
    box.clock.advance(60)
    [v] = await box.recheck()
    assert v.state == "failing"
    assert v.checks[1].reason == "SPF does not authorize 192.0.2.10 (result fail)"
    box.zone.remove(D, "TXT")
    box.zone.publish(recs[1:2])
    box.clock.advance(60)
    [v] = await box.recheck()
    assert (v.state, v.failing_since) == ("verified", None)


async def test_recheck_every_domain(box: Box) -> None:
    good = await box.add("good.example")
    await box.add("bad.example")
    box.zone.publish(domains.records(good, box.cfg))
    out = await box.recheck()
    assert sorted((d.name, d.state) for d in out) == [
        ("bad.example", "pending"),
        ("good.example", "verified"),
    ]


async def test_grace_zero_suspends_at_once(
    db: Database, cfg_ed: Config, clock: ManualClock
) -> None:
    cfg = dataclasses.replace(
        cfg_ed, dns=dataclasses.replace(cfg_ed.dns, failure_grace=Duration(0))
    )
    await added(db, cfg, clock)
    ok = [CheckResult(c, "pass", "", "", "") for c in cfg.dns.required]
    bad = [dataclasses.replace(ok[0], result="fail", reason="token mismatch"), *ok[1:]]
    assert (await domains.record_results(db, D, ok, cfg=cfg, now=1.0)).state == "verified"
    assert (await domains.record_results(db, D, bad, cfg=cfg, now=2.0)).state == "suspended"
    # A required check missing from the results is no definite answer either.
    partial = await domains.record_results(db, D, ok[:1], cfg=cfg, now=3.0)
    assert partial.state == "suspended"


async def test_check_records_looks_without_recording(box: Box) -> None:
    """The checks of a stored domain, as ``relaybox doctor`` runs them: results, no new state."""
    d = await box.add()
    box.zone.publish(domains.records(d, box.cfg))
    results = await domains.check_records(box.resolver, d, box.cfg)
    assert [(r.check, r.result) for r in results] == [
        ("ownership", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
    ]
    assert await domains.get(box.db, D) == d  # still pending, never checked


async def test_checks_are_stored_in_the_shape_domain_show_prints(box: Box) -> None:
    """The stored results read back as they were written (one JSON shape: CheckResult.as_json)."""
    d = await box.add()
    box.zone.publish(domains.records(d, box.cfg)[:2])
    v = await box.verify()
    assert v.checks[2] == CheckResult(
        "dkim", "fail", _NO_TXT, domains.records(d, box.cfg)[2].value, ""
    )
    assert [CheckResult.from_json(c.as_json()) for c in v.checks] == list(v.checks)
    assert list(v.checks[0].as_json()) == ["check", "result", "reason", "expected", "found"]


async def test_verify_unknown_domain(
    db: Database, cfg_ed: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    with pytest.raises(NotFound, match="no such domain: xn--bcher-kva.example"):
        await domains.verify(db, "bücher.example", resolver=resolver, cfg=cfg_ed, now=1, actor="a")
    with pytest.raises(NotFound):
        await domains.record_results(db, "nope.example", [], cfg=cfg_ed, now=1)

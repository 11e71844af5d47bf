"""relay/dnscheck.py (the domain checks) and relay/dnslookup.py (the resolver, TXT, MX and
addresses) against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.name
import pytest

from relay import dkimkeys, dnscheck, dnslookup
from relay.config import Config
from relay.units import Duration
from tests.dnsserver import TestDNSServer

D = "example.com"
HELO = "relay.test"  # the cfg fixture's public_hostname: relaybox's EHLO name


@pytest.fixture
def resolver(dns_cfg: Config) -> dns.asyncresolver.Resolver:
    return dnslookup.make_resolver(dns_cfg)


def with_dns(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, dns=dataclasses.replace(cfg.dns, **changes))


# --- TXT ----------------------------------------------------------------------------------------


async def test_txt_strings_are_joined_without_separator(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10", " -all")
    dns_server.add_txt(D, "other")
    ans = await dnslookup.lookup_txt(resolver, D)
    assert sorted(ans.records) == ["other", "v=spf1 ip4:192.0.2.10 -all"]
    assert not ans.temperror and not ans.nxdomain


async def test_txt_nodata_nxdomain_servfail_timeout(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_a(D, "192.0.2.1")
    nodata = await dnslookup.lookup_txt(resolver, D)
    assert nodata == dnslookup.TxtAnswer()  # the name exists: definite "no TXT"
    nx = await dnslookup.lookup_txt(resolver, "missing.example.com")
    assert nx.nxdomain and not nx.records and not nx.temperror

    dns_server.servfail(D)
    failed = await dnslookup.lookup_txt(resolver, D)
    assert failed == dnslookup.TxtAnswer(temperror="DNS server failure (SERVFAIL)")  # not NXDOMAIN

    dns_server.blackhole(True)
    started = time.monotonic()
    timed_out = await dnslookup.lookup_txt(resolver, "missing.example.com")
    assert timed_out == dnslookup.TxtAnswer(temperror="DNS timeout")
    elapsed = time.monotonic() - started
    # dns.timeout ended the lookup: not sooner (it waited for an answer), and not dnspython's
    # default lifetime of 5 s (6x the configured 0.5 s still leaves room for a loaded machine).
    bound = float(resolver.lifetime)
    assert 0.9 * bound <= elapsed < 6 * bound, (elapsed, bound)

    # The same bound holds for the lookups pyspf makes (its own hook, a blocking twin resolver);
    # a short dns.timeout shows that nothing lengthens it (6x 0.15 s stays under one second).
    short = dnslookup.make_resolver(with_dns(dns_cfg, timeout=Duration(0.15)))
    started = time.monotonic()
    assert (await dnscheck.spf_result(short, "192.0.2.10", D, helo=HELO)).result == "temperror"
    elapsed = time.monotonic() - started
    bound = float(short.lifetime)
    assert 0.9 * bound <= elapsed < 6 * bound, (elapsed, bound)


@pytest.mark.parametrize(
    "name",
    ["x" * 64 + ".example.com", ".".join(["a" * 60] * 5), "a..example.com"],
    ids=["label-over-63", "name-over-255", "empty-label"],
)
async def test_a_name_that_cannot_exist_has_no_records(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver, name: str
) -> None:
    """A definite "no such name" (like NXDOMAIN, not a temperror), without asking any server."""
    assert await dnslookup.lookup_txt(resolver, name) == dnslookup.TxtAnswer(nxdomain=True)
    assert await dnslookup.resolve_mx(resolver, name) == dnslookup.MxResult(
        reason="domain does not exist"
    )
    assert dns_server.queries == []


async def test_no_nameservers_is_a_temperror(cfg: Config) -> None:
    resolver = dnslookup.make_resolver(cfg)
    resolver.nameservers = []
    ans = await dnslookup.lookup_txt(resolver, D)
    assert ans.temperror and not ans.records


def test_make_resolver_uses_config(dns_cfg: Config) -> None:
    r = dnslookup.make_resolver(dns_cfg)
    assert [str(ns) for ns in r.nameservers] == ["127.0.0.1"]
    assert r.port == dns_cfg.dns.port
    assert r.lifetime == pytest.approx(0.5)


@pytest.mark.parametrize("port", [1, 52, 53, 54, 5353, 65535])
def test_make_resolver_without_nameservers_uses_the_configured_port(cfg: Config, port: int) -> None:
    """No ``dns.nameservers``: the servers come from /etc/resolv.conf, the port from ``dns.port``
    whatever it is (53 is dnspython's default; the neighbours of 53 are the boundary)."""
    r = dnslookup.make_resolver(with_dns(cfg, nameservers=(), port=port))
    assert r.port == port


async def test_queries_advertise_edns0_with_a_1232_byte_buffer(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """Every query, ours and pyspf's, carries EDNS version 0 with the DNS-flag-day buffer of 1232
    bytes (a 2048-bit DKIM record fits one UDP answer) and no flags (no DNSSEC OK bit)."""
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 -all")
    await dnslookup.lookup_txt(resolver, D)
    assert (await dnscheck.spf_result(resolver, "192.0.2.10", D, helo=HELO)).result == "pass"
    assert (await dnscheck.check_spf(resolver, D, dns_cfg)).result == "pass"
    assert len(dns_server.queries) >= 3
    assert dns_server.edns == [(1232, 0, 0)] * len(dns_server.queries)


async def test_lookups_never_try_the_host_domain(
    dns_server: TestDNSServer, dns_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host named box.corp.test, dnspython's resolver takes corp.test as its domain. A name
    that does not exist must stay NXDOMAIN: it is never retried as <name>.corp.test (another
    zone, whose records say nothing about the domain asked about)."""
    monkeypatch.setattr(socket, "gethostname", lambda: "box.corp.test")
    resolver = dnslookup.make_resolver(dns_cfg)
    assert resolver.domain == dns.name.from_text("corp.test")  # the host this test stands for
    dns_server.add_txt("example.com.corp.test", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add_txt("_dmarc.example.com.corp.test", "v=DMARC1; p=reject")
    assert await dnslookup.lookup_txt(resolver, D) == dnslookup.TxtAnswer(nxdomain=True)
    assert (await dnscheck.check_dmarc(resolver, D)).reason == "no TXT record"
    # pyspf's lookups
    assert (await dnscheck.spf_result(resolver, "192.0.2.10", D, helo=HELO)).result == "none"
    assert [q for q in dns_server.queries if q[0].endswith("corp.test")] == []


_RESOLV_CONF_PROBE = r"""
import asyncio, json, sys
from relay import config, dnscheck, dnslookup

async def main(port: int) -> None:
    out = {}
    for label, nameservers in (("configured", ["127.0.0.1"]), ("resolv.conf", [])):
        cfg = config.from_dict(
            {"state_dir": "/nonexistent", "public_hostname": "relay.test",
             "dns": {"nameservers": nameservers, "port": port, "timeout": "2s"}},
            source="(test)",
        )
        resolver = dnslookup.make_resolver(cfg)
        txt = await dnslookup.lookup_txt(resolver, "example.com")
        spf = await dnscheck.spf_result(resolver, "192.0.2.10", "example.com", helo="relay.test")
        out[label] = [list(txt.records), txt.temperror, spf.result]
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1])))
"""
_BIND_OVER_RESOLV_CONF = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'


@pytest.mark.parametrize(
    ("resolv_conf", "expected"),
    [
        (
            "",
            {
                "configured": [["v=spf1 ip4:192.0.2.10 -all"], "", "pass"],
                "resolv.conf": [[], "no nameserver answered", "temperror"],
            },
        ),
        (
            "nameserver 127.0.0.1\n",
            {
                "configured": [["v=spf1 ip4:192.0.2.10 -all"], "", "pass"],
                "resolv.conf": [["v=spf1 ip4:192.0.2.10 -all"], "", "pass"],
            },
        ),
    ],
    ids=["no-nameserver-in-resolv.conf", "resolv.conf-names-loopback"],
)
def test_resolv_conf_is_read_only_without_dns_nameservers(
    dns_server: TestDNSServer, tmp_path: Path, resolv_conf: str, expected: dict[str, Any]
) -> None:
    """With ``dns.nameservers`` the host's /etc/resolv.conf plays no part, even when it names no
    server; without them its servers are asked at ``dns.port``, and a resolv.conf that names no
    server makes every lookup a temperror, not a crash. Run in a mount namespace whose
    /etc/resolv.conf is ``resolv_conf`` (the host's file is untouched)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    prefix = [unshare, "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf)
    probe = subprocess.run(
        [*prefix, "sh", "-c", _BIND_OVER_RESOLV_CONF, str(conf), "true"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace to replace /etc/resolv.conf in: {probe.stderr.strip()}")
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 -all")
    root = Path(dnscheck.__file__).resolve().parents[1]  # the checkout under test
    run = subprocess.run(
        [*prefix, "sh", "-c", _BIND_OVER_RESOLV_CONF, str(conf),
         sys.executable, "-c", _RESOLV_CONF_PROBE, str(dns_server.port)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected


# --- SPF ----------------------------------------------------------------------------------------


async def test_spf_pass_for_direct_ip(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.0/24 -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == ("pass", "", "v=spf1 ip4:192.0.2.0/24 -all")
    assert r.expected == "v=spf1 ip4:192.0.2.10 ~all"


async def test_spf_not_authorizing_the_ip(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_txt(D, "v=spf1 ip4:203.0.113.7 -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert r.result == "fail"
    assert r.reason == "SPF does not authorize 192.0.2.10 (result fail)"


@pytest.mark.parametrize(
    ("record", "spf"),
    [
        ("v=spf1 ~all", "softfail"),
        ("v=spf1 ip4:203.0.113.7 ~all", "softfail"),
        ("v=spf1 ~ip4:192.0.2.10 -all", "softfail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1 ?ip4:192.0.2.10 -all", "neutral"),
        ("v=spf1 ip4:203.0.113.7", "neutral"),  # no "all": the default result is neutral
    ],
    ids=[
        "softfail-all",
        "softfail-other-ip",
        "softfail-our-ip",
        "neutral-all",
        "neutral-our-ip",
        "neutral-no-all",
    ],
)
async def test_spf_softfail_and_neutral_are_not_a_pass(
    dns_server: TestDNSServer,
    dns_cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    record: str,
    spf: str,
) -> None:
    """Only "pass" authorizes an outbound address (RFC 7208 2.6: softfail and neutral do not)."""
    dns_server.add_txt(D, record)
    # what pyspf says
    assert (await dnscheck.spf_result(resolver, "192.0.2.10", D, helo=HELO)).result == spf
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == (
        "fail",
        f"SPF does not authorize 192.0.2.10 (result {spf})",
        record,
    )


async def test_spf_through_include_and_redirect_chain(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    # example.com -> redirect -> _spf.example.com -> include -> _spf.relay.test -> a:out.relay.test
    dns_server.add_txt(D, "v=spf1 redirect=_spf.example.com")
    dns_server.add_txt("_spf.example.com", "v=spf1 ip4:198.51.100.1 include:_spf.relay.test ~all")
    dns_server.add_txt("_spf.relay.test", "v=spf1 a:out.relay.test -all")
    dns_server.add_a("out.relay.test", "192.0.2.10")
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("pass", "")
    assert r.expected == "v=spf1 ip4:192.0.2.10 include:_spf.relay.test ~all"

    # The include is reached only after the redirect; an include after "all" never counts.
    dns_server.remove("_spf.example.com", "TXT")
    dns_server.add_txt("_spf.example.com", "v=spf1 ip4:192.0.2.10 -all include:_spf.relay.test")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", "SPF does not include _spf.relay.test")


async def test_spf_include_only_config(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    cfg = with_dns(dns_cfg, outbound_ips=(), spf_include="_spf.relay.test")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:198.51.100.0/24 -all")
    dns_server.add_txt(D, "v=spf1 mx -all")
    assert (await dnscheck.check_spf(resolver, D, cfg)).reason == (
        "SPF does not include _spf.relay.test"
    )
    dns_server.remove(D, "TXT")
    dns_server.add_txt(D, "v=spf1 include:_SPF.relay.test. -all")
    assert (await dnscheck.check_spf(resolver, D, cfg)).result == "pass"


async def test_spf_without_requirements_needs_one_valid_record(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    cfg = with_dns(dns_cfg, outbound_ips=())
    dns_server.add_txt(D, "v=spf1 -all")
    assert (await dnscheck.check_spf(resolver, D, cfg)).result == "pass"
    dns_server.remove(D)
    dns_server.add_txt(D, "v=spf1 frobnicate:x -all")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert r.result == "fail" and r.reason.startswith("SPF permerror")


async def test_spf_missing_and_multiple_records(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("fail", "no TXT record")
    dns_server.add_txt(D, "google-site-verification=abc")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == (
        "fail",
        "no SPF record",
        "google-site-verification=abc",
    )
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add_txt(D, "v=spf1 -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("fail", "multiple SPF records")


async def test_spf_lookup_limit_is_a_permerror(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    # 11 chained includes: more than the 10 DNS-querying terms RFC 7208 4.6.4 allows.
    dns_server.add_txt(D, "v=spf1 include:s0.example.com -all")
    for i in range(11):
        dns_server.add_txt(f"s{i}.example.com", f"v=spf1 include:s{i + 1}.example.com -all")
    dns_server.add_txt("s11.example.com", "v=spf1 ip4:192.0.2.10 -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert r.result == "fail" and "permerror" in r.reason and "lookups" in r.reason.lower()


async def test_spf_temperror_inside_the_evaluation(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_txt(D, "v=spf1 include:_spf.relay.test -all")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.servfail("_spf.relay.test")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert r.result == "temperror", r


async def test_concurrent_spf_checks_use_their_own_resolvers(dns_cfg: Config) -> None:
    """pyspf's DNS hook is process-wide; each check must still resolve through its own servers."""
    a, b = TestDNSServer(), TestDNSServer()
    a.start()
    b.start()
    try:
        a.add_txt(D, "v=spf1 ip4:192.0.2.10 -all")
        b.add_txt(D, "v=spf1 ip4:203.0.113.1 -all")
        ra = dnslookup.make_resolver(with_dns(dns_cfg, port=a.port))
        rb = dnslookup.make_resolver(with_dns(dns_cfg, port=b.port))
        runs = [
            dnscheck.spf_result(ra if i % 2 else rb, "192.0.2.10", D, helo=HELO) for i in range(20)
        ]
        results = await asyncio.gather(*runs)
        assert [r.result for r in results] == ["fail" if i % 2 == 0 else "pass" for i in range(20)]
    finally:
        a.stop()
        b.stop()


async def test_spf_ptr_mechanism(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """pyspf's PTR lookups go through our hook too: ``ptr`` matches when the address's name (no
    final dot) is under the domain and resolves back to the address (RFC 7208 5.5)."""
    dns_server.add_txt(D, "v=spf1 ptr -all")
    dns_server.add_ptr("10.2.0.192.in-addr.arpa", "mail.example.com")
    dns_server.add_a("mail.example.com", "192.0.2.10")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("pass", "")
    assert ("10.2.0.192.in-addr.arpa", "PTR") in dns_server.queries


@pytest.mark.parametrize(
    ("outbound_ips", "include", "expected"),
    [
        ((), "", "v=spf1 mx ~all"),
        ((), "_spf.relay.test", "v=spf1 include:_spf.relay.test ~all"),
        (("192.0.2.10", "2001:db8::25"), "", "v=spf1 ip4:192.0.2.10 ip6:2001:db8::25 ~all"),
        (("192.0.2.10",), "_spf.relay.test", "v=spf1 ip4:192.0.2.10 include:_spf.relay.test ~all"),
    ],
    ids=["nothing-configured", "include-only", "addresses-only", "both"],
)
def test_spf_suggestion(
    cfg: Config, outbound_ips: tuple[str, ...], include: str, expected: str
) -> None:
    """With neither addresses nor an include configured, the suggestion authorizes the MX hosts."""
    assert dnscheck.spf_suggestion(
        with_dns(cfg, outbound_ips=outbound_ips, spf_include=include)
    ) == (expected)


async def test_spf_mx_mechanism(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """pyspf's MX lookups go through our hook: ``mx`` matches the addresses of the MX hosts."""
    dns_server.add_txt(D, "v=spf1 mx -all")
    dns_server.add_mx(D, 10, "mx.example.com")
    dns_server.add_a("mx.example.com", "192.0.2.10")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("pass", "")
    assert ("mx.example.com", "A") in dns_server.queries


async def test_spf_include_beyond_the_lookup_limit_is_not_reached(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """Our include as the 12th DNS-querying term (a hub, ten providers, the last of which names
    ours) is past the limit of 10 (RFC 7208 4.6.4): an evaluation that needs it is a permerror,
    so it does not count, nor as the 11th. As the 10th term it does."""
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 ip4:198.51.100.7 -all")
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 include:hub.example -all")

    def providers(n: int) -> None:
        dns_server.remove("hub.example")
        includes = " ".join(f"include:p{i}.example" for i in range(1, n + 1))
        dns_server.add_txt("hub.example", f"v=spf1 {includes} -all")
        for i in range(1, n + 1):
            dns_server.remove(f"p{i}.example")
            record = "v=spf1 include:_spf.relay.test -all" if i == n else "v=spf1 -all"
            dns_server.add_txt(f"p{i}.example", record)

    providers(10)
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", "SPF does not include _spf.relay.test")
    # pyspf agrees, for an address that only our include authorizes.
    assert (await dnscheck.spf_result(resolver, "198.51.100.7", D, helo=HELO)).result == "permerror"

    providers(9)  # ours is the 11th term: one past the limit
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", "SPF does not include _spf.relay.test")
    assert (await dnscheck.spf_result(resolver, "198.51.100.7", D, helo=HELO)).result == "permerror"

    providers(8)
    assert (await dnscheck.check_spf(resolver, D, cfg)).result == "pass"
    assert (await dnscheck.spf_result(resolver, "198.51.100.7", D, helo=HELO)).result == "pass"


async def test_spf_includes_with_macros_are_skipped(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """A name with macros (RFC 7208 7) means something only when expanded for one sender: it is
    never looked up as written, and the terms after it still count."""
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    macro = "include:%{ir}.%{v}._spf.mailer.example"
    dns_server.add_txt(D, f"v=spf1 ip4:192.0.2.10 {macro} include:_spf.relay.test -all")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 -all")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("pass", "")
    assert [name for name, _ in dns_server.queries if "%" in name] == []


@pytest.mark.parametrize(
    "term",
    [
        "include:spf.mailer.example",  # another provider's include
        "include:_spf.relay.test:x",  # not a name ending at the ":"
        "redirect=_spf.relay.test=x",  # nor at the "="
    ],
)
async def test_spf_include_of_another_name_is_not_ours(
    dns_server: TestDNSServer,
    dns_cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    term: str,
) -> None:
    """Only ``include:`` (or ``redirect=``) of exactly ``dns.spf_include`` reaches it. The term
    stands in a provider's record, which pyspf never reads here (the ip4 matches first), so its
    syntax is ours alone to judge."""
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add_txt("spf.mailer.example", "v=spf1 ip4:198.51.100.0/24 -all")
    provider = f"v=spf1 {term}" + ("" if term.startswith("redirect") else " -all")
    dns_server.add_txt("provider.example", provider)
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 include:provider.example -all")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", "SPF does not include _spf.relay.test")
    assert ("provider.example", "TXT") in dns_server.queries  # the term was read


async def test_spf_include_is_found_before_a_later_branch_fails(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """Includes are followed in the order of evaluation: a first provider's record reaching our
    include counts, though a second provider's own include has no answer (SERVFAIL)."""
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    dns_server.add_txt(D, "v=spf1 include:first.example include:second.example -all")
    dns_server.add_txt("first.example", "v=spf1 include:_spf.relay.test -all")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add_txt("second.example", "v=spf1 include:broken.example -all")
    dns_server.servfail("broken.example")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("pass", "")


async def test_spf_include_through_a_name_with_two_spf_records_is_not_reached(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """A name with two SPF records is a permerror (RFC 7208 4.5): its records reach nothing,
    whichever of them names our include."""
    cfg = with_dns(dns_cfg, spf_include="_spf.relay.test")
    dns_server.add_txt(D, "v=spf1 ip4:192.0.2.10 include:dup.example -all")
    dns_server.add_txt("dup.example", "v=spf1 -all")
    dns_server.add_txt("dup.example", "v=spf1 include:_spf.relay.test -all")
    dns_server.add_txt("_spf.relay.test", "v=spf1 ip4:192.0.2.10 -all")
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", "SPF does not include _spf.relay.test")


# --- ownership, DKIM, DMARC -----------------------------------------------------------------------


async def test_ownership(dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    r = await dnscheck.check_ownership(resolver, D, "tok123")
    assert (r.result, r.reason) == ("fail", "no TXT record")
    dns_server.add_txt("_relaybox.example.com", "relaybox-verification=other")
    r = await dnscheck.check_ownership(resolver, D, "tok123")
    assert (r.result, r.reason) == ("fail", "token mismatch")
    assert r.found == "relaybox-verification=other"
    dns_server.add_txt("_relaybox.example.com", "relaybox-", "verification=tok123")
    r = await dnscheck.check_ownership(resolver, D, "tok123")
    assert (r.result, r.expected) == ("pass", "relaybox-verification=tok123")


async def test_ownership_needs_the_exact_token(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    """Neither a longer token (ours with more after it) nor another one passes, whatever their
    order; surrounding whitespace is no part of the value."""
    name = "_relaybox.example.com"
    for other in ("tok1234", "tok124", "zzz"):
        dns_server.add_txt(name, f"relaybox-verification={other}")
        r = await dnscheck.check_ownership(resolver, D, "tok123")
        assert (r.result, r.reason, r.found) == (
            "fail",
            "token mismatch",
            f"relaybox-verification={other}",
        )
        dns_server.remove(name, "TXT")
    dns_server.add_txt(name, " relaybox-verification=tok123 ")
    assert (await dnscheck.check_ownership(resolver, D, "tok123")).result == "pass"


async def test_dkim_split_across_strings(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    key = dkimkeys.generate("rsa")
    value = dkimkeys.txt_value("rsa", key.public_b64)
    parts = dkimkeys.split_txt(value)
    assert len(parts) == 2 and all(len(p.encode()) <= 255 for p in parts)
    dns_server.add_txt("sel._domainkey.example.com", *parts)
    r = await dnscheck.check_dkim(resolver, D, "sel", "rsa", key.public_b64)
    assert (r.result, r.found) == ("pass", value)


async def test_dkim_failures(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    name = "sel._domainkey.example.com"
    pub = dkimkeys.generate("ed25519").public_b64
    other = dkimkeys.generate("ed25519").public_b64

    async def reason() -> str:
        r = await dnscheck.check_dkim(resolver, D, "sel", "ed25519", pub)
        assert r.result == "fail"
        return r.reason

    assert await reason() == "no TXT record"
    dns_server.add_txt(name, f"v=DKIM1; k=ed25519; p={other}")
    assert await reason() == "DKIM key does not match"
    dns_server.remove(name, "TXT")
    dns_server.add_txt(name, f"v=DKIM1; p={pub}")  # k= defaults to rsa
    assert await reason() == "DKIM key type is rsa, not ed25519"
    dns_server.remove(name, "TXT")
    dns_server.add_txt(name, "v=DKIM1; k=ed25519; p=")
    assert await reason() == "DKIM key revoked (empty p=)"
    dns_server.remove(name, "TXT")
    # Folded base64 (whitespace inside p=) is the same key (RFC 6376 3.6.1).
    dns_server.add_txt(name, f"v=DKIM1; k=ed25519; p={pub[:20]} {pub[20:]}")
    assert (await dnscheck.check_dkim(resolver, D, "sel", "ed25519", pub)).result == "pass"


@pytest.mark.parametrize(
    "record",
    [
        "v=DKIM2; k=ed25519; p={pub}",  # another version (RFC 6376 3.6.1: DKIM1 only)
        "v=DKIM; k=ed25519; p={pub}",
        "v=DKIM1; k=ed25519",  # no p= at all (an empty p= is a revoked key, tested above)
        "v=DKIM1; k=ed25519; p={pub}; junk",  # not a tag-list (RFC 6376 3.2)
        "v=DKIM1; k=ed25519; p={pub}; p={pub}",  # a tag twice
    ],
    ids=["v=DKIM2", "v=DKIM", "no-p", "not-a-tag-list", "duplicate-tag"],
)
async def test_dkim_records_that_are_not_a_dkim1_key(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver, record: str
) -> None:
    pub = dkimkeys.generate("ed25519").public_b64
    value = record.format(pub=pub)
    dns_server.add_txt("sel._domainkey.example.com", value)
    r = await dnscheck.check_dkim(resolver, D, "sel", "ed25519", pub)
    assert (r.result, r.reason, r.found) == ("fail", "no DKIM record", value)


async def test_dkim_multiple_records_empty_tags_and_key_mismatches(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    name = "sel._domainkey.example.com"
    key = dkimkeys.generate("rsa")
    pub = key.public_b64

    async def check() -> tuple[str, str]:
        r = await dnscheck.check_dkim(resolver, D, "sel", "rsa", pub)
        return r.result, r.reason

    # Two key records at one selector (here ours, and ours again in testing mode): which one a
    # verifier uses is undefined (RFC 6376 3.6.2.2).
    dns_server.add_txt_value(name, dkimkeys.txt_value("rsa", pub))
    dns_server.add_txt_value(name, f"v=DKIM1; k=rsa; t=y; p={pub}")
    assert await check() == ("fail", "multiple DKIM records")
    dns_server.remove(name, "TXT")
    # An empty tag (a doubled ";") is allowed anywhere in a tag-list.
    dns_server.add_txt_value(name, f"v=DKIM1;; k=rsa; ;p={pub};")
    assert await check() == ("pass", "")
    dns_server.remove(name, "TXT")
    # Our key, declared as another type.
    dns_server.add_txt_value(name, f"v=DKIM1; k=ed25519; p={pub}")
    assert await check() == ("fail", "DKIM key type is ed25519, not rsa")
    dns_server.remove(name, "TXT")
    # Only the first string of the record published (a DNS panel that keeps one string).
    parts = dkimkeys.split_txt(dkimkeys.txt_value("rsa", pub))
    assert len(parts) == 2
    dns_server.add_txt(name, parts[0])
    assert await check() == ("fail", "DKIM key does not match")


async def test_dmarc(dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver) -> None:
    assert (await dnscheck.check_dmarc(resolver, D)).reason == "no TXT record"
    dns_server.add_txt("_dmarc.example.com", "v=DMARC1; rua=mailto:x@example.com")
    assert (await dnscheck.check_dmarc(resolver, D)).reason == "DMARC record has no valid p= tag"
    dns_server.remove("_dmarc.example.com")
    dns_server.add_txt("_dmarc.example.com", "v=DMARC1; p=reject")
    assert (await dnscheck.check_dmarc(resolver, D)).result == "pass"


async def test_dmarc_multiple_records(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    """Two v=DMARC1 records: no policy applies (RFC 7489 6.6.3)."""
    dns_server.add_txt("_dmarc.example.com", "v=DMARC1; p=reject")
    dns_server.add_txt("_dmarc.example.com", "v=DMARC1; p=none")
    r = await dnscheck.check_dmarc(resolver, D)
    assert (r.result, r.reason) == ("fail", "multiple DMARC records")
    assert r.found == "v=DMARC1; p=reject | v=DMARC1; p=none"


# --- MX -----------------------------------------------------------------------------------------


async def test_mx_order_by_preference(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_mx(D, 20, "backup.example.com")
    for host in ("a.example.com", "b.example.com", "c.example.com"):
        dns_server.add_mx(D, 10, host)
    seen = set()
    for seed in range(20):
        mx = await dnslookup.resolve_mx(resolver, D, rng=random.Random(seed))
        assert not mx.implicit and not mx.null_mx and not mx.temperror
        assert mx.hosts[-1] == "backup.example.com"
        assert sorted(mx.hosts[:3]) == ["a.example.com", "b.example.com", "c.example.com"]
        seen.add(mx.hosts[:3])
        # The shuffle is the caller's rng: the same seed gives the same order.
        assert (await dnslookup.resolve_mx(resolver, D, rng=random.Random(seed))) == mx
    assert len(seen) > 1  # equal preferences are shuffled


async def test_implicit_mx_null_mx_and_errors(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_aaaa(D, "2001:db8::25")
    mx = await dnslookup.resolve_mx(resolver, D)
    assert (mx.hosts, mx.implicit) == (("example.com",), True)

    dns_server.add_mx("null.example.com", 0, ".")
    mx = await dnslookup.resolve_mx(resolver, "null.example.com")
    assert mx.null_mx and not mx.hosts and not mx.temperror

    mx = await dnslookup.resolve_mx(resolver, "nowhere.example.com")
    assert (mx.hosts, mx.temperror, mx.reason) == ((), False, "domain does not exist")

    dns_server.add_txt("txtonly.example.com", "hello")
    mx = await dnslookup.resolve_mx(resolver, "txtonly.example.com")
    assert (mx.hosts, mx.temperror) == ((), False)

    dns_server.servfail(D)
    mx = await dnslookup.resolve_mx(resolver, D)
    assert mx.temperror and not mx.hosts


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """A then AAAA addresses of ``host``; empty when there are none or DNS did not answer."""
    return list((await dnslookup.lookup_addresses(resolver, host)).addresses)


async def test_resolve_addresses(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_aaaa("mx.example.com", "2001:db8::1")
    dns_server.add_a("mx.example.com", "192.0.2.25")
    dns_server.add_a("mx.example.com", "192.0.2.26")
    addrs = await _addresses(resolver, "mx.example.com")
    assert sorted(addrs[:2]) == ["192.0.2.25", "192.0.2.26"] and addrs[2] == "2001:db8::1"
    assert await _addresses(resolver, "none.example.com") == []
    dns_server.blackhole(True)
    res = await dnslookup.lookup_addresses(resolver, "mx.example.com")
    assert res.temperror and not res.addresses


async def test_implicit_mx_address_lookup_failure_is_a_temperror(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    """No MX, and the A lookup fails (SERVFAIL) while AAAA has none: defer, never bounce."""
    dns_server.add_txt(D, "v=spf1 -all")  # the name exists: MX and AAAA are NODATA
    dns_server.servfail(D, rtype="A")
    mx = await dnslookup.resolve_mx(resolver, D)
    assert mx == dnslookup.MxResult(temperror=True, reason="address lookup failed")
    dns_server.servfail(D, on=False, rtype="A")
    mx = await dnslookup.resolve_mx(resolver, D)
    assert mx == dnslookup.MxResult(reason="no MX and no address records")


async def test_answers_are_frozen_values(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    """What the lookups return cannot be changed by whoever holds it, and can be a dict key."""
    dns_server.add_mx(D, 10, "mx.example.com")
    dns_server.add_a("mx.example.com", "192.0.2.25")
    mx = await dnslookup.resolve_mx(resolver, D)
    addrs = await dnslookup.lookup_addresses(resolver, "mx.example.com")
    txt = await dnslookup.lookup_txt(resolver, D)
    dmarc = await dnscheck.check_dmarc(resolver, D)
    assert mx.hosts == ("mx.example.com",) and addrs.addresses == ("192.0.2.25",)
    assert len({mx, addrs, txt, dmarc}) == 4  # hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        mx.hosts = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        addrs.temperror = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        txt.nxdomain = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        dmarc.result = "pass"  # type: ignore[misc]


def test_dns_cfg_fixture(dns_cfg: Config, dns_server: TestDNSServer) -> None:
    assert dns_cfg.dns.nameservers == ("127.0.0.1",)
    assert dns_cfg.dns.port == dns_server.port
    assert dns_cfg.dns.timeout == Duration(0.5)
    assert dns_cfg.dns.outbound_ips == ("192.0.2.10",)


async def test_server_answers_over_tcp_too(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    dns_server.add_txt_value(D, "x" * 600)  # three strings, served whole over TCP
    answer = await resolver.resolve(D, "TXT", tcp=True)
    assert [b"".join(rd.strings) for rd in answer] == [b"x" * 600]
    assert [len(s) for s in next(iter(answer)).strings] == [255, 255, 90]

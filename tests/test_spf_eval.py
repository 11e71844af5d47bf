"""SPF evaluated the way receivers evaluate it (relay/dnscheck.py ``check_spf``, ``spf_result``):
with relaybox's own EHLO name as HELO, for a sender in the domain, saying when a record's result
depends on the sender; and the DNS answers RFC 7208 and dnspython disagree on (a TXT record with
no strings, a CNAME loop). Against the real test DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import dataclasses

import dns.asyncresolver
import pytest

from relay import dnscheck, dnslookup
from relay.config import Config
from tests.dnsserver import TestDNSServer

D = "example.com"
OURS = "192.0.2.10"  # dns_cfg's dns.outbound_ips
SENDER_NOTE = "the result depends on the sender ({macros}): evaluated for postmaster@example.com"


@pytest.fixture
def resolver(dns_cfg: Config) -> dns.asyncresolver.Resolver:
    return dnslookup.make_resolver(dns_cfg)


def add_cname_loop(dns_server: TestDNSServer, *names: str) -> None:
    """Each name a CNAME of the next, the last of the first (one name: a CNAME of itself)."""
    for name, target in zip(names, names[1:] + names[:1], strict=True):
        dns_server.add_cname(name, target)


# --- HELO: relaybox's own EHLO name ---------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    ["v=spf1 exists:%{h}._helo.example.com -all", "v=spf1 a:%{h} -all"],
    ids=["exists-h", "a-h"],
)
async def test_spf_is_evaluated_with_relayboxs_ehlo_name(
    dns_server: TestDNSServer,
    dns_cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    record: str,
) -> None:
    """Receivers see relaybox's EHLO name (``public_hostname``) as the HELO identity, so ``%{h}``
    (RFC 7208 7.3) expands to it, never to the customer's domain."""
    cfg = dataclasses.replace(dns_cfg, public_hostname="relay.public.test")
    dns_server.add_txt(D, record)
    dns_server.add_a("relay.public.test._helo.example.com", "127.0.0.2")
    dns_server.add_a("relay.public.test", OURS)
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("pass", "")
    helo = await dnscheck.spf_result(resolver, OURS, D, helo="relay.public.test")
    assert helo.result == "pass"

    # What a HELO of the domain itself would authorize authorizes nothing.
    dns_server.remove("relay.public.test._helo.example.com")
    dns_server.remove("relay.public.test")
    dns_server.add_a("example.com._helo.example.com", "127.0.0.2")
    dns_server.add_a(D, OURS)
    r = await dnscheck.check_spf(resolver, D, cfg)
    assert (r.result, r.reason) == ("fail", f"SPF does not authorize {OURS} (result fail)")
    assert (await dnscheck.spf_result(resolver, OURS, D, helo=D)).result == "pass"  # the old way


# --- records whose result depends on the sender --------------------------------------------------


@pytest.mark.parametrize(
    ("record", "published", "macros"),
    [
        ("v=spf1 exists:%{l}.senders.example.com -all", "postmaster.senders.example.com", "%{l}"),
        ("v=spf1 exists:%{L}.senders.example.com -all", "postmaster.senders.example.com", "%{l}"),
        ("v=spf1 exists:%{lr-}.lp.example.com -all", "postmaster.lp.example.com", "%{l}"),
        ("v=spf1 exists:%{s2}.s.example.com -all", "postmaster@example.com.s.example.com", "%{s}"),
        (
            "v=spf1 exists:%{l}.a.example.com exists:%{s}.b.example.com -all",
            "postmaster.a.example.com",
            "%{l}, %{s}",
        ),
        ("v=spf1 include:_spf.example.net -all", "postmaster._u.example.net", "%{l}"),
    ],
    ids=["l", "L-escaped", "l-transformed", "s", "l-and-s", "l-in-an-include"],
)
async def test_a_sender_dependent_record_says_so(
    dns_server: TestDNSServer,
    dns_cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    record: str,
    published: str,
    macros: str,
) -> None:
    """The check runs without a real sender: it evaluates postmaster@DOMAIN. A record using the
    sender's address (``%{s}``, or its local part ``%{l}``) passes or fails as evaluated, and the
    reason says that other senders may get another result (even on a pass)."""
    dns_server.add_txt(D, record)
    dns_server.add_txt("_spf.example.net", "v=spf1 exists:%{l}._u.example.net -all")
    note = SENDER_NOTE.format(macros=macros)
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == (
        "fail",
        f"SPF does not authorize {OURS} (result fail); {note}",
        record,
    )
    dns_server.add_a(published, "127.0.0.2")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == ("pass", note, record)


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ip4:192.0.2.10 -all",
        "v=spf1 ip4:192.0.2.10 -all exp=why.%{l}.example.com",  # explanation text only
        "v=spf1 exists:%{o}.domains.example.com -all",  # the sender's domain: always DOMAIN
        "v=spf1 exists:%{d}.domains.example.com -all",
    ],
    ids=["no-macro", "l-in-exp-only", "o", "d"],
)
async def test_a_record_that_does_not_depend_on_the_sender_has_no_note(
    dns_server: TestDNSServer,
    dns_cfg: Config,
    resolver: dns.asyncresolver.Resolver,
    record: str,
) -> None:
    """relaybox only sends as addresses in the domain (relay/smtp/policy.py), so ``%{o}`` and
    ``%{d}`` are the domain for every sender; ``exp=`` explains a fail and never changes it."""
    dns_server.add_txt(D, record)
    dns_server.add_a("example.com.domains.example.com", "127.0.0.2")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("pass", "")


# --- a TXT record with no strings ----------------------------------------------------------------


async def test_a_txt_record_with_no_strings_is_an_empty_string(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """dnspython refuses a TXT RR of zero character-strings, and over UDP it then waits for an
    answer that never comes (a timeout, a temperror). It is an empty string: not an SPF record
    (RFC 7208 4.5), and no reason for the other records of the name not to count."""
    record = "v=spf1 include:_spf.example.net -all"
    dns_server.add_empty_txt(D)
    dns_server.add_txt(D, record)
    dns_server.add_empty_txt("_spf.example.net")  # read by pyspf, through its DNS hook
    dns_server.add_txt("_spf.example.net", f"v=spf1 ip4:{OURS} -all")
    assert await dnslookup.lookup_txt(resolver, D) == dnslookup.TxtAnswer(records=("", record))
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == ("pass", "", record)
    assert (await dnscheck.spf_result(resolver, OURS, "_spf.example.net", helo="relay.test")) == (
        "pass",
        "sender SPF authorized",
        (),
    )
    answer = await resolver.resolve(D, "TXT", tcp=True)  # the same over TCP
    assert sorted(b"".join(rd.strings) for rd in answer) == [b"", record.encode()]

    dns_server.remove(D, "TXT")
    dns_server.add_empty_txt(D)
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason, r.found) == ("fail", "no SPF record", "")
    # The other checks read TXT records the same way.
    dns_server.add_empty_txt("_relaybox.example.com")
    dns_server.add_txt("_relaybox.example.com", "relaybox-verification=tok123")
    assert (await dnscheck.check_ownership(resolver, D, "tok123")).result == "pass"


# --- CNAME loops ---------------------------------------------------------------------------------


async def test_a_cname_loop_at_an_includes_target_is_no_record(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """RFC 7208 4.4 and 5: only an RCODE other than 0 (NOERROR) or 3 (NXDOMAIN), or a timeout,
    is a temperror. A CNAME loop is answered NOERROR with no TXT record at its end: the target has
    no SPF record, its check_host() is "none", and an include of "none" is a permerror (5.2).
    Through a CNAME that ends somewhere, the include is followed as before."""
    add_cname_loop(dns_server, "loop.example.net", "loop2.example.net")
    dns_server.add_txt(D, f"v=spf1 include:loop.example.net ip4:{OURS} -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert r.result == "fail", r
    assert r.reason.startswith("SPF permerror: ")
    assert "No valid SPF record for included domain: loop.example.net" in r.reason

    dns_server.remove(D, "TXT")
    dns_server.add_txt(D, "v=spf1 include:alias.example.net -all")
    dns_server.add_cname("alias.example.net", "_spf.example.net")
    dns_server.add_txt("_spf.example.net", f"v=spf1 ip4:{OURS} -all")
    assert (await dnscheck.check_spf(resolver, D, dns_cfg)).result == "pass"


async def test_a_cname_loop_is_a_void_lookup(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """A mechanism whose name loops matches nothing and evaluation goes on; each such lookup
    counts against the limit of two void lookups (RFC 7208 4.6.4), as an empty answer does."""
    add_cname_loop(dns_server, "l1.example.net", "l1b.example.net")
    add_cname_loop(dns_server, "l2.example.net")
    add_cname_loop(dns_server, "l3.example.net")
    dns_server.add_txt(D, f"v=spf1 a:l1.example.net mx:l2.example.net ip4:{OURS} -all")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("pass", "")

    dns_server.remove(D, "TXT")
    dns_server.add_txt(D, f"v=spf1 a:l1.example.net a:l2.example.net a:l3.example.net ip4:{OURS}")
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert r.result == "fail" and r.reason.startswith("SPF permerror: "), r
    assert "Void lookup limit of 2 exceeded" in r.reason


async def test_a_cname_loop_behind_a_ptr_name_skips_the_name(
    dns_server: TestDNSServer, resolver: dns.asyncresolver.Resolver
) -> None:
    """The RFC 7208 test suite's "ptr-cname-loop" (RFC 7208 5.5: a name whose address lookup
    fails is skipped and the search goes on): the ``ptr`` matches nothing, the result is
    neutral."""
    dns_server.add_txt("loop.example.com", "v=spf1 ptr")
    dns_server.add_ptr("4.2.0.192.in-addr.arpa", "loop4.example.com.")
    dns_server.add_cname("loop4.example.com", "CNAME.example.com.")
    dns_server.add_cname("cname.example.com", "CNAME.example.com.")
    outcome = await dnscheck.spf_result(
        resolver, "192.0.2.4", "loop.example.com", helo="loop.example.com"
    )
    assert outcome.result == "neutral", outcome


async def test_a_cname_loop_at_the_domain_is_no_record(
    dns_server: TestDNSServer, dns_cfg: Config, resolver: dns.asyncresolver.Resolver
) -> None:
    """The domain's own TXT lookup: a loop is a definite "no record", not a temperror (which
    would leave a domain verified forever on records nobody can read). Delivery's MX lookups
    keep treating it as a temporary failure (deferral, not a bounce)."""
    add_cname_loop(dns_server, D, "loop.example.net")
    assert await dnslookup.lookup_txt(resolver, D) == dnslookup.TxtAnswer()
    r = await dnscheck.check_spf(resolver, D, dns_cfg)
    assert (r.result, r.reason) == ("fail", "no TXT record")
    add_cname_loop(dns_server, "_dmarc.example.org")
    assert (await dnscheck.check_dmarc(resolver, "example.org")).reason == "no TXT record"
    mx = await dnslookup.resolve_mx(resolver, D)
    assert mx.temperror and not mx.hosts

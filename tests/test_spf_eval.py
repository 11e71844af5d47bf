"""SPF evaluated the way receivers evaluate it (relay/dnscheck.py ``check_spf``, ``spf_result``):
with relaybox's own EHLO name as HELO, for a sender in the domain, saying when a record's result
depends on the sender; and a DNS answer dnspython refuses (a TXT record with no strings).
Against the real test DNS server on loopback (tests/dnsserver.py)."""

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

"""DNS lookups: the resolver built from ``[dns]``, TXT records, and MX routing for delivery.

Lookups go through a ``dns.asyncresolver.Resolver`` built from ``[dns]`` (nameservers, port,
timeout) so tests point it at a loopback server. Each answer is one of three kinds, and callers must
keep them apart: records; a definite "no such record" (NXDOMAIN or NODATA); or a temperror (timeout,
SERVFAIL, no nameserver answered), which says nothing about the domain and must change no state.

The domain checks (relay/dnscheck.py) read TXT records through :func:`lookup_txt`; delivery
(relay/delivery/outbound.py) routes through :func:`resolve_mx` and :func:`lookup_addresses`.

Two answers dnspython would turn into a temperror are definite here, as RFC 7208 reads them:
- A TXT record of no character-strings (RDLENGTH 0; RFC 1035 asks for one or more) makes
  dnspython refuse the whole answer, and over UDP then wait for another until it times out. This
  module teaches dnspython's TXT parser, process-wide and once, to read it as one empty string.
- A CNAME loop answered NOERROR (dnspython: "The CNAME chain is too long") has no record at its
  end: :func:`lookup_txt` (and pyspf's DNS hook) count it as no record, RFC 7208 4.4 and 5 making
  only an RCODE other than 0 or 3, or a timeout, a temperror. Delivery's MX and address lookups
  keep it a temperror (defer, never bounce on it). A SERVFAIL for a loop stays a temperror.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.wire

from relay.config import Config


@dataclass(frozen=True)
class TxtAnswer:
    records: tuple[str, ...] = ()  # one string per TXT record, its strings joined (RFC 7208 3.3)
    temperror: str = ""  # non-empty: no definite answer, and why
    nxdomain: bool = False  # the name does not exist (else empty records mean NODATA)


@dataclass(frozen=True)
class MxResult:
    hosts: tuple[str, ...] = ()  # in the order to try (RFC 5321 5.1), no final dot
    implicit: bool = False  # no MX: the domain's own address records (RFC 5321 5.1)
    null_mx: bool = False  # RFC 7505: the domain accepts no mail at all
    temperror: bool = False  # no definite answer: defer, never bounce
    reason: str = ""  # why hosts is empty


@dataclass(frozen=True)
class AddressResult:
    addresses: tuple[str, ...] = ()  # A records first, then AAAA
    temperror: bool = False


# --- what dnspython refuses ----------------------------------------------------------------------

_TXT = dns.rdtypes.ANY.TXT.TXT
_parse_txt = _TXT.from_wire_parser  # dnspython's own, bound to the TXT class


def _parse_txt_of_no_strings(
    rdclass: dns.rdataclass.RdataClass,
    rdtype: dns.rdatatype.RdataType,
    parser: dns.wire.Parser,
    origin: dns.name.Name | None = None,
) -> dns.rdtypes.ANY.TXT.TXT:
    """dnspython's TXT parser, except that a record of no strings is one empty string."""
    if parser.remaining() == 0:  # the parser is restricted to this record's RDATA
        return _TXT(rdclass, rdtype, [b""])
    return _parse_txt(rdclass, rdtype, parser, origin)


_TXT.from_wire_parser = staticmethod(_parse_txt_of_no_strings)  # type: ignore[method-assign]


def _loops(response: dns.message.Message) -> bool:
    """Whether the CNAME chain in ``response`` comes back to a name it already passed."""
    if len(response.question) != 1:
        return False
    question = response.question[0]
    name, seen = question.name, set[dns.name.Name]()
    while name not in seen:
        seen.add(name)
        try:
            rrset = response.find_rrset(
                response.answer, name, question.rdclass, dns.rdatatype.CNAME
            )
        except KeyError:
            return False  # the chain ends (at an answer, or nowhere): no loop
        name = next(rd.target for rd in rrset if isinstance(rd, dns.rdtypes.ANY.CNAME.CNAME))
    return True


def cname_loop(exc: dns.resolver.NoNameservers) -> bool:
    """Whether a server answered NOERROR with a CNAME chain that loops (RFC 1034 3.6.2)."""
    errors: list[dns.resolver.ErrorTuple] = exc.kwargs.get("errors", [])
    return any(
        isinstance(err, dns.message.ChainTooLong) and response is not None and _loops(response)
        for _server, _tcp, _port, err, response in errors
    )


# --- the resolver -------------------------------------------------------------------------------


def make_resolver(cfg: Config) -> dns.asyncresolver.Resolver:
    """A resolver using ``dns.nameservers`` (or /etc/resolv.conf when empty) and ``dns.timeout``."""
    if cfg.dns.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.port = cfg.dns.port
        resolver.nameservers = list(cfg.dns.nameservers)
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            # No resolv.conf: every lookup is then a temperror ("no nameservers"), not a crash.
            resolver = dns.asyncresolver.Resolver(configure=False)
        if cfg.dns.port != 53:
            resolver.port = cfg.dns.port
    # A lookup slower than this, retries included, is a temperror.
    resolver.timeout = float(cfg.dns.timeout)
    resolver.lifetime = float(cfg.dns.timeout)
    # EDNS0 with the DNS-flag-day buffer size: a 2048-bit DKIM record fits one UDP answer.
    resolver.use_edns(0, 0, 1232)
    return resolver


def sync_twin(resolver: dns.asyncresolver.Resolver) -> dns.resolver.Resolver:
    """A blocking resolver with the same servers and limits (pyspf runs in a worker thread)."""
    twin = dns.resolver.Resolver(configure=False)
    twin.port = resolver.port
    twin.nameserver_ports = dict(resolver.nameserver_ports)
    twin.nameservers = list(resolver.nameservers)
    twin.timeout = resolver.timeout
    twin.lifetime = resolver.lifetime
    twin.use_edns(0, 0, 1232)
    return twin


def temperror_reason(exc: BaseException) -> str:
    """Why a lookup had no definite answer, in the words a check result or log line shows."""
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return (
            "DNS server failure (SERVFAIL)" if "SERVFAIL" in str(exc) else "no nameserver answered"
        )
    return f"DNS error ({type(exc).__name__})"


async def _resolve(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str, *, loop_is_void: bool = False
) -> tuple[dns.resolver.Answer | None, bool, str]:
    """(answer or None, nxdomain, temperror reason) for one query, no exception escaping; with
    ``loop_is_void``, a CNAME loop is a definite "no record" (NODATA) instead of a temperror."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return None, True, ""
    except dns.resolver.NoAnswer:
        return None, False, ""
    except dns.resolver.NoNameservers as exc:
        return None, False, "" if loop_is_void and cname_loop(exc) else temperror_reason(exc)
    except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong):
        return None, True, ""  # a name that cannot exist has no records
    except (dns.exception.DNSException, OSError) as exc:
        return None, False, temperror_reason(exc)
    return answer, False, ""


async def lookup_txt(resolver: dns.asyncresolver.Resolver, name: str) -> TxtAnswer:
    """TXT records at ``name``, each record's character-strings joined without separators
    (RFC 7208 3.3, RFC 6376 3.6.2.2). A record of no strings is an empty one; a CNAME loop
    is no record (see the module docstring)."""
    answer, nxdomain, temperror = await _resolve(resolver, name, "TXT", loop_is_void=True)
    if answer is None:
        return TxtAnswer(temperror=temperror, nxdomain=nxdomain)
    return TxtAnswer(
        records=tuple(b"".join(rd.strings).decode("utf-8", "replace") for rd in answer)
    )


# --- MX routing for delivery --------------------------------------------------------------------


async def lookup_addresses(resolver: dns.asyncresolver.Resolver, host: str) -> AddressResult:
    """A then AAAA records of ``host`` (queried concurrently); temperror only when nothing was
    found and a lookup had no definite answer."""
    (a, _, err_a), (aaaa, _, err_aaaa) = await asyncio.gather(
        _resolve(resolver, host, "A"), _resolve(resolver, host, "AAAA")
    )
    addrs = [rd.address for ans in (a, aaaa) if ans is not None for rd in ans]
    return AddressResult(tuple(addrs), temperror=not addrs and bool(err_a or err_aaaa))


def _order(mx: Sequence[tuple[int, str]], rng: random.Random | None) -> tuple[str, ...]:
    """Lowest preference first; equal preferences shuffled to spread load (RFC 5321 5.1)."""
    shuffle = (rng or random).shuffle
    by_pref: dict[int, list[str]] = {}
    for pref, host in mx:
        by_pref.setdefault(pref, []).append(host)
    hosts: list[str] = []
    for pref in sorted(by_pref):
        group = list(dict.fromkeys(by_pref[pref]))
        shuffle(group)
        hosts += [h for h in group if h not in hosts]
    return tuple(hosts)


async def resolve_mx(
    resolver: dns.asyncresolver.Resolver, domain: str, *, rng: random.Random | None = None
) -> MxResult:
    """Where to deliver mail for ``domain`` (RFC 5321 5.1, RFC 7505)."""
    answer, nxdomain, temperror = await _resolve(resolver, domain, "MX")
    if temperror:
        return MxResult(temperror=True, reason=temperror)
    if nxdomain:
        return MxResult(reason="domain does not exist")
    if answer is not None:
        mx = [(rd.preference, rd.exchange.to_text(omit_final_dot=True).lower()) for rd in answer]
        real = [(p, h) for p, h in mx if h not in ("", ".")]
        if not real:  # only "." exchanges: RFC 7505 null MX, "this domain accepts no mail"
            return MxResult(null_mx=True, reason="domain accepts no mail (null MX)")
        return MxResult(hosts=_order(real, rng))
    # No MX records: the domain itself is the implicit MX, if it has an address.
    addrs = await lookup_addresses(resolver, domain)
    if addrs.addresses:
        return MxResult(hosts=(domain.lower().rstrip("."),), implicit=True)
    if addrs.temperror:
        return MxResult(temperror=True, reason="address lookup failed")
    return MxResult(reason="no MX and no address records")

"""The domain checks: ownership, SPF, DKIM and DMARC records of a sender domain, looked up now.

Each check takes names and the values expected (the domain, its ownership token, its DKIM selector
and public key, the SPF terms from ``[dns]``) and returns a :class:`CheckResult`: pass, fail, or
temperror when DNS gave no definite answer (which must change no state). What a check result means
for the domain's state is the store's business (relay/store/domains.py), not this module's.

TXT records come through relay/dnslookup.py (its resolver is re-exported here as
:func:`make_resolver`, for callers that only check). SPF is evaluated by pyspf, the reference
RFC 7208 implementation (include, redirect, a, mx, ptr, exists, macros, the 10-lookup and
void-lookup limits). pyspf is synchronous and resolves through the module-level
``spf.DNSLookup``; we replace it once, process-wide, with :func:`_spf_dns_lookup`, which uses the
resolver placed in a context variable by the worker thread running the check. Each
``asyncio.to_thread`` call runs in its own copy of the context, so concurrent checks against
different resolvers never see each other's (tests/test_dnscheck.py checks this).

SPF is evaluated as receivers will: HELO is relaybox's own EHLO name (``public_hostname``), and
the sender, unknown here, is ``postmaster@DOMAIN`` (relaybox sends only as addresses in the
domain, so ``%{o}`` and ``%{d}`` are the same for every sender). A record read during the
evaluation that uses ``%{s}`` or ``%{l}`` gives other senders other results: the check's result
stays what was evaluated, and its reason says so, on a pass too (tests/test_spf_eval.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import dns.asyncresolver
import dns.exception
import dns.resolver
import spf

from relay import dkimkeys
from relay.config import Config
from relay.dnslookup import cname_loop, lookup_txt, sync_twin, temperror_reason

# Re-exported: the resolver the checks use, for callers that only check.
from relay.dnslookup import make_resolver as make_resolver

OWNERSHIP_LABEL = "_relaybox"
OWNERSHIP_PREFIX = "relaybox-verification="
DMARC_SUGGESTION = "v=DMARC1; p=none"  # RFC 7489 6.7: start by monitoring, then tighten
SPF_QUERYTIME = 20.0  # RFC 7208 4.6.4: an SPF evaluation may be bounded at 20 s in all
_PROBE_IP = "192.0.2.1"  # RFC 5737 TEST-NET-1: evaluates a record without claiming an address


@dataclass(frozen=True)
class CheckResult:
    check: str  # "ownership" | "spf" | "dkim" | "dmarc"
    result: str  # "pass" | "fail" | "temperror"
    reason: str  # on pass: empty, or a note (SPF: the result depends on the sender)
    expected: str
    found: str

    def as_json(self) -> dict[str, str]:
        """The one JSON shape of a check result: stored in domains.checks, shown by ``--json``."""
        return {
            "check": self.check,
            "result": self.result,
            "reason": self.reason,
            "expected": self.expected,
            "found": self.found,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> CheckResult:
        """The result :meth:`as_json` wrote."""
        return cls(data["check"], data["result"], data["reason"], data["expected"], data["found"])


# --- SPF through pyspf --------------------------------------------------------------------------

_spf_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "relaybox_spf_resolver", default=None
)


def _spf_dns_lookup(
    name: str, qtype: str, strict: object = True, timeout: float = SPF_QUERYTIME
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook: its original shape, our resolver, and no DeprecationWarning."""
    resolver = _spf_resolver.get()
    try:
        if resolver is None:  # a caller outside this module: the system resolver
            resolver = dns.resolver.get_default_resolver()
        lifetime = max(0.01, min(float(timeout), float(resolver.lifetime)))
        answer = resolver.resolve(name, qtype, lifetime=lifetime, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.resolver.NoNameservers as exc:
        if cname_loop(exc):  # NOERROR, and no record at the end: a void lookup (RFC 7208 4.6.4)
            return []
        raise spf.TempError(temperror_reason(exc)) from None
    except (dns.exception.DNSException, OSError) as exc:
        raise spf.TempError(temperror_reason(exc)) from None
    out: list[tuple[tuple[str, str], Any]] = []
    for rd in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rd.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rd.preference, rd.exchange.to_text(omit_final_dot=True))))
        elif qtype == "PTR":
            out.append(((name, qtype), rd.target.to_text(omit_final_dot=True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rd.strings))
    return out


spf.DNSLookup = _spf_dns_lookup  # process-wide, once: see the module docstring


class SpfOutcome(NamedTuple):
    result: str  # pass, fail, softfail, neutral, none, permerror or temperror
    explanation: str
    sender_macros: tuple[str, ...]  # "%{l}", "%{s}": used by an SPF record the evaluation read


_SENDER_MACRO = re.compile(r"%\{([ls])", re.IGNORECASE)  # RFC 7208 7.3: the sender, its local part


def _sender_macros(records: list[bytes]) -> tuple[str, ...]:
    """The sender macros in the terms of the SPF ``records`` (``exp=`` only explains a fail)."""
    found = {
        f"%{{{letter.lower()}}}"
        for record in records
        if _is_spf(text := record.decode("ascii", "replace"))
        for term in text.split()
        if not term.lower().startswith("exp=")
        for letter in _SENDER_MACRO.findall(term)
    }
    return tuple(sorted(found))


def _spf_in_thread(resolver: dns.resolver.Resolver, ip: str, sender: str, helo: str) -> SpfOutcome:
    _spf_resolver.set(resolver)  # this thread's own context copy (asyncio.to_thread)
    query = spf.query(i=ip, s=sender, h=helo, querytime=SPF_QUERYTIME)
    result, _code, explanation = query.check()
    # pyspf's cache: every name the evaluation read, (name, type) -> answers (TXT: strings).
    txt: list[bytes] = [b"".join(v) for (_, t), vs in query.cache.items() if t == "TXT" for v in vs]
    return SpfOutcome(str(result), str(explanation), _sender_macros(txt))


async def spf_result(
    resolver: dns.asyncresolver.Resolver, ip: str, domain: str, *, helo: str, sender: str = ""
) -> SpfOutcome:
    """RFC 7208 ``check_host()`` for mail from ``sender`` (default ``postmaster@domain``) by a
    client at ``ip`` that said ``EHLO helo``."""
    sender = sender or f"postmaster@{domain}"
    return await asyncio.to_thread(_spf_in_thread, sync_twin(resolver), ip, sender, helo)


def _is_spf(record: str) -> bool:
    return re.match(r"^v=spf1( |$)", record, re.IGNORECASE) is not None  # RFC 7208 4.5


def spf_suggestion(cfg: Config) -> str:
    """The SPF record we ask the domain to publish (to merge with an existing one)."""
    terms = ["v=spf1"]
    for ip in cfg.dns.outbound_ips:
        terms.append(f"ip6:{ip}" if ":" in ip else f"ip4:{ip}")
    if cfg.dns.spf_include:
        terms.append(f"include:{cfg.dns.spf_include}")
    if len(terms) == 1:
        terms.append("mx")
    terms.append("~all")
    return " ".join(terms)


async def _reaches(
    resolver: dns.asyncresolver.Resolver, record: str, target: str
) -> tuple[bool, str]:
    """Whether ``record`` reaches ``include:target`` through includes and redirects.

    Only terms that can take effect count: a "+" (or unqualified) include before any "all", and a
    redirect only in a record without "all" (RFC 7208 5.1, 6.1). Names with macros are skipped.
    Our include must be at most the 10th lookup (the limit of RFC 7208 4.6.4).
    Returns (found, temperror).
    """
    target = target.lower().rstrip(".")
    queue, seen = [record], set[str]()
    while queue and len(seen) < 10:  # each name fetched was one lookup; ours would be the next
        terms = queue.pop(0).split()[1:]
        names: list[str] = []
        redirect = ""
        for term in terms:
            low = term.lower()
            if re.match(r"^[+?~-]?all$", low):
                redirect = ""
                break
            if low.startswith("redirect="):
                redirect = low.split("=", 1)[1]
            elif re.match(r"^\+?include:", low):
                names.append(low.split(":", 1)[1])
        names += [redirect] if redirect else []
        for name in (n.rstrip(".") for n in names):
            if name == target:
                return True, ""
            if "%" in name or name in seen:
                continue
            seen.add(name)
            ans = await lookup_txt(resolver, name)
            if ans.temperror:
                return False, ans.temperror
            queue += [r for r in ans.records if _is_spf(r)][:1]
    return False, ""


async def check_spf(resolver: dns.asyncresolver.Resolver, domain: str, cfg: Config) -> CheckResult:
    """Pass when each ``dns.outbound_ips`` address gets "pass" and the record reaches
    ``dns.spf_include``; with neither configured, one valid v=spf1 record is enough."""
    expected = spf_suggestion(cfg)

    def result(res: str, reason: str = "", found: str = "") -> CheckResult:
        return CheckResult("spf", res, reason, expected, found)

    ans = await lookup_txt(resolver, domain)
    if ans.temperror:
        return result("temperror", ans.temperror)
    records = [r for r in ans.records if _is_spf(r)]
    if not ans.records:
        return result("fail", "no TXT record")
    if not records:
        return result("fail", "no SPF record", " | ".join(ans.records))
    if len(records) > 1:  # RFC 7208 4.5: permerror
        return result("fail", "multiple SPF records", " | ".join(records))
    found = records[0]
    include = cfg.dns.spf_include
    probes = list(cfg.dns.outbound_ips) or [_PROBE_IP]
    helo = cfg.public_hostname  # what receivers see: relaybox's EHLO, never the domain
    outcomes = await asyncio.gather(*(spf_result(resolver, ip, domain, helo=helo) for ip in probes))
    macros = ", ".join(sorted({m for outcome in outcomes for m in outcome.sender_macros}))
    note = f"the result depends on the sender ({macros}): evaluated for postmaster@{domain}"
    note = note if macros else ""  # a pass says it too: other senders may get a fail

    def failed(why: str) -> CheckResult:
        return result("fail", f"{why}; {note}" if note else why, found)

    for ip, (res, explanation, _) in zip(probes, outcomes, strict=True):
        if res == "temperror":
            return result("temperror", f"SPF temperror: {explanation}", found)
        if res == "permerror":
            return result("fail", f"SPF permerror: {explanation}", found)
        if cfg.dns.outbound_ips and res != "pass":
            return failed(f"SPF does not authorize {ip} (result {res})")
    if include:
        reached, temperror = await _reaches(resolver, found, include)
        if temperror:
            return result("temperror", temperror, found)
        if not reached:
            return failed(f"SPF does not include {include}")
    return result("pass", note, found)


# --- ownership, DKIM, DMARC ---------------------------------------------------------------------


def ownership_name(domain: str) -> str:
    return f"{OWNERSHIP_LABEL}.{domain}"


def ownership_value(token: str) -> str:
    return f"{OWNERSHIP_PREFIX}{token}"


def dkim_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"  # RFC 6376 3.6.2.1


def dmarc_name(domain: str) -> str:
    return f"_dmarc.{domain}"  # RFC 7489 6.1


async def check_ownership(
    resolver: dns.asyncresolver.Resolver, domain: str, token: str
) -> CheckResult:
    expected = ownership_value(token)
    ans = await lookup_txt(resolver, ownership_name(domain))
    found = " | ".join(ans.records)
    if ans.temperror:
        return CheckResult("ownership", "temperror", ans.temperror, expected, found)
    if not ans.records:
        return CheckResult("ownership", "fail", "no TXT record", expected, found)
    if any(r.strip() == expected for r in ans.records):
        return CheckResult("ownership", "pass", "", expected, expected)
    return CheckResult("ownership", "fail", "token mismatch", expected, found)


def _tags(record: str) -> dict[str, str] | None:
    """RFC 6376 3.2 tag-list: ``name=value`` separated by ";", whitespace around each ignored."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or name.strip() in tags:
            return None
        tags[name.strip()] = value.strip()
    return tags


async def check_dkim(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    selector: str,
    algorithm: str,
    public_key: str,
) -> CheckResult:
    expected = dkimkeys.txt_value(algorithm, public_key)

    def result(res: str, reason: str = "", found: str = "") -> CheckResult:
        return CheckResult("dkim", res, reason, expected, found)

    ans = await lookup_txt(resolver, dkim_name(selector, domain))
    if ans.temperror:
        return result("temperror", ans.temperror)
    if not ans.records:
        return result("fail", "no TXT record")
    keys = [
        (r, t)
        for r in ans.records
        if (t := _tags(r)) is not None and t.get("v", "DKIM1") == "DKIM1" and "p" in t
    ]
    if not keys:
        return result("fail", "no DKIM record", " | ".join(ans.records))
    if len(keys) > 1:
        return result("fail", "multiple DKIM records", " | ".join(r for r, _ in keys))
    found, tags = keys[0]
    published = re.sub(r"\s+", "", tags["p"])  # base64 may be folded (RFC 6376 3.6.1)
    if not published:
        return result("fail", "DKIM key revoked (empty p=)", found)
    if tags.get("k", "rsa").lower() != algorithm:
        return result("fail", f"DKIM key type is {tags.get('k', 'rsa')}, not {algorithm}", found)
    if published != public_key:
        return result("fail", "DKIM key does not match", found)
    return result("pass", "", found)


async def check_dmarc(resolver: dns.asyncresolver.Resolver, domain: str) -> CheckResult:
    """One ``v=DMARC1`` record with a valid ``p=`` at ``_dmarc.<domain>`` (RFC 7489 6.6.3).

    The organizational-domain fallback is not applied: we ask for a record at the domain itself.
    """

    def result(res: str, reason: str = "", found: str = "") -> CheckResult:
        return CheckResult("dmarc", res, reason, DMARC_SUGGESTION, found)

    ans = await lookup_txt(resolver, dmarc_name(domain))
    if ans.temperror:
        return result("temperror", ans.temperror)
    if not ans.records:
        return result("fail", "no TXT record")
    records = [r for r in ans.records if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", r)]
    if not records:
        return result("fail", "no DMARC record", " | ".join(ans.records))
    if len(records) > 1:
        return result("fail", "multiple DMARC records", " | ".join(records))
    tags = _tags(records[0]) or {}
    if tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        return result("fail", "DMARC record has no valid p= tag", records[0])
    return result("pass", "", records[0])


async def run_checks(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    *,
    token: str,
    dkim_selector: str,
    dkim_algorithm: str,
    dkim_public_key: str,
    cfg: Config,
) -> list[CheckResult]:
    """Every check in ``config_sections.CHECKS`` (required or not), concurrently, in that order."""
    results = await asyncio.gather(
        check_ownership(resolver, domain, token),
        check_spf(resolver, domain, cfg),
        check_dkim(resolver, domain, dkim_selector, dkim_algorithm, dkim_public_key),
        check_dmarc(resolver, domain),
    )
    return list(results)

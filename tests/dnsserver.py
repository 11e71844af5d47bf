"""A real DNS server on loopback for tests: a mutable in-memory zone served by dnslib.

Loaded as a pytest plugin (``pytest_plugins`` in tests/conftest.py). Fixtures:

``dns_server``
    A :class:`TestDNSServer` listening on 127.0.0.1 at an ephemeral port, UDP and TCP on the same
    port (dnspython retries a truncated UDP answer over TCP). Records can be added and removed while
    the test runs; the server answers from the current zone on every query::

        dns_server.add_txt("example.com", "v=spf1 ", "ip4:192.0.2.10 -all")  # one TXT, two strings
        dns_server.add_empty_txt("example.com")   # one TXT with no strings at all (rdlength 0)
        dns_server.add_mx("example.com", 10, "mx1.example.com")
        dns_server.add_a("mx1.example.com", "127.0.0.1")
        dns_server.remove("example.com", "TXT")     # or remove("example.com") for every type
        dns_server.add_ptr("10.2.0.192.in-addr.arpa", "mail.example.com")
        dns_server.servfail("example.com")          # SERVFAIL for that name; servfail(None): all
        dns_server.servfail("example.com", rtype="A")  # SERVFAIL for A queries only
        dns_server.blackhole(True)                  # drop every query: clients time out

    Answers follow real servers: a name that exists with other types gets NOERROR with an empty
    answer (NODATA), a name that does not exist gets NXDOMAIN (dnslib's own ZoneResolver answers
    NXDOMAIN in both cases, which would hide bugs in callers that must tell them apart).

``dns_cfg``
    The ``cfg`` fixture pointed at that server: ``dns.nameservers = ["127.0.0.1"]``,
    ``dns.port = <port>``, ``dns.timeout = 0.5s`` (so timeout tests stay quick) and
    ``dns.outbound_ips = ["192.0.2.10"]`` (the address the SPF check expects to be authorized).

The server runs in its own threads, so it also serves sync tests (Click's CliRunner runs
``asyncio.run`` inside the test). Teardown shuts both listeners down and closes their sockets.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import pytest
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

from relay.config import Config
from relay.units import Duration

log = logging.getLogger("tests.dnsserver")

TTL = 60
_SUPPORTED = ("A", "AAAA", "MX", "TXT", "CNAME", "PTR")


def _key(name: str) -> str:
    """Zone keys: lowercase, no final dot (DNS names compare case-insensitively)."""
    return name.lower().rstrip(".")


def _edns(request: DNSRecord) -> tuple[int, int, int] | None:
    """(UDP payload size, version, flags) of the query's EDNS OPT record (RFC 6891 6.1.3)."""
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return rr.rclass, (rr.ttl >> 16) & 0xFF, rr.ttl & 0xFFFF
    return None


class _Zone:
    """The mutable zone and the failure switches. Guarded by a lock: handlers run in threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rrs: dict[str, list[tuple[str, Any]]] = {}
        self.servfail_names: set[str] = set()
        self.servfail_types: set[tuple[str, str]] = set()
        self.servfail_all = False
        self.drop = False
        self.queries: list[tuple[str, str]] = []
        self.edns: list[tuple[int, int, int] | None] = []

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        reply = request.reply()
        with self.lock:
            self.queries.append((_key(qname), qtype))
            self.edns.append(_edns(request))
            if (
                self.servfail_all
                or _key(qname) in self.servfail_names
                or (_key(qname), qtype) in self.servfail_types
            ):
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            name = qname
            for _hop in range(8):  # follow CNAMEs inside the zone, like an authoritative server
                entries = self.rrs.get(_key(name))
                if entries is None:
                    if name == qname:
                        reply.header.rcode = RCODE.NXDOMAIN
                    return reply
                wanted = [rd for t, rd in entries if t == qtype]
                cnames = [rd for t, rd in entries if t == "CNAME"]
                if wanted or not cnames or qtype == "CNAME":
                    for rd in wanted:  # empty: NODATA (NOERROR, no answer)
                        reply.add_answer(RR(name, getattr(QTYPE, qtype), rdata=rd, ttl=TTL))
                    return reply
                reply.add_answer(RR(name, QTYPE.CNAME, rdata=cnames[0], ttl=TTL))
                name = str(cnames[0].label)
        return reply


class _Handler(DNSHandler):
    def handle(self) -> None:
        zone: _Zone = self.server.resolver
        if zone.drop:
            return  # blackhole: no answer at all, the client times out
        super().handle()


class TestDNSServer:
    """What the ``dns_server`` fixture yields. All methods are thread-safe."""

    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self._zone = _Zone()
        logger = DNSLogger(prefix=False, logf=log.debug)
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        udp, tcp = self._bind_pair(logger)
        self._servers.extend((udp, tcp))
        self.port: int = udp.server.server_address[1]

    _BIND_ATTEMPTS = 20

    def _bind_pair(self, logger: DNSLogger) -> tuple[DNSServer, DNSServer]:
        """A UDP and a TCP server on one ephemeral port: dnspython falls back to TCP on the same
        port for a truncated answer, so a UDP-only server would hide that path. The UDP port is
        picked by the kernel; if its TCP twin is taken, both are closed and another pair is tried.
        """
        for _ in range(self._BIND_ATTEMPTS):
            udp = DNSServer(
                self._zone, address="127.0.0.1", port=0, logger=logger, handler=_Handler
            )
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self._zone,
                    address="127.0.0.1",
                    port=port,
                    tcp=True,
                    logger=logger,
                    handler=_Handler,
                )
            except OSError as exc:
                udp.server.server_close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return udp, tcp
        raise RuntimeError(
            f"test DNS server: no port free for both UDP and TCP in {self._BIND_ATTEMPTS} tries"
        )

    def start(self) -> None:
        for srv in self._servers:
            t = threading.Thread(
                target=srv.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dns-{srv.server.socket_type}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        for srv in self._servers:
            srv.server.shutdown()
            srv.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # --- zone editing -------------------------------------------------------------------------

    def _add(self, name: str, rtype: str, rdata: Any) -> None:
        with self._zone.lock:
            self._zone.rrs.setdefault(_key(name), []).append((rtype, rdata))

    def add_txt(self, name: str, *strings: str | bytes) -> None:
        """One TXT record made of the given character-strings (each at most 255 bytes)."""
        parts = [s.encode() if isinstance(s, str) else s for s in strings]
        if not parts or any(len(p) > 255 for p in parts):
            raise ValueError("a TXT record needs 1..n strings of at most 255 bytes each")
        self._add(name, "TXT", TXT(parts))

    def add_empty_txt(self, name: str) -> None:
        """One TXT record with no character-strings at all (RDLENGTH 0). RFC 1035 3.3.14 asks for
        one or more, yet a zone can hold it (RFC 3597: ``TXT \\# 0``) and servers serve it."""
        self._add(name, "TXT", TXT([]))

    def add_txt_value(self, name: str, value: str) -> None:
        """One TXT record holding ``value``, split into 255-byte strings as a zone file would."""
        raw = value.encode()
        self.add_txt(name, *[raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])

    def add_mx(self, name: str, pref: int, host: str) -> None:
        self._add(name, "MX", MX(host, pref))

    def add_a(self, name: str, ip: str) -> None:
        self._add(name, "A", A(ip))

    def add_aaaa(self, name: str, ip: str) -> None:
        self._add(name, "AAAA", AAAA(ip))

    def add_cname(self, name: str, target: str) -> None:
        self._add(name, "CNAME", CNAME(target))

    def add_ptr(self, name: str, target: str) -> None:
        self._add(name, "PTR", PTR(target))

    def add_name(self, name: str) -> None:
        """Make ``name`` exist with no records of its own (every query for it is NODATA)."""
        with self._zone.lock:
            self._zone.rrs.setdefault(_key(name), [])

    def publish(self, records: Iterable[_RecordLike]) -> None:
        """Add records shaped like ``relay.domains.Record`` (``type``, ``name``, ``value``)."""
        for rec in records:
            if rec.type != "TXT":
                raise ValueError(f"publish() handles TXT records only, not {rec.type}")
            self.add_txt_value(rec.name, rec.value)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove every record of ``rtype`` at ``name`` (the name keeps existing: NODATA), or with
        ``rtype=None`` the whole name (NXDOMAIN from then on)."""
        if rtype is not None and rtype not in _SUPPORTED:
            raise ValueError(f"unsupported type {rtype}")
        with self._zone.lock:
            if rtype is None:
                self._zone.rrs.pop(_key(name), None)
            elif _key(name) in self._zone.rrs:
                entries = self._zone.rrs[_key(name)]
                entries[:] = [(t, rd) for t, rd in entries if t != rtype]

    def servfail(self, name: str | None, on: bool = True, rtype: str | None = None) -> None:
        """Answer SERVFAIL for ``name`` (``None``: for every name), or only for its queries of
        ``rtype``; ``on=False`` undoes it."""
        with self._zone.lock:
            if rtype is not None:
                if name is None:
                    raise ValueError("servfail by type needs a name")
                if on:
                    self._zone.servfail_types.add((_key(name), rtype))
                else:
                    self._zone.servfail_types.discard((_key(name), rtype))
            elif name is None:
                self._zone.servfail_all = on
            elif on:
                self._zone.servfail_names.add(_key(name))
            else:
                self._zone.servfail_names.discard(_key(name))

    def blackhole(self, on: bool) -> None:
        """Drop every query without answering (clients see a timeout)."""
        self._zone.drop = on

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query answered or refused so far, oldest first."""
        with self._zone.lock:
            return list(self._zone.queries)

    @property
    def edns(self) -> list[tuple[int, int, int] | None]:
        """For each query of :attr:`queries`, in the same order: its EDNS (UDP payload size,
        version, flags), or None for a query without EDNS."""
        with self._zone.lock:
            return list(self._zone.edns)


class _RecordLike(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> str: ...


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    server = TestDNSServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_cfg(cfg: Config, dns_server: TestDNSServer) -> Config:
    dns = dataclasses.replace(
        cfg.dns,
        nameservers=("127.0.0.1",),
        port=dns_server.port,
        timeout=Duration(0.5),
        outbound_ips=("192.0.2.10",),
    )
    return dataclasses.replace(cfg, dns=dns)

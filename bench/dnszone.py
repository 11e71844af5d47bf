"""A tiny authoritative DNS server on loopback serving the TXT records relaybox asks its owner to
publish, so `relaybox domain verify` passes inside the bench (no traffic leaves the box).

dnslib's own ZoneResolver answers NXDOMAIN for a name that exists with other types; this answers
NODATA there, as real servers do. UDP and TCP on one port (a long DKIM TXT may be retried over TCP).
"""

from __future__ import annotations

import threading
from typing import Any

from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer


class _Zone:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.txt: dict[str, list[list[bytes]]] = {}

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = str(request.q.qname)
        key = qname.lower().rstrip(".")
        reply = request.reply()
        with self.lock:
            records = self.txt.get(key)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.TXT:
            for strings in records:
                reply.add_answer(RR(qname, QTYPE.TXT, rdata=TXT(strings), ttl=60))
        return reply


class Zone:
    """Start with :meth:`start`; publish relaybox's records with :meth:`publish`."""

    def __init__(self) -> None:
        self._zone = _Zone()
        logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self._udp = DNSServer(self._zone, address="127.0.0.1", port=0, logger=logger)
        self.port: int = self._udp.server.server_address[1]
        self._tcp = DNSServer(
            self._zone, address="127.0.0.1", port=self.port, tcp=True, logger=logger
        )
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for srv in (self._udp, self._tcp):
            t = threading.Thread(
                target=srv.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            srv.server.shutdown()
            srv.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def publish(self, records: list[dict[str, Any]]) -> None:
        """Records as `relaybox domain show --json` prints them: {"type", "name", "value"}.

        Replaces what was published at those names before: each relaybox instance of the bench
        has its own DKIM key and ownership token for the same domain, and verifies right after
        publishing (the server rechecks only hourly).
        """
        with self._zone.lock:
            for rec in records:
                self._zone.txt.pop(rec["name"].lower().rstrip("."), None)
            for rec in records:
                if rec["type"] != "TXT":
                    raise ValueError(f"only TXT records are served, not {rec['type']}")
                raw = str(rec["value"]).encode()
                strings = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
                self._zone.txt.setdefault(rec["name"].lower().rstrip("."), []).append(strings)

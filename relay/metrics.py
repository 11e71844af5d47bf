"""Prometheus metrics: one ``Metrics`` per server, its own registry, an optional /metrics endpoint.

With ``workers = N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers
(prometheus-client's multiprocess mode): every worker's values live in files there, and the
endpoint (worker 0's) reads them all, so counters are the service's; the gauges of each worker's
own state (open connections, its spool's depth) are summed, the others taken once.

Each ``Metrics`` owns a dedicated ``CollectorRegistry`` (not prometheus-client's global one), so two
servers in one process (tests) never share or clash on counters.

The API the server and delivery call (all cheap, synchronous, safe on the event loop):

    m = Metrics()
    m.connection_opened(listener)   m.connection_closed(listener)    # listener: "starttls" | "tls"
    m.auth_ok()   m.auth_failed()   m.auth_throttled()
    m.accepted(recipients, size)                                      # after the 250 for DATA
    m.rejected(reason)              # a refused command/message; reason: a short fixed token
    m.delivered(latency)            # one recipient delivered, seconds since it was queued
    m.deferred()   m.bounced()      # one recipient attempt ended 4xx / one recipient bounced
    m.sandbox_accepted()            # a sandbox domain's message queued (besides accepted())
    m.captured(recipients)          # recipients delivered into the sandbox inbox
    m.limited(limit)                # a refusal at a user's sending limit (messages_per_hour...)
    m.suppression_added(source)     # a recipient put on a suppression list (bounce | admin)
    m.webhook_event(type, outcome)  # a webhook post ended: delivered | retried | failed
    m.set_webhook_backlog(spool, pending, oldest_age)                 # snapshot of an outbox
    m.set_queue_depth({"queued": 3, "deferred": 1})                   # snapshot from the spool
    m.set_domain_states({"verified": 2, "failing": 1})                # snapshot from domains
    m.render() -> bytes             # the text exposition (what /metrics serves)
    server, port = await m.start_http("127.0.0.1:9465")   ...   await m.stop_http()
    m.http_port -> int | None

Exposed names (all prefixed ``relaybox_``): ``connections_total{listener}``,
``connections_current{listener}``, ``auth_total{result=ok|failed|throttled}``,
``messages_accepted_total``, ``recipients_accepted_total``, ``accepted_bytes_total``,
``messages_rejected_total{reason}``, ``recipients_total{outcome=delivered|deferred|bounced}``,
``queue_depth{state}``, ``delivery_latency_seconds`` (histogram), ``domains{state}``,
``sandbox_messages_total``, ``sandbox_captured_total``, ``limited_total{limit}``,
``suppressions_added_total{source=bounce|admin}``,
``webhook_events_total{type,outcome=delivered|retried|failed}``,
``webhook_outbox_backlog{spool}``, ``webhook_oldest_pending_seconds{spool}``,
``build_info{version}``, and the standard
``process_*`` metrics.

Label values are bounded: a rejection reason is folded to ``[a-z0-9_]`` and, past
``MAX_REASONS`` distinct values, counted as ``other`` (a label per client-chosen string would let
clients grow the scrape without bound).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from relay import __version__

log = logging.getLogger("relaybox.metrics")

LISTENERS = ("starttls", "tls")
AUTH_RESULTS = ("ok", "failed", "throttled")
OUTCOMES = ("delivered", "deferred", "bounced")
QUEUE_STATES = ("queued", "deferred")
DOMAIN_STATES = ("pending", "verified", "failing", "suspended")
MAX_REASONS = 50

# From "delivered at once to a local smarthost" to "delivered after a day of retries".
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by the supervisor for its workers
_REQUEST_TIMEOUT = 10.0
_MAX_REQUEST = 8192
_REASON_RE = re.compile(r"[^a-z0-9_]+")


class Metrics:
    """The counters and gauges of one relay process (see the module docstring for the API)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # workers = N: the supervisor names a directory in PROMETHEUS_MULTIPROC_DIR before the
        # workers start, prometheus-client's values live in files there, and the endpoint (worker
        # 0's) reads every worker's. Gauges say how their workers' values combine.
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._connections = Counter(
            "relaybox_connections", "SMTP connections accepted.", ["listener"], registry=r
        )
        self._current = Gauge(
            "relaybox_connections_current",
            "SMTP connections open now.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._auth = Counter("relaybox_auth", "AUTH attempts by result.", ["result"], registry=r)
        self._accepted = Counter(
            "relaybox_messages_accepted", "Messages queued (250 after DATA).", registry=r
        )
        self._accepted_rcpts = Counter(
            "relaybox_recipients_accepted", "Recipients of the messages queued.", registry=r
        )
        self._accepted_bytes = Counter(
            "relaybox_accepted_bytes", "Size of the messages queued.", registry=r
        )
        self._rejected = Counter(
            "relaybox_messages_rejected",
            "Commands or messages refused, by reason.",
            ["reason"],
            registry=r,
        )
        self._recipients = Counter(
            "relaybox_recipients",
            "Recipient delivery outcomes (deferred counts each attempt that ended 4xx).",
            ["outcome"],
            registry=r,
        )
        self._queue = Gauge(
            "relaybox_queue_depth",
            "Recipients in the spool, by state.",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",  # each worker its own spool
        )
        self._latency = Histogram(
            "relaybox_delivery_latency_seconds",
            "Time from queued to delivered, per recipient (retries included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._domains = Gauge(
            "relaybox_domains",
            "Sending domains, by state.",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",  # the same count in every worker that set it
        )
        self._sandbox = Counter(
            "relaybox_sandbox_messages", "Messages queued from sandbox domains.", registry=r
        )
        self._captured = Counter(
            "relaybox_sandbox_captured",
            "Recipients delivered into the sandbox inbox instead of out.",
            registry=r,
        )
        self._limited = Counter(
            "relaybox_limited",
            "Refusals at a user's sending limit (MAIL, RCPT or DATA), by limit.",
            ["limit"],
            registry=r,
        )
        for name in ("messages_per_hour", "messages_per_day", "recipients_per_day"):
            self._limited.labels(name)
        self._suppressed = Counter(
            "relaybox_suppressions_added",
            "Recipients put on a sender domain's suppression list, by source.",
            ["source"],
            registry=r,
        )
        for source in ("bounce", "admin"):
            self._suppressed.labels(source)
        self._webhooks = Counter(
            "relaybox_webhook_events",
            "Webhook posts by event type and outcome (retried: failed, tried again later).",
            ["type", "outcome"],
            registry=r,
        )
        self._outbox = Gauge(
            "relaybox_webhook_outbox_backlog",
            "Webhook events pending in a spool's outbox.",
            ["spool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._outbox_age = Gauge(
            "relaybox_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook event in a spool's outbox.",
            ["spool"],
            registry=r,
            multiprocess_mode="livemax",
        )
        info = Gauge(
            "relaybox_build_info",
            "Always 1; the version as a label.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        info.labels(__version__).set(1)
        ProcessCollector(registry=r)
        self._exposition = r
        if self.multiprocess:  # every worker's files, and this process's process_* metrics
            self._exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposition)  # type: ignore[no-untyped-call]
            ProcessCollector(registry=self._exposition)

        # Known label values start at 0 so a rate() or an alert sees them before the first event.
        for name in LISTENERS:
            self._connections.labels(name)
            self._current.labels(name)
        for result in AUTH_RESULTS:
            self._auth.labels(result)
        for outcome in OUTCOMES:
            self._recipients.labels(outcome)
        self._queue_states: set[str] = set(QUEUE_STATES)
        self._domain_states: set[str] = set(DOMAIN_STATES)
        for state in QUEUE_STATES:
            self._queue.labels(state).set(0)
        for state in DOMAIN_STATES:
            self._domains.labels(state).set(0)
        self._reasons: set[str] = set()
        self._http: asyncio.Server | None = None

    # --- events -------------------------------------------------------------------------------

    def connection_opened(self, listener: str) -> None:
        self._connections.labels(listener).inc()
        self._current.labels(listener).inc()

    def connection_closed(self, listener: str) -> None:
        self._current.labels(listener).dec()

    def auth_ok(self) -> None:
        self._auth.labels("ok").inc()

    def auth_failed(self) -> None:
        self._auth.labels("failed").inc()

    def auth_throttled(self) -> None:
        self._auth.labels("throttled").inc()

    def accepted(self, recipients: int = 1, size: int = 0) -> None:
        """One message queued for ``recipients`` recipients, ``size`` bytes."""
        self._accepted.inc()
        self._accepted_rcpts.inc(max(0, recipients))
        if size > 0:
            self._accepted_bytes.inc(size)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._reason_label(reason)).inc()

    def delivered(self, latency: float) -> None:
        self._recipients.labels("delivered").inc()
        self._latency.observe(max(0.0, latency))

    def deferred(self) -> None:
        self._recipients.labels("deferred").inc()

    def bounced(self) -> None:
        self._recipients.labels("bounced").inc()

    def sandbox_accepted(self) -> None:
        self._sandbox.inc()

    def limited(self, limit: str) -> None:
        """A refusal at a user's sending limit; ``limit``: one of userrules.LIMIT_NAMES."""
        self._limited.labels(limit).inc()

    def suppression_added(self, source: str) -> None:
        """A recipient suppressed; ``source``: "bounce" or "admin"."""
        self._suppressed.labels(source).inc()

    def webhook_event(self, event_type: str, outcome: str, n: int = 1) -> None:
        """A post ended (``n``: that many); ``event_type`` one of relay.webhook.EVENT_TYPES."""
        self._webhooks.labels(event_type, outcome).inc(n)

    def set_webhook_backlog(self, spool: str, pending: int, oldest_age: float) -> None:
        self._outbox.labels(spool).set(pending)
        self._outbox_age.labels(spool).set(oldest_age)

    def captured(self, recipients: int) -> None:
        self._captured.inc(max(0, recipients))

    def set_queue_depth(self, counts: Mapping[str, int]) -> None:
        """Replace the queue snapshot; a state absent from ``counts`` reads 0."""
        _set_all(self._queue, self._queue_states, counts)

    def set_domain_states(self, counts: Mapping[str, int]) -> None:
        """Replace the domain snapshot; a state absent from ``counts`` reads 0."""
        _set_all(self._domains, self._domain_states, counts)

    def _reason_label(self, reason: str) -> str:
        label = _REASON_RE.sub("_", reason.lower()).strip("_")[:40] or "unknown"
        if label not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(label)
        return label

    # --- exposition ---------------------------------------------------------------------------

    def render(self, accept: str = "") -> bytes:
        """The exposition text (Prometheus text format, or OpenMetrics when ``accept`` asks)."""
        encoder, _content_type = choose_encoder(accept)
        body: bytes = encoder(self._exposition)
        return body

    async def start_http(self, listen: str) -> tuple[asyncio.Server, int]:
        """Serve GET /metrics on ``HOST:PORT`` (port 0: any free port) on the running loop.

        Returns the server and the port actually bound, which is also logged.
        """
        host, port = parse_listen(listen)
        server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST)
        bound = server.sockets[0].getsockname()[1]
        self._http = server
        shown = f"[{host}]" if host and ":" in host else (host or "*")
        log.info("metrics listening on http://%s:%d/metrics", shown, bound)
        return server, bound

    @property
    def http_port(self) -> int | None:
        """The port /metrics is served on, or None when the endpoint is not running."""
        if self._http is None or not self._http.sockets:
            return None
        port: int = self._http.sockets[0].getsockname()[1]
        return port

    async def stop_http(self) -> None:
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 responder: one request, one response, then close."""
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request_line = (await reader.readline()).decode("latin-1").strip()
                headers: dict[str, str] = {}
                for _ in range(100):
                    line = (await reader.readline()).decode("latin-1")
                    if line in ("\r\n", "\n", ""):
                        break
                    name, _sep, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                status, ctype, body, head = self._respond(request_line, headers)
                writer.write(
                    f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                )
                if not head:
                    writer.write(body)
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a slow, broken or oversized request gets no answer; nothing to log per scrape
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    def _respond(
        self, request_line: str, headers: Mapping[str, str]
    ) -> tuple[str, str, bytes, bool]:
        parts = request_line.split()
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n", False
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"method not allowed\n", False
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return "404 Not Found", text, b"not found; try /metrics\n", method == "HEAD"
        encoder, ctype = choose_encoder(headers.get("accept", ""))
        return "200 OK", ctype, encoder(self._exposition), method == "HEAD"


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``"127.0.0.1:9465"`` / ``"[::1]:0"`` / ``":9465"`` -> (host or None for all, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics.listen: expected HOST:PORT, got {listen!r}")
    host = host.strip("[]")
    return (host or None), int(port)


def _set_all(gauge: Gauge, seen: set[str], counts: Mapping[str, int]) -> None:
    seen.update(counts)
    for state in seen:
        gauge.labels(state).set(counts.get(state, 0))

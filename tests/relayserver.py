"""The real relay server in the test's event loop, on ephemeral ports, with a trusted test CA.

Loaded as a pytest plugin. Fixtures:

``tls_ca``      a trustme CA; ``tls_files`` a certificate for relay.test / 127.0.0.1 / localhost.
``relay_cfg``   the ``cfg`` fixture with those TLS files, delivery paused (submission tests do not
                deliver), and no failure delay.
``relay``       a started :class:`RelayHandle`: ``.starttls_port``, ``.tls_port``, ``.server``,
                ``.client_context()`` (verifies the certificate), ``await .add_user(login)``
                (creates a verified domain if needed and a user with a generated password;
                returns it, registered as a secret for the leak check).

Tests that need another config build it with ``dataclasses.replace`` and use ``start_relay``.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.clock import Clock, ManualClock
from relay.config import Config
from relay.dnscheck import CheckResult
from relay.service.server import Server
from relay.store import domains, users
from relay.store.passwords import Hasher, generate_password
from tests import leaks


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tls_ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path, Path]:
    cert = tls_ca.issue_cert("relay.test", "127.0.0.1", "localhost")
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    ca_path = tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    tls_ca.cert_pem.write_to_path(str(ca_path))
    # private_key_and_cert_chain_pem has both; load_cert_chain takes the key from key_path.
    return cert_path, key_path, ca_path


@pytest.fixture
def relay_cfg(cfg: Config, tls_files: tuple[Path, Path, Path]) -> Config:
    cert, key, _ca = tls_files
    return dataclasses.replace(
        cfg,
        tls=dataclasses.replace(cfg.tls, cert=str(cert), key=str(key)),
        delivery=dataclasses.replace(cfg.delivery, paused=True),
    )


class RelayHandle:
    def __init__(self, server: Server, ca_path: Path, clock: Clock) -> None:
        self.server = server
        self.ca_path = ca_path
        self.clock = clock
        self._hasher: Hasher | None = None

    def port(self, mode: str) -> int:
        return next(b.port for b in self.server.bound if b.listener.mode == mode)

    @property
    def starttls_port(self) -> int:
        return self.port("starttls")

    @property
    def tls_port(self) -> int:
        return self.port("tls")

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        return ctx

    async def add_domain(self, name: str, *, verified: bool = True) -> None:
        db = self.server.db
        assert db is not None
        cfg = self.server.cfg
        if await domains.get(db, name) is None:
            await domains.add(db, name, cfg=cfg, now=self.clock(), actor="test")
        if verified:
            passing = [CheckResult(c, "pass", "", "", "") for c in cfg.dns.required]
            await domains.record_results(db, name, passing, cfg=cfg, now=self.clock())
        self.server.acceptor.forget()

    async def add_user(self, login: str, *, verified: bool = True) -> str:
        db = self.server.db
        assert db is not None
        domain = login.rpartition("@")[2]
        if await domains.get(db, domain) is None:
            await self.add_domain(domain, verified=True)
        password = leaks.add(generate_password())
        leaks.add_auth_payload(login, password)
        await users.create(
            db,
            login,
            password,
            hasher=self.hasher,
            cfg=self.server.cfg,
            now=self.clock(),
            actor="test",
        )
        return password

    @property
    def hasher(self) -> Hasher:
        if self._hasher is None:
            self._hasher = Hasher(self.server.cfg.auth)
        return self._hasher

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()


async def start_relay(
    cfg: Config, ca_path: Path, clock: Clock | None = None, **kwargs: Any
) -> RelayHandle:
    clk = clock or ManualClock()
    server = Server(cfg, clock=clk, **kwargs)
    await server.startup()
    return RelayHandle(server, ca_path, clk)


@pytest.fixture
async def relay(
    relay_cfg: Config, tls_files: tuple[Path, Path, Path], clock: ManualClock
) -> AsyncIterator[RelayHandle]:
    handle = await start_relay(relay_cfg, tls_files[2], clock)
    yield handle
    await handle.server.shutdown()
    handle.close()

"""Shared fixtures: real things on ephemeral ports, a temporary state dir, a controllable clock.

Fixture modules of each area live beside this file and are loaded through ``pytest_plugins``.
Every test is also checked for leaked secrets: whatever a test registers with ``secrets.add`` must
never appear in any log record captured during that test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import config as config_mod
from relay.clock import ManualClock
from relay.config import Config
from tests import leaks, procs

pytest_plugins: list[str] = [
    "tests.dnsserver",
    "tests.userhelpers",
    "tests.sink",
    "tests.relayserver",
    "tests.pgserver",
]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    return d


@pytest.fixture
def cfg(state_dir: Path) -> Config:
    """A config for tests: state in tmp, cheap argon2 (tests are not about hashing cost)."""
    return config_mod.from_dict(
        {
            "state_dir": str(state_dir),
            "public_hostname": "relay.test",
            "listen": [
                {"address": "127.0.0.1", "port": 0, "mode": "starttls"},
                {"address": "127.0.0.1", "port": 0, "mode": "tls"},
            ],
            "auth": {
                "argon2": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1},
                "failure_delay": "0s",
            },
        },
        source="(test)",
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Every process group a test started (tests/procs.py) is killed when the test ends."""
    yield
    procs.kill_all()


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The one assertion over every test's logs (and the replies and output it observed, see
    tests/leaks.py): no registered secret appears anywhere."""
    caplog.set_level(logging.DEBUG)
    leaks.reset()
    yield
    leaked = leaks.check(caplog.records)
    assert not leaked, f"secret(s) leaked into logs or output: {len(leaked)} item(s)"

"""relay/service/sdnotify.py against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.service import sdnotify


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)
        return True


@pytest.fixture
def fake_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    # Short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield FakeSystemd(sock, path)
        sock.close()


def test_ready_sends_one_datagram(fake_systemd: FakeSystemd) -> None:
    assert sdnotify.ready("serving on 587, 465") is True
    assert fake_systemd.recv() == {"READY": "1", "STATUS": "serving on 587, 465"}
    assert not fake_systemd.pending()


def test_reloading_carries_monotonic_usec(fake_systemd: FakeSystemd) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = fake_systemd.recv()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_stopping_status_and_extend(fake_systemd: FakeSystemd) -> None:
    assert sdnotify.stopping()
    assert fake_systemd.recv() == {"STOPPING": "1"}
    assert sdnotify.status("draining 3 sessions")
    assert fake_systemd.recv() == {"STATUS": "draining 3 sessions"}
    assert sdnotify.extend_timeout(1.5)
    assert fake_systemd.recv() == {"EXTEND_TIMEOUT_USEC": "1500000"}


def test_status_text_cannot_inject_a_second_assignment(fake_systemd: FakeSystemd) -> None:
    assert sdnotify.status("evil\nREADY=1")
    assert fake_systemd.recv() == {"STATUS": "evil READY=1"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "relaybox-test-" + secrets.token_hex(8)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.status("x") is False

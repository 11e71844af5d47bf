"""``relaybox serve`` never runs code from the directory it is started in (issue 11).

``python -m admin.cli`` puts the working directory first on sys.path: a supervisor starting its
workers that way from a directory holding an ``admin/cli.py`` (run as root: ``cd /tmp; relaybox
serve``) would run that file, as root. The supervisor starts them with ``python -I``; this test
starts the installed console script with ``workers = 2`` from a directory where ``admin`` and
``relay`` packages are planted, each of whose modules would leave a marker file if imported.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
from pathlib import Path

import pytest

from tests import procs
from tests.dialogue import Dialogue
from tests.faults.procserver import relaybox_argv
from tests.sink import Sink
from tests.test_workers import workers_running

PLANTED = ("admin/__init__.py", "admin/cli.py", "relay/__init__.py", "relay/config.py")


def plant(directory: Path, markers: Path) -> None:
    """Each planted module writes ``markers/<its path>`` when imported (or run)."""
    for rel in PLANTED:
        module = directory / rel
        module.parent.mkdir(exist_ok=True)
        marker = markers / rel.replace("/", ".")
        module.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")


async def test_serve_with_workers_never_runs_the_working_directorys_modules(
    tmp_path: Path,
    tls_files: tuple[Path, Path, Path],
    sink: Sink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cwd, markers = tmp_path / "cwd", tmp_path / "markers"
    cwd.mkdir()
    markers.mkdir()
    plant(cwd, markers)

    def ran() -> list[str]:
        return sorted(p.name for p in markers.iterdir())

    # The planted modules do run when the working directory is on sys.path (``-c`` puts it
    # there): the markers below can only be missing because nothing imported them.
    probe = await procs.spawn(sys.executable, "-c", "import admin.cli, relay.config", cwd=cwd)
    assert await probe.wait() == 0
    assert ran() == sorted(rel.replace("/", ".") for rel in PLANTED)
    for marker in markers.iterdir():
        marker.unlink()

    # The installed console script, as an administrator runs it: its own directory, not the
    # working directory, is first on the supervisor's sys.path (``python -c`` would put the
    # working directory there itself, and the test would prove nothing about the workers).
    console = Path(sys.executable).parent / "relaybox"
    monkeypatch.setenv("PATH", f"{console.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert relaybox_argv() == [str(console)]
    monkeypatch.chdir(cwd)  # the subprocesses start here

    try:
        # Both workers ready, each listening on the shared port (checked on the way in).
        async with workers_running(tmp_path, tls_files, sink, paused=True) as run:
            ctx = ssl.create_default_context(cafile=str(tls_files[2]))
            d = await Dialogue.open(run.port, tls=ctx)  # the 220 greeting
            await d.expect_after("EHLO client.test", "250")
            await d.close()
            run.server.signal(signal.SIGTERM)
            assert await run.server.wait() == 0
    except AssertionError as exc:
        exc.add_note(f"planted modules that ran: {ran()}")
        raise
    assert ran() == [], f"planted modules ran: {ran()}"

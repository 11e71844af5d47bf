"""The admin CLI run as root on the service's state dir leaves nothing the service cannot use.

The service runs as an unprivileged user (``relaybox``; here ``nobody`` stands in for it). An
operator may run ``relaybox user add ...`` as root: the CLI must become the state dir's owner before
touching any file, so the database, its WAL and SHM files are never left root-owned (the service
could not open them after that). The CLI runs as a subprocess so its privilege drop is its own.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import config as config_mod
from tests import leaks
from tests.userhelpers import make_domain_sync

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from admin.cli import main; main()"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: checks what the CLI does when run as root"
)


@pytest.fixture
def service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to stand in for the service user")


@pytest.fixture
def box(service_user: pwd.struct_passwd) -> Iterator[Path]:
    """A config file and a state dir owned by the service user, mode 0700 (as StateDirectory=).

    Under /tmp rather than pytest's tmp_path: its parents are root-only, and the service user
    must be able to reach its own state dir.
    """
    base = Path(tempfile.mkdtemp(prefix="relaybox-priv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, service_user.pw_uid, service_user.pw_gid)
        (base / "relaybox.toml").write_text(
            f'state_dir = "{state}"\npublic_hostname = "smtp.relay.test"\n'
        )
        yield base
    finally:
        shutil.rmtree(base)


def service_user_can_run_python(user: pwd.struct_passwd) -> bool:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import admin.cli, idna.uts46data"],
            cwd=ROOT, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
    except OSError:
        return False
    return proc.returncode == 0


# In a private mount namespace, put a world-traversable tmpfs over the one root-only directory
# above the interpreter ($1, e.g. /root) and bind its needed child ($2, e.g. .pyenv) back.
UNHIDE = """
set -e
mount --make-rprivate /
mount --bind "$1/$2" "$3"
mount -t tmpfs -o mode=0755 tmpfs "$1"
mkdir "$1/$2"
mount --bind "$3" "$1/$2"
shift 3
exec "$@"
"""


@pytest.fixture
def cli_prefix(service_user: pwd.struct_passwd, tmp_path: Path) -> list[str]:
    """How to run the CLI so that, once it is the service user, it can still import its code.

    On a production box the venv (/opt/relaybox) is world-readable. Here the interpreter may live
    under a root-only directory (pyenv in /root): then the CLI runs in a mount namespace where
    that directory is traversable, and nothing else changes.
    """
    if service_user_can_run_python(service_user):
        return CLI
    # The venv (sys.prefix) and the interpreter it was made from (sys.base_prefix, e.g. pyenv's).
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    blocked = {p for r in roots for p in r.parents if not p.stat().st_mode & stat.S_IXOTH}
    if len(blocked) != 1 or shutil.which("unshare") is None:
        pytest.skip(f"{service_user.pw_name} cannot read the Python installation {sys.prefix}")
    top = blocked.pop()
    children = {r.relative_to(top).parts[0] for r in roots if r.is_relative_to(top)}
    if len(children) != 1:
        pytest.skip(f"{service_user.pw_name} cannot read the Python installation {sys.prefix}")
    child = children.pop()
    keep = tempfile.mkdtemp(prefix="relaybox-keep-", dir="/tmp")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", UNHIDE, "sh", str(top), child, keep,
                            "true"], capture_output=True, text=True, check=False)  # fmt: skip
    os.rmdir(keep)
    if probe.returncode != 0:
        pytest.skip(f"interpreter under {top} and no mount namespace: {probe.stderr.strip()}")
    keep_dir = str(tmp_path / "keep")
    os.mkdir(keep_dir)
    return ["unshare", "-m", "sh", "-c", UNHIDE, "sh", str(top), child, keep_dir, *CLI]


def relaybox(prefix: list[str], box: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "--config", str(box / "relaybox.toml"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def files_under(path: Path) -> list[Path]:
    return [path, *sorted(path.rglob("*"))]


def test_cli_as_root_leaves_only_service_owned_files(
    box: Path, service_user: pwd.struct_passwd, cli_prefix: list[str]
) -> None:
    state = box / "state"
    # A first command on an empty state dir creates the database: as the service user.
    result = relaybox(cli_prefix, box, "user", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert (state / "relaybox.db").exists()

    cfg = config_mod.load(box / "relaybox.toml")
    make_domain_sync(cfg, now=time.time())

    # Keep a connection open meanwhile, so the WAL and SHM files outlive the CLI's connection
    # and their owner can be checked too.
    holder = sqlite3.connect(state / "relaybox.db")
    try:
        holder.execute("SELECT count(*) FROM users").fetchone()
        result = relaybox(cli_prefix, box, "user", "add", "app@example.com", "--json")
        assert result.returncode == 0, result.stderr
        leaks.add(json.loads(result.stdout)["password"])
        result = relaybox(cli_prefix, box, "user", "reset-password", "app@example.com", "--json")
        assert result.returncode == 0, result.stderr
        leaks.add(json.loads(result.stdout)["password"])
        result = relaybox(cli_prefix, box, "audit", "--json")
        assert result.returncode == 0, result.stderr
        assert [e["action"] for e in json.loads(result.stdout)][:2] == [
            "user.reset-password",
            "user.add",
        ]

        names = {p.name for p in files_under(state)}
        assert {"relaybox.db", "relaybox.db-wal", "relaybox.db-shm"} <= names
        for path in files_under(state):
            st = path.stat()
            who = (st.st_uid, st.st_gid)
            assert who == (service_user.pw_uid, service_user.pw_gid), f"{path} owned by {who}"
            if path != state:
                # The CLI created them under the service's umask (0077), not root's.
                assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{path} is {st.st_mode:o}"
    finally:
        holder.close()


# Imports as root, then becomes the service user, then asks the CLI helper to open a state dir.
AS_OTHER_USER = """
import os, sys
from pathlib import Path
import click
from admin import common
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[1]))
try:
    common.drop_privileges_for(Path(sys.argv[3]))
except click.ClickException as exc:
    print("refused:", exc.message)
else:
    print("allowed")
"""


def test_another_unprivileged_user_is_told_how(
    box: Path, service_user: pwd.struct_passwd, tmp_path: Path
) -> None:
    root_only = box / "root-only"
    root_only.mkdir(mode=0o700)
    proc = subprocess.run(
        [sys.executable, "-c", AS_OTHER_USER, str(service_user.pw_uid),
         str(service_user.pw_gid), str(root_only)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"refused: {root_only} belongs to root: run as that user "
        "(runuser -u root -- relaybox ...) or as root"
    )
    # Its own state dir is fine.
    proc = subprocess.run(
        [sys.executable, "-c", AS_OTHER_USER, str(service_user.pw_uid),
         str(service_user.pw_gid), str(box / "state")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.stdout.strip() == "allowed", proc.stderr

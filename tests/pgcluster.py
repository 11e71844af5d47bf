"""A real PostgreSQL server for the tests and the bench: Debian's binaries (scripts/test installs
them), its own data dir, on 127.0.0.1 and a free port, password authentication (scram-sha-256) so
the store's ``password_file`` is what lets relaybox in. Each user gets a database of its own,
created empty. Not durable (no fsync) unless asked: the bench asks.

As root (CI), the server runs as the ``postgres`` user Debian's package made: PostgreSQL refuses
to run as root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from relay.config import Config
from relay.config_sections import StoreConfig

PASSWORD = "pg-test-password-7d1c"  # the test cluster's superuser password
USER = "relaybox"


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: run `bash scripts/test` (it apt-installs it)"
        )
    return Path(found[-1]).parent


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    port: int
    datadir: Path
    password_file: Path
    bindir: Path
    run_as: list[str]
    durable: bool = False  # fsync and synchronous commits (the bench); off for the tests' speed
    _names: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def url(self, dbname: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=PASSWORD,
            dbname="postgres",
            autocommit=True,
        )

    def new_database(self) -> str:
        """An empty database of its own (dropped with the cluster at the session's end)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def store_config(self, dbname: str) -> StoreConfig:
        return StoreConfig(
            url=self.url(dbname), password_file=str(self.password_file), sslmode="disable"
        )

    def config(self, cfg: Config, dbname: str | None = None) -> Config:
        """``cfg`` with its shared store on a new (or the named) database of this server."""
        return dataclasses.replace(cfg, store=self.store_config(dbname or self.new_database()))

    def ctl(self, *args: str) -> None:
        """pg_ctl (stop, start...) on this cluster, as its owner."""
        subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        self.ctl("stop", "-m", "fast")

    def start(self) -> None:
        self.ctl("start", "-l", str(self.datadir / "server.log"), "-o", self._options())

    def _options(self) -> str:
        fast = "" if self.durable else " -c fsync=off -c synchronous_commit=off"
        return (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories="
            f"{self.datadir} -c max_connections=300{fast}"
        )


def start_server(root: Path, *, durable: bool = False) -> PgServer:
    binaries = bindir()
    root.mkdir(parents=True, exist_ok=True)
    datadir = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    run_as: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        shutil.chown(root.parent, owner.pw_uid, owner.pw_gid)
        shutil.chown(root, owner.pw_uid, owner.pw_gid)
        shutil.chown(pwfile, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *run_as,
            str(binaries / "initdb"),
            "-D",
            str(datadir),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "--locale=C.UTF-8",
            "--encoding=UTF8",
            "-N",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = PgServer(free_port(), datadir, pwfile, binaries, run_as, durable)
    server.start()
    return server


@contextlib.contextmanager
def own_cluster(*, durable: bool = False) -> Iterator[PgServer]:
    """A cluster of its own (a fault test stops and starts it), removed at the end."""
    # Not under pytest's tmp dir: its parents are 0700, which the postgres user cannot cross.
    root = Path(tempfile.mkdtemp(prefix="relaybox-pg-"))
    try:
        server = start_server(root / "cluster", durable=durable)
        try:
            yield server
        finally:
            try:
                server.ctl("stop", "-m", "immediate")
            except subprocess.SubprocessError:
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)

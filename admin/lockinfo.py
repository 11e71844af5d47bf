"""Which lock this installation came from, and whether what is installed still matches it.

`scripts/install` and `scripts/test` copy the lock they installed into the environment
(`<prefix>/share/relaybox/<lock name>`). This module reads it back and compares each pin with the
installed distribution (importlib.metadata: no network, a few milliseconds). Stdlib only: it also
runs as `python -m admin.lockinfo LOCK` from the scripts, to print the drift of an environment.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# A pinned requirement line of a pip-compile lock: `name==version \` (hashes follow on their own
# lines); extras are stripped by --strip-extras, markers may follow after ';'.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
RECORD_DIR = Path("share") / "relaybox"
LOCK_NAMES = ("requirements-test.txt", "requirements.txt")


def canonical(name: str) -> str:
    """A distribution name in its normal form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """{canonical name: pinned version} of every pinned line of a lock."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        m = _PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


@dataclass(frozen=True)
class Drift:
    name: str
    locked: str | None  # None: installed, but not in the lock
    installed: str | None  # None: in the lock, but not installed


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave a distribution without metadata
            found.setdefault(canonical(name), dist.version)
    return found


def drift(pins: dict[str, str], installed: dict[str, str], *, extra: bool = False) -> list[Drift]:
    """Pins whose installed version differs (or is missing); with ``extra``, also what is
    installed and not pinned (pip itself and relaybox are never counted)."""
    out = [
        Drift(name, version, installed.get(name))
        for name, version in sorted(pins.items())
        if installed.get(name) != version
    ]
    if extra:
        ignore = {"pip", "relaybox", *pins}
        out += [Drift(n, None, v) for n, v in sorted(installed.items()) if n not in ignore]
    return out


@dataclass(frozen=True)
class LockRecord:
    name: str
    sha256: str
    pins: int
    drift: list[Drift]


def recorded(prefix: Path | None = None) -> LockRecord | None:
    """The lock recorded in this environment at install time, or None if it was installed
    some other way (a plain `pip install`)."""
    base = Path(prefix or sys.prefix) / RECORD_DIR
    for name in LOCK_NAMES:
        path = base / name
        try:
            data = path.read_bytes()
        except OSError:
            continue
        pins = parse_lock(data.decode("utf-8", "replace"))
        return LockRecord(
            name,
            hashlib.sha256(data).hexdigest(),
            len(pins),
            drift(pins, installed_versions()),
        )
    return None


def describe(rec: LockRecord | None) -> str:
    """One line for `relaybox --version` and `relaybox doctor`."""
    if rec is None:
        return "dependencies: not installed from a lock (scripts/install installs one)"
    head = f"dependencies: {rec.name} sha256:{rec.sha256[:12]}, {rec.pins} pins"
    if not rec.drift:
        return f"{head}, all installed as locked"
    shown = ", ".join(f"{d.name} {d.installed or 'missing'} (locked {d.locked})" for d in rec.drift)
    return f"{head}; {len(rec.drift)} differ: {shown}"


def _main(argv: list[str]) -> int:
    """`python -m admin.lockinfo LOCK`: print how this environment differs from LOCK."""
    if len(argv) != 1:
        print("usage: python -m admin.lockinfo LOCKFILE", file=sys.stderr)
        return 2
    pins = parse_lock(Path(argv[0]).read_text(encoding="utf-8"))
    rows = drift(pins, installed_versions(), extra=True)
    if not rows:
        print(f"same as {argv[0]}: {len(pins)} pins")
        return 0
    print(f"differs from {argv[0]} in {len(rows)} of {len(pins)} pins:")
    for d in rows:
        print(f"  {d.name:<28} locked {d.locked or '-':<14} installed {d.installed or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

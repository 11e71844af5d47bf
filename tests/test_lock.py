"""The lock and pyproject.toml agree, and the environment running the tests is the locked one.

pyproject.toml keeps the compatible ranges (the contract); requirements-test.txt (everything) and
requirements.txt (runtime) pin the tested set with hashes (`bash scripts/lock` refreshes them).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from admin import lockinfo

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "relaybox"


@dataclass
class Pin:
    version: str
    hashes: set[str] = field(default_factory=set)
    via: set[str] = field(default_factory=set)


def parse(text: str) -> dict[str, Pin]:
    """A pip-compile lock: each pin with its hashes and the packages it is there for ("via")."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", raw)
        if m:
            current = pins[lockinfo.canonical(m.group(1))] = Pin(m.group(2))
            in_via = False
        elif current is None:
            continue
        elif line.startswith("--hash="):
            current.hashes.add(line.removeprefix("--hash=").rstrip(" \\"))
        elif line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                current.via.add(rest)
        elif in_via and line.startswith("#   "):
            current.via.add(line.removeprefix("#   ").strip())
        else:
            in_via = False
    return pins


def _requirements(project: dict[str, Any]) -> tuple[list[Requirement], list[Requirement]]:
    runtime = [Requirement(r) for r in project["project"]["dependencies"]]
    extra = project["project"].get("optional-dependencies", {})
    runtime += [Requirement(r) for r in project["build-system"]["requires"]]
    tests = [Requirement(r) for r in extra["test"]]
    return runtime, tests


def mutation_problems(project: dict[str, Any], full_text: str, mutation_text: str) -> list[str]:
    """requirements-mutation.txt: the full lock, unchanged, plus the mutation tester."""
    full, mutation = parse(full_text), parse(mutation_text)
    problems = [
        f"requirements-mutation.txt pins {name} differently from requirements-test.txt"
        for name, pin in full.items()
        if (mutation.get(name) or Pin("")).version != pin.version
    ]
    for raw in project["project"]["optional-dependencies"]["mutation"]:
        req = Requirement(raw)
        pin = mutation.get(lockinfo.canonical(req.name))
        if pin is None or not req.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"requirements-mutation.txt does not pin {req} within its range")
    problems += [
        f"requirements-mutation.txt: {n} has no hash" for n, p in mutation.items() if not p.hashes
    ]
    return problems


def lock_problems(project: dict[str, Any], full_text: str, runtime_text: str) -> list[str]:
    """Every way the two locks and pyproject.toml disagree, one sentence each."""
    problems: list[str] = []
    full, runtime = parse(full_text), parse(runtime_text)
    declared_runtime, declared_tests = _requirements(project)
    for lock_name, lock, reqs in (
        ("requirements-test.txt", full, declared_runtime + declared_tests),
        ("requirements.txt", runtime, declared_runtime),
    ):
        declared = {lockinfo.canonical(r.name) for r in reqs}
        for req in reqs:
            pin = lock.get(lockinfo.canonical(req.name))
            if pin is None:
                problems.append(f"{req.name} is in pyproject.toml but not in {lock_name}")
            elif not req.specifier.contains(Version(pin.version), prereleases=True):
                problems.append(
                    f"{lock_name} pins {req.name}=={pin.version}, outside pyproject.toml's "
                    f"{req.specifier}"
                )
        for name, pin in lock.items():
            if not pin.hashes:
                problems.append(f"{lock_name}: {name} has no hash")
            parents = {v for v in pin.via if not v.startswith("-")}
            direct = {v for v in parents if v.startswith(f"{PROJECT} (")}
            if direct and name not in declared:
                problems.append(
                    f"{lock_name}: {name} is there for {PROJECT}, not in pyproject.toml"
                )
            if not direct and not any(lockinfo.canonical(p) in lock for p in parents):
                problems.append(f"{lock_name}: {name} is there for nothing in the lock")
    for name, pin in runtime.items():
        twin = full.get(name)
        if twin is None:
            problems.append(f"{name} is in requirements.txt but not in requirements-test.txt")
        elif (twin.version, twin.hashes) != (pin.version, pin.hashes):
            problems.append(f"{name}: requirements.txt and the full lock pin it differently")
    test_only = {lockinfo.canonical(r.name) for r in declared_tests} - {
        lockinfo.canonical(r.name) for r in declared_runtime
    }
    problems += [
        f"requirements.txt has the test tool {n}" for n in sorted(test_only & set(runtime))
    ]
    return problems


def _load() -> tuple[dict[str, Any], str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    full = (ROOT / "requirements-test.txt").read_text(encoding="utf-8")
    runtime = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    return project, full, runtime


def test_lock_agrees_with_pyproject() -> None:
    assert lock_problems(*_load()) == []
    project, full, _ = _load()
    mutation = (ROOT / "requirements-mutation.txt").read_text(encoding="utf-8")
    assert mutation_problems(project, full, mutation) == []
    bumped = re.sub(r"(?m)^click==\S+", "click==8.1.0", mutation)
    assert mutation_problems(project, full, bumped) == [
        "requirements-mutation.txt pins click differently from requirements-test.txt"
    ]


def test_lock_is_complete_for_pip() -> None:
    """Every pin is exact and hashed: `pip install --require-hashes` refuses anything else."""
    _, full, runtime = _load()
    for text in (full, runtime):
        for line in text.splitlines():
            if line and not line[0].isspace() and not line.startswith("#"):
                assert re.match(r"^[A-Za-z0-9._-]+==\S+ \\$", line), line


def test_check_catches_each_disagreement() -> None:
    project, full, runtime = _load()
    # A dependency in pyproject.toml and not in the lock.
    more = {**project, "project": {**project["project"]}}
    more["project"]["dependencies"] = [*project["project"]["dependencies"], "six>=1"]
    assert any(
        "six is in pyproject.toml but not in" in p for p in lock_problems(more, full, runtime)
    )
    # A pin outside the declared range.
    bumped = re.sub(r"(?m)^click==\S+", "click==9.0.0", full)
    assert any("click==9.0.0, outside" in p for p in lock_problems(project, bumped, runtime))
    # A package in the lock that nothing declares or needs.
    stray = full + "stray==1.0 \\\n    --hash=sha256:00\n    # via relaybox (pyproject.toml)\n"
    assert any("stray is there for relaybox" in p for p in lock_problems(project, stray, runtime))
    orphan = full + "orphan==1.0 \\\n    --hash=sha256:00\n    # via nothing-here\n"
    assert any("orphan is there for nothing" in p for p in lock_problems(project, orphan, runtime))
    # The runtime lock pinning another version than the full one.
    split = re.sub(r"(?m)^idna==\S+", "idna==3.7", runtime)
    assert any(
        "idna: requirements.txt and the full" in p for p in lock_problems(project, full, split)
    )


@pytest.mark.skipif(
    os.environ.get("RELAYBOX_TEST_LATEST") == "1", reason="--latest: not the locked set on purpose"
)
def test_this_environment_is_the_lock() -> None:
    """What the suite runs on is exactly requirements-test.txt (scripts/test installs it)."""
    _, full, _ = _load()
    pins = lockinfo.parse_lock(full)
    assert lockinfo.drift(pins, lockinfo.installed_versions()) == []


def test_version_names_the_lock_and_its_drift(tmp_path: Path) -> None:
    """`relaybox --version` / `doctor` read the lock recorded at install and compare each pin."""
    nothing = lockinfo.describe(lockinfo.recorded(tmp_path))
    assert nothing == "dependencies: not installed from a lock (scripts/install installs one)"
    record = tmp_path / lockinfo.RECORD_DIR
    record.mkdir(parents=True)
    installed = lockinfo.installed_versions()
    hashed = " \\\n    --hash=sha256:00\n"
    lock = f"click=={installed['click']}{hashed}idna==0.1{hashed}"
    (record / "requirements.txt").write_text(lock)
    rec = lockinfo.recorded(tmp_path)
    assert rec is not None and (rec.name, rec.pins) == ("requirements.txt", 2)
    line = lockinfo.describe(rec)
    assert line.startswith(f"dependencies: requirements.txt sha256:{rec.sha256[:12]}, 2 pins; ")
    assert line.endswith(f"1 differ: idna {installed['idna']} (locked 0.1)")


def test_version_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from admin.cli import cli
    from relay import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    first, second = result.stdout.splitlines()
    assert first.startswith(f"relaybox {__version__} (Python ")
    assert second.startswith("dependencies: ")

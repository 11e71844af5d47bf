"""relay/'s layout, read from its source with ``ast``: stages, no circles, no hidden imports.

Stages, lowest first; a module may import its own stage or lower ones, never a higher one:

0. ground: ``relay/__init__``, config (and ``relay/units*.py``, ``relay/config_*.py`` split from
   it), clock, errors, replies, maillog, metrics, grammar
1. every other top-level ``relay/*.py`` (dkim, dkimkeys, dnscheck and what it is split into)
2. ``relay/store/``
3. ``relay/smtp/`` and ``relay/delivery/``, which do not import each other
4. ``relay/service/``

Every import counts, at module level or inside a function alike, and so does an import under
``if TYPE_CHECKING:`` (a circle hidden from the interpreter is still a circle). Besides: relay
never imports ``admin`` or ``click``; no ``TYPE_CHECKING`` block and no import inside a function
(a lazy import) exists at all; no module is over 400 lines; every directory of .py files is a
package that pyproject.toml's ``packages.find`` includes. Each failure names the file and line.

The checks are functions over an import map, run on relay/ and, in
:func:`test_the_checks_catch_planted_cases`, on a small made-up map with a planted circle and
planted wrong imports, so that they cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "relay"
MAX_LINES = 400

GROUND = {"config", "clock", "errors", "replies", "maillog", "metrics", "grammar"}
PACKAGE_STAGES = {"store": 2, "smtp": 3, "delivery": 3, "service": 4}
FORBIDDEN = ("admin", "click")  # the CLI and its toolkit: relay must work without them


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the module imported: a relay module resolved as far as it exists, or a name
    file: str  # the importing file, relative to the checkout
    line: int
    lazy: bool = False  # inside a function

    def where(self) -> str:
        return f"{self.file}:{self.line}"


# --- reading relay/ ------------------------------------------------------------------------------


def python_files() -> list[Path]:
    return sorted(p for p in RELAY.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


MODULES: dict[str, str] = {module_name(p): relative(p) for p in python_files()}


def _resolve(name: str, modules: Mapping[str, str]) -> str:
    """A relay name as the longest prefix that is a module; anything else as it is."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


class _Scanner(ast.NodeVisitor):
    def __init__(self, module: str, file: str, is_package: bool) -> None:
        self.module, self.file, self.is_package = module, file, is_package
        self.found: list[tuple[str, int, bool]] = []  # (name imported, line, lazy)
        self.type_checking: list[int] = []
        self._depth = 0  # functions we are inside

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
        if "TYPE_CHECKING" in names:
            self.type_checking.append(node.lineno)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            # ``from relay.store import domains`` imports the module relay.store.domains;
            # ``from relay.config import Config`` imports relay.config (resolved later).
            self.found.append((f"{base}.{alias.name}", node.lineno, self._depth > 0))


@dataclass
class Scan:
    imports: list[Import]
    type_checking: list[str]  # "file:line" of each TYPE_CHECKING block


def scan(modules: Mapping[str, str]) -> Scan:
    imports: list[Import] = []
    type_checking: list[str] = []
    for module, file in modules.items():
        tree = ast.parse((ROOT / file).read_text(), filename=file)
        scanner = _Scanner(module, file, file.endswith("__init__.py"))
        scanner.visit(tree)
        for name, line, lazy in scanner.found:
            imports.append(Import(module, _resolve(name, modules), file, line, lazy))
        type_checking += [f"{file}:{line}" for line in scanner.type_checking]
    return Scan(imports, type_checking)


# --- the checks, on any import map ---------------------------------------------------------------


def stage_of(module: str, modules: Mapping[str, str]) -> tuple[int, str] | None:
    """(stage, group) of a relay module; None if it is in no stage (a new package nobody
    placed). Only stage 3 has two groups that must not import each other."""
    parts = module.split(".")
    if parts[0] != "relay":
        return None
    if len(parts) == 1:
        return 0, "ground"
    top = parts[1]
    if top in PACKAGE_STAGES:
        return PACKAGE_STAGES[top], top
    is_package = modules.get(f"relay.{top}", "").endswith("__init__.py")
    if is_package:
        return None
    if top in GROUND or top.startswith("units") or top.startswith("config_"):
        return 0, "ground"
    return 1, "checks"


def stage_failures(imports: Iterable[Import], modules: Mapping[str, str]) -> list[str]:
    failures: list[str] = []
    for imp in imports:
        if imp.target not in modules:
            continue
        source, target = stage_of(imp.source, modules), stage_of(imp.target, modules)
        if source is None or target is None:
            unplaced = imp.source if source is None else imp.target
            failures.append(f"{imp.where()}: {unplaced} is in no stage (tests/test_layout.py)")
        elif source[0] < target[0]:
            failures.append(
                f"{imp.where()}: {imp.source} (stage {source[0]}) imports {imp.target}"
                f" (stage {target[0]}): upward"
            )
        elif source[0] == target[0] == 3 and source[1] != target[1]:
            failures.append(
                f"{imp.where()}: {imp.source} imports {imp.target}: smtp and delivery must not"
                " import each other"
            )
    return failures


def forbidden_failures(imports: Iterable[Import]) -> list[str]:
    return [
        f"{imp.where()}: {imp.source} imports {imp.target}"
        for imp in imports
        if imp.target.split(".")[0] in FORBIDDEN
    ]


def lazy_failures(imports: Iterable[Import]) -> list[str]:
    seen: set[tuple[str, int]] = set()
    failures = []
    for imp in imports:
        if imp.lazy and (imp.file, imp.line) not in seen:
            seen.add((imp.file, imp.line))
            failures.append(f"{imp.where()}: {imp.source} imports {imp.target} inside a function")
    return failures


def cycles(imports: Iterable[Import], modules: Mapping[str, str]) -> list[str]:
    """One message per circle (strongly connected set of relay modules), naming each import of
    one shortest circle through it with its file and line."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules:
            edges[imp.source].setdefault(imp.target, imp)
    failures = []
    for component in _strongly_connected(edges):
        start = min(component)
        if len(component) == 1 and start not in edges[start]:
            continue
        path = _shortest_circle(start, edges, component)
        hops = [edges[a][b] for a, b in zip(path, path[1:], strict=False)]
        others = sorted(component - set(path))
        failures.append(
            "import circle: "
            + " -> ".join(path)
            + " ("
            + "; ".join(f"{h.where()} imports {h.target}" for h in hops)
            + ")"
            + (f"; the same circle also takes in {', '.join(others)}" if others else "")
        )
    return failures


def _strongly_connected(edges: Mapping[str, Mapping[str, Import]]) -> Iterator[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                yield component


def _shortest_circle(
    start: str, edges: Mapping[str, Mapping[str, Import]], within: set[str]
) -> list[str]:
    """Breadth first from start back to start, inside one strongly connected set."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = came_from[node]
                    return [start, *reversed(path[1:]), start]
                if child in within and child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a circle but none was found")


# --- relay/ as it is ----------------------------------------------------------------------------

SCAN = scan(MODULES)


def _report(failures: list[str]) -> str:
    return f"{len(failures)} problem(s):\n" + "\n".join(failures)


def test_no_import_circles() -> None:
    failures = cycles(SCAN.imports, MODULES)
    assert not failures, _report(failures)


def test_relay_imports_neither_admin_nor_click() -> None:
    failures = forbidden_failures(SCAN.imports)
    assert not failures, _report(failures)


def test_no_import_from_a_lower_stage_to_a_higher_one() -> None:
    failures = stage_failures(SCAN.imports, MODULES)
    assert not failures, _report(failures)


def test_no_type_checking_block() -> None:
    failures = [f"{where}: an `if TYPE_CHECKING:` block" for where in SCAN.type_checking]
    assert not failures, _report(failures)


def test_no_lazy_import() -> None:
    failures = lazy_failures(SCAN.imports)
    assert not failures, _report(failures)


def test_no_module_over_400_lines() -> None:
    failures = []
    for file in MODULES.values():
        n = len((ROOT / file).read_text().splitlines())
        if n > MAX_LINES:
            failures.append(f"{file}:{MAX_LINES + 1}: {n} lines, over {MAX_LINES}")
    assert not failures, _report(failures)


def _source_dirs() -> list[Path]:
    return sorted({p.parent for p in python_files()})


def not_packages(dirs: Iterable[Path], root: Path = ROOT) -> list[str]:
    return [
        f"{min(d.glob('*.py')).relative_to(root)}:1: {d.relative_to(root)}/ has no __init__.py"
        for d in dirs
        if not (d / "__init__.py").exists()
    ]


def not_found(packages: Iterable[str], find: Mapping[str, list[str]], line: int) -> list[str]:
    """The packages setuptools' ``packages.find`` would leave out (fnmatch on dotted names)."""
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    return [
        f"pyproject.toml:{line}: packages.find include {include} (exclude {exclude}) does not"
        f" cover {pkg}"
        for pkg in packages
        if not any(fnmatch.fnmatchcase(pkg, pat) for pat in include)
        or any(fnmatch.fnmatchcase(pkg, pat) for pat in exclude)
    ]


def test_every_directory_of_python_files_is_a_package() -> None:
    failures = not_packages(_source_dirs())
    assert not failures, _report(failures)


def test_setuptools_finds_every_package() -> None:
    """pyproject.toml's ``[tool.setuptools.packages.find]`` includes every package under
    relay/, so an install ships all of relay."""
    text = (ROOT / "pyproject.toml").read_text()
    find = tomllib.loads(text)["tool"]["setuptools"]["packages"]["find"]
    lines = text.splitlines()
    header = lines.index("[tool.setuptools.packages.find]")
    line = next(i for i, t in enumerate(lines[header:], header + 1) if t.startswith("include"))
    packages = [module_name(d / "__init__.py") for d in _source_dirs()]
    assert "relay" in packages and "relay.store" in packages  # the walk found the packages
    failures = not_found(packages, find, line)
    assert not failures, _report(failures)


def test_the_package_checks_catch_planted_cases(tmp_path: Path) -> None:
    plain, package = tmp_path / "relay" / "plain", tmp_path / "relay" / "pkg"
    for d in (plain, package):
        d.mkdir(parents=True)
        (d / "mod.py").write_text("")
    (package / "__init__.py").write_text("")
    assert not_packages([plain, package], root=tmp_path) == [
        "relay/plain/mod.py:1: relay/plain/ has no __init__.py"
    ]
    find = {"include": ["relay", "relay.*", "admin"], "exclude": ["relay.tests*"]}
    assert not_found(["relay", "relay.store", "relay.smtp.x", "admin"], find, 46) == []
    assert not_found(["relaybox", "relay.tests"], find, 46) == [
        f"pyproject.toml:46: packages.find include {find['include']} (exclude"
        f" {find['exclude']}) does not cover {pkg}"
        for pkg in ("relaybox", "relay.tests")
    ]
    assert not_found(["relay.store"], {"include": ["relay"]}, 1) != []  # relay does not cover it


def test_the_scan_sees_relay() -> None:
    """The walk reads what is there: every stage package and their imports."""
    assert {"relay", "relay.config", "relay.store", "relay.smtp", "relay.service"} <= set(MODULES)
    assert len(SCAN.imports) > 100
    sources = {imp.source for imp in SCAN.imports}
    assert {"relay.service.server", "relay.smtp.session", "relay.delivery.scheduler"} <= sources


# --- the checks catch what they are for -------------------------------------------------------


def test_the_checks_catch_planted_cases() -> None:
    modules = {
        "relay": "relay/__init__.py",
        "relay.config": "relay/config.py",
        "relay.units": "relay/units.py",
        "relay.dnscheck": "relay/dnscheck.py",
        "relay.store": "relay/store/__init__.py",
        "relay.store.domains": "relay/store/domains.py",
        "relay.smtp": "relay/smtp/__init__.py",
        "relay.smtp.session": "relay/smtp/session.py",
        "relay.delivery": "relay/delivery/__init__.py",
        "relay.delivery.scheduler": "relay/delivery/scheduler.py",
        "relay.service": "relay/service/__init__.py",
        "relay.service.server": "relay/service/server.py",
        "relay.webhooks": "relay/webhooks/__init__.py",  # a package nobody placed in a stage
    }

    def imp(source: str, target: str, line: int, *, lazy: bool = False) -> Import:
        return Import(source, target, modules[source], line, lazy)

    sound = [
        imp("relay.service.server", "relay.smtp.session", 1),
        imp("relay.service.server", "relay.delivery.scheduler", 2),
        imp("relay.smtp.session", "relay.store.domains", 3),
        imp("relay.store.domains", "relay.dnscheck", 4),
        imp("relay.dnscheck", "relay.config", 5),
        imp("relay.config", "relay.units", 6),
        imp("relay.units", "relay", 7),
        imp("relay.smtp.session", "asyncio", 8),
    ]
    assert cycles(sound, modules) == []
    assert stage_failures(sound, modules) == []
    assert forbidden_failures(sound) == lazy_failures(sound) == []

    circle = [
        *sound,
        imp("relay.config", "relay.store.domains", 10),  # closes config -> ... -> config
        imp("relay.smtp", "relay.smtp", 11),  # a module importing itself
    ]
    found = cycles(circle, modules)
    assert sorted(found) == [
        "import circle: relay.config -> relay.store.domains -> relay.dnscheck -> relay.config"
        " (relay/config.py:10 imports relay.store.domains; relay/store/domains.py:4 imports"
        " relay.dnscheck; relay/dnscheck.py:5 imports relay.config)",
        "import circle: relay.smtp -> relay.smtp (relay/smtp/__init__.py:11 imports relay.smtp)",
    ]

    wrong = [
        imp("relay.store.domains", "relay.service.server", 20),  # store -> service: up
        imp("relay.config", "relay.dnscheck", 21),  # ground -> stage 1: up
        imp("relay.smtp.session", "relay.delivery.scheduler", 22),  # across stage 3
        imp("relay.delivery.scheduler", "relay.smtp", 23),  # and back
        imp("relay.webhooks", "relay.config", 24),  # from no stage
        imp("relay.service.server", "admin.cli", 25, lazy=True),
        imp("relay.dnscheck", "click", 26),
    ]
    assert stage_failures(wrong, modules) == [
        "relay/store/domains.py:20: relay.store.domains (stage 2) imports relay.service.server"
        " (stage 4): upward",
        "relay/config.py:21: relay.config (stage 0) imports relay.dnscheck (stage 1): upward",
        "relay/smtp/session.py:22: relay.smtp.session imports relay.delivery.scheduler: smtp and"
        " delivery must not import each other",
        "relay/delivery/scheduler.py:23: relay.delivery.scheduler imports relay.smtp: smtp and"
        " delivery must not import each other",
        "relay/webhooks/__init__.py:24: relay.webhooks is in no stage (tests/test_layout.py)",
    ]
    assert forbidden_failures(wrong) == [
        "relay/service/server.py:25: relay.service.server imports admin.cli",
        "relay/dnscheck.py:26: relay.dnscheck imports click",
    ]
    assert lazy_failures(wrong) == [
        "relay/service/server.py:25: relay.service.server imports admin.cli inside a function"
    ]


def test_the_scanner_reads_every_kind_of_import() -> None:
    """Function-level, relative and TYPE_CHECKING imports are all seen, each at its line."""
    source = (
        "from __future__ import annotations\n"  # 1
        "import typing\n"  # 2
        "from typing import TYPE_CHECKING\n"  # 3
        "from relay.store import domains, spool as sp\n"  # 4
        "from . import session\n"  # 5
        "if TYPE_CHECKING:\n"  # 6
        "    from relay.service.server import Server\n"  # 7
        "if typing.TYPE_CHECKING:\n"  # 8
        "    pass\n"  # 9
        "def f() -> None:\n"  # 10
        "    import click\n"  # 11
        "    async def g() -> None:\n"  # 12
        "        from ..config import Config\n"  # 13
    )
    scanner = _Scanner("relay.smtp.handler", "relay/smtp/handler.py", is_package=False)
    scanner.visit(ast.parse(source))
    assert scanner.type_checking == [6, 8]
    assert scanner.found == [
        ("__future__.annotations", 1, False),
        ("typing", 2, False),
        ("typing.TYPE_CHECKING", 3, False),
        ("relay.store.domains", 4, False),
        ("relay.store.spool", 4, False),
        ("relay.smtp.session", 5, False),
        ("relay.service.server.Server", 7, False),
        ("click", 11, True),
        ("relay.config.Config", 13, True),
    ]
    known = {"relay.config": "", "relay.store": "", "relay.store.domains": ""}
    assert _resolve("relay.config.Config", known) == "relay.config"
    assert _resolve("relay.store.spool", known) == "relay.store"
    assert _resolve("click", known) == "click"

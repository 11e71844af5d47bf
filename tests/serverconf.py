"""The config file of a ``relaybox serve`` subprocess: one builder for every test that starts one.

What every such config shares is written here once: loopback listeners, the test certificate,
cheap argon2 and no failure delay (tests are not about hashing cost or throttling), no periodic
DNS recheck. What varies is a keyword argument::

    path.write_text(serve_config(
        state=tmp_path / "state", cert=cert, key=key,
        listen=[(0, "tls"), (0, "starttls")],
        delivery=smarthost(sink.port, command_timeout="5s"),
    ))
    # or, with the state and the file in tmp_path and the ``tls_files`` fixture's certificate:
    path = write_serve_config(tmp_path, tls_files, listen=..., delivery=...)

Tables are plain dicts (a dict value is a sub-table); :func:`toml` writes them out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

Scalar: TypeAlias = str | int | float | bool | Path
Value: TypeAlias = Scalar | Sequence[Scalar] | Mapping[str, "Value"]
Table: TypeAlias = Mapping[str, Value]

CHEAP_ARGON2: Table = {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}


def smarthost(
    port: int, *, login: tuple[str, str] | None = None, **delivery: Value
) -> dict[str, Value]:
    """A ``[delivery]`` table that sends everything to a plain loopback smarthost (a sink in the
    test process) on ``port``; ``login`` is the (username, password) to authenticate with."""
    host: dict[str, Value] = {"host": "127.0.0.1", "port": port, "security": "none"}
    if login is not None:
        host["username"], host["password"] = login
        host["allow_plaintext_auth"] = True  # a sink on loopback
    return {"mode": "smarthost", "connect_timeout": "2s", **delivery, "smarthost": host}


def serve_config(
    *,
    state: Path,
    cert: Path,
    key: Path,
    listen: Sequence[tuple[int, str]] = ((0, "tls"),),
    hostname: str = "relay.test",
    workers: int | None = None,
    dns: Table | None = None,
    limits: Table | None = None,
    delivery: Table | None = None,
    metrics: str | None = None,
    auth: Table | None = None,
    webhooks: Table | None = None,
) -> str:
    """The TOML text. ``listen`` is (port, mode) pairs on 127.0.0.1 (port 0 unless workers must
    share a named port); ``dns`` is merged over ``recheck_interval = "0s"``, ``auth`` over the
    cheap argon2 and no failure delay; ``metrics`` is the
    metrics endpoint's ``host:port``; a table left as None is left out (the defaults)."""
    top: dict[str, Value] = {"state_dir": state, "public_hostname": hostname}
    if workers is not None:
        top["workers"] = workers
    tables: dict[str, Table] = {
        "tls": {"cert": cert, "key": key},
        "auth": {"failure_delay": "0s", "argon2": CHEAP_ARGON2, **(auth or {})},
        "dns": {"recheck_interval": "0s", **(dns or {})},
    }
    for name, table in (("limits", limits), ("delivery", delivery), ("webhooks", webhooks)):
        if table is not None:
            tables[name] = table
    if metrics is not None:
        tables["metrics"] = {"listen": metrics}
    out = [toml(top)]
    for port, mode in listen:
        out.append("[[listen]]\n" + toml({"address": "127.0.0.1", "port": port, "mode": mode}))
    out += [toml(table, name) for name, table in tables.items()]
    return "\n".join(out)


def write_serve_config(directory: Path, tls_files: tuple[Path, Path, Path], **kw: Any) -> Path:
    """``directory/relaybox.toml``, with the state in ``directory/state`` and the certificate and
    key of ``tls_files`` (tests/relayserver.py); ``kw`` as for :func:`serve_config`."""
    cert, key, _ca = tls_files
    path = directory / "relaybox.toml"
    path.write_text(serve_config(state=directory / "state", cert=cert, key=key, **kw))
    return path


def toml(table: Table, name: str = "") -> str:
    """``table`` as TOML: its scalars under a ``[name]`` header (none for the top level), then
    each sub-table as a ``[name.sub]`` section. The argon2 parameters stay an inline table."""
    head = [f"[{name}]\n"] if name else []
    lines: list[str] = []
    subs: list[str] = []
    for k, v in table.items():
        if isinstance(v, Mapping) and k != "argon2":
            subs.append("\n" + toml(v, f"{name}.{k}" if name else k))
        else:
            lines.append(f"{k} = {_value(v)}\n")
    return "".join(head + lines + subs)


def _value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_value(v) for v in value) + "]"

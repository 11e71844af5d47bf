"""`relaybox domain ...` through Click's runner, against the loopback DNS server.

Plain sync tests: CliRunner runs asyncio.run inside the command, and the DNS server answers from
its own threads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from admin.cli import cli
from relay import dkimkeys
from tests import leaks
from tests.dnsserver import TestDNSServer

CONFIG = """\
state_dir = "{state_dir}"
public_hostname = "smtp.relay.test"

[dns]
nameservers = ["127.0.0.1"]
port = {port}
timeout = "0.5s"
outbound_ips = ["192.0.2.10"]
dkim_key_type = "{key_type}"
"""


@pytest.fixture
def config_path(tmp_path: Path, dns_server: TestDNSServer) -> Path:
    path = tmp_path / "relaybox.toml"
    path.write_text(
        CONFIG.format(state_dir=tmp_path / "state", port=dns_server.port, key_type="ed25519")
    )
    return path


def run(config_path: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config_path), *args], input=input)


def ok_json(config_path: Path, *args: str) -> Any:
    result = run(config_path, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def publish(dns_server: TestDNSServer, shown: dict[str, Any]) -> None:
    for rec in shown["records"]:
        dns_server.add_txt_value(rec["name"], rec["value"])


def test_add_shows_records_json(config_path: Path) -> None:
    data = ok_json(config_path, "domain", "add", "Bücher.example")
    assert list(data) == ["name", "state", "records", "checks", "sandbox", "allow_rcpt"]
    assert (data["name"], data["state"], data["checks"]) == ("xn--bcher-kva.example", "pending", [])
    assert (data["sandbox"], data["allow_rcpt"]) == (False, None)  # tests/test_sandbox.py: True
    recs = {r["purpose"]: r for r in data["records"]}
    assert list(recs) == ["ownership", "spf", "dkim", "dmarc"]
    assert all(set(r) == {"purpose", "type", "name", "value"} for r in recs.values())
    assert recs["ownership"]["name"] == "_relaybox.xn--bcher-kva.example"
    assert recs["ownership"]["value"].startswith("relaybox-verification=")
    assert recs["spf"] == {
        "purpose": "spf",
        "type": "TXT",
        "name": "xn--bcher-kva.example",
        "value": "v=spf1 ip4:192.0.2.10 ~all",
    }
    assert recs["dkim"]["name"] == "relaybox._domainkey.xn--bcher-kva.example"
    assert recs["dkim"]["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert recs["dmarc"]["value"] == "v=DMARC1; p=none"

    again = run(config_path, "domain", "add", "xn--bcher-kva.example")
    assert again.exit_code == 1
    assert again.stderr == "Error: domain xn--bcher-kva.example already exists\n"


def test_add_human_output_splits_long_values(tmp_path: Path, dns_server: TestDNSServer) -> None:
    path = tmp_path / "rsa.toml"
    path.write_text(CONFIG.format(state_dir=tmp_path / "s", port=dns_server.port, key_type="rsa"))
    result = run(path, "domain", "add", "example.com")
    assert result.exit_code == 0, result.output
    dkim_line = next(x for x in result.stdout.splitlines() if x.startswith("relaybox._domainkey"))
    name, _in, rtype, strings = dkim_line.split("\t")
    assert (name, rtype) == ("relaybox._domainkey.example.com.", "TXT")
    parts = strings.split('" "')
    assert len(parts) == 2 and strings.startswith('"v=DKIM1; k=rsa; p=')
    assert all(len(p.strip('"')) <= 255 for p in parts)
    shown = ok_json(path, "domain", "show", "example.com")
    dkim_value = next(r["value"] for r in shown["records"] if r["purpose"] == "dkim")
    assert strings == dkimkeys.zone_strings(dkim_value)
    assert "".join(p.strip('"') for p in parts) == dkim_value
    assert "then run: relaybox domain verify example.com" in result.stdout


def test_verify_until_verified(config_path: Path, dns_server: TestDNSServer) -> None:
    shown = ok_json(config_path, "domain", "add", "example.com")

    failed = run(config_path, "domain", "verify", "example.com", "--json")
    assert failed.exit_code == 1
    data = json.loads(failed.stdout)
    assert (data["name"], data["state"]) == ("example.com", "pending")
    assert [(c["check"], c["result"], c["reason"]) for c in data["checks"]] == [
        ("ownership", "fail", "no TXT record"),
        ("spf", "fail", "no TXT record"),
        ("dkim", "fail", "no TXT record"),
        ("dmarc", "fail", "no TXT record"),
    ]
    assert failed.stderr == (
        "not verified: example.com is pending (ownership: no TXT record; spf: no TXT record; "
        "dkim: no TXT record)\n"
    )

    publish(dns_server, shown)
    human = run(config_path, "domain", "verify", "example.com")
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["Check", "Expected", "Found", "Result"]
    assert lines[2].split()[0] == "ownership" and lines[2].split()[-1] == "pass"
    assert lines[-1] == "example.com: verified"
    assert human.stderr == ""

    data = ok_json(config_path, "domain", "verify", "example.com")
    assert list(data) == ["name", "state", "checks"]
    assert {c["result"] for c in data["checks"]} == {"pass"}
    assert all({"check", "result", "reason"} <= set(c) for c in data["checks"])

    listed = ok_json(config_path, "domain", "list")
    assert [(d["name"], d["state"]) for d in listed] == [("example.com", "verified")]
    assert listed[0]["verified_at"].endswith("Z")
    shown = ok_json(config_path, "domain", "show", "EXAMPLE.com")
    assert shown["state"] == "verified" and len(shown["checks"]) == 4

    audit = ok_json(config_path, "audit", "--target", "example.com")
    assert [e["action"] for e in audit][:3] == ["domain.verify", "domain.state", "domain.verify"]
    assert audit[-1]["action"] == "domain.add"


def test_verify_temperror_keeps_state(config_path: Path, dns_server: TestDNSServer) -> None:
    shown = ok_json(config_path, "domain", "add", "example.com")
    publish(dns_server, shown)
    assert ok_json(config_path, "domain", "verify", "example.com")["state"] == "verified"
    dns_server.servfail(None)
    data = ok_json(config_path, "domain", "verify", "example.com")  # still verified: exit 0
    assert data["state"] == "verified"
    assert {(c["result"], c["reason"]) for c in data["checks"]} == {
        ("temperror", "DNS server failure (SERVFAIL)")
    }
    human = run(config_path, "domain", "show", "example.com")
    assert "temperror: DNS server failure (SERVFAIL)" in human.stdout


def test_list_show_remove(config_path: Path) -> None:
    empty = run(config_path, "domain", "list")
    assert empty.exit_code == 0 and "no domains yet" in empty.stdout
    assert ok_json(config_path, "domain", "list") == []
    ok_json(config_path, "domain", "add", "b.example")
    ok_json(config_path, "domain", "add", "a.example")
    human = run(config_path, "domain", "list")
    assert [line.split()[:2] for line in human.stdout.splitlines()[2:]] == [
        ["a.example", "pending"],
        ["b.example", "pending"],
    ]

    missing = run(config_path, "domain", "show", "c.example")
    assert (missing.exit_code, missing.stderr) == (1, "Error: no such domain: c.example\n")
    bad = run(config_path, "domain", "add", "not_a_domain.example")
    assert bad.exit_code == 1 and "is not a valid domain name" in bad.stderr
    assert "Traceback" not in bad.output

    refused = run(config_path, "domain", "remove", "a.example")  # no terminal, no --yes
    assert refused.exit_code == 1 and "Refusing without --yes" in refused.stderr
    removed = run(config_path, "domain", "remove", "a.example", "--yes")
    assert (removed.exit_code, removed.stdout) == (0, "removed a.example\n")
    assert [d["name"] for d in ok_json(config_path, "domain", "list")] == ["b.example"]
    gone = run(config_path, "domain", "remove", "a.example", "--yes")
    assert (gone.exit_code, gone.stderr) == (1, "Error: no such domain: a.example\n")


def test_remove_with_users(config_path: Path, dns_server: TestDNSServer) -> None:
    shown = ok_json(config_path, "domain", "add", "example.com")
    publish(dns_server, shown)
    ok_json(config_path, "domain", "verify", "example.com")
    leaks.add(ok_json(config_path, "user", "add", "app@example.com")["password"])
    refused = run(config_path, "domain", "remove", "example.com", "--yes")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("Error: domain example.com has 1 user(s)")
    removed = run(config_path, "domain", "remove", "example.com", "--yes", "--with-users")
    assert removed.exit_code == 0, removed.output
    assert ok_json(config_path, "domain", "list") == []

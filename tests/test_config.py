"""Config: the reference file and the dataclasses agree; bad keys are named; units parse."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from relay import config as config_mod
from relay import units
from relay.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "conf" / "relaybox.toml"


def _uncomment(text: str) -> str:
    """The reference file with every commented-out key line made live."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^#\s?((\[\[?[a-z_.]+\]\]?)|([a-z_0-9]+ = .*))$", line)
        out.append(m.group(1) if m else line)
    return "\n".join(out)


def _keys(d: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                keys |= _keys(v, key)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                keys |= {f"{key}[]"} | _keys(v[0], f"{key}[]")
            else:
                keys.add(key)
    return keys


def test_empty_file_loads_to_exactly_the_defaults(tmp_path: Path) -> None:
    p = tmp_path / "empty.toml"
    p.write_text("")
    assert config_mod.load(p) == Config()


# The live (uncommented) keys of conf/relaybox.toml: what a production install changes from the
# built-in defaults. Everything else in the file is commented out at its default.
LIVE_KEYS = {
    "state_dir",
    "public_hostname",
    "listen[]",
    "listen[].address",
    "listen[].port",
    "listen[].mode",
    "tls.cert",
    "tls.key",
}


def test_reference_file_is_the_defaults_except_its_live_keys() -> None:
    data = tomllib.loads(REFERENCE.read_text())
    assert _keys(data) == LIVE_KEYS  # a new live key must be named here (and in the docs)
    defaults = Config()
    production = dataclasses.replace(
        defaults,
        state_dir=Path("/var/lib/relaybox"),
        public_hostname="smtp.example.com",
        listen=(
            config_mod.Listener("0.0.0.0", 587, "starttls"),
            config_mod.Listener("0.0.0.0", 465, "tls"),
        ),
        tls=dataclasses.replace(
            defaults.tls,
            cert="/etc/relaybox/tls/fullchain.pem",
            key="/etc/relaybox/tls/privkey.pem",
        ),
    )
    cfg = config_mod.from_dict(data)
    assert config_mod.to_dict(cfg, redact=False) == config_mod.to_dict(production, redact=False)
    assert cfg == production


def test_reference_file_comments_out_exactly_the_defaults() -> None:
    """Every ``# key = value`` line states the dataclass default: making them all live changes
    nothing. With the test above (the file as shipped is the defaults but its live keys), a
    documented default that drifts from the code fails here."""
    text = REFERENCE.read_text()
    shipped = config_mod.from_dict(tomllib.loads(text))
    uncommented = tomllib.loads(_uncomment(text))
    assert _keys(uncommented) - LIVE_KEYS, "nothing was uncommented: is _uncomment broken?"
    everything = config_mod.from_dict(uncommented)
    assert config_mod.to_dict(everything, redact=False) == config_mod.to_dict(shipped, redact=False)
    assert everything == shipped


def test_reference_file_documents_every_key() -> None:
    live = tomllib.loads(_uncomment(REFERENCE.read_text()))
    cfg = config_mod.from_dict(live)  # every documented key is valid
    documented = _keys(live)
    expected = _keys(config_mod.to_dict(Config()))
    expected |= {"listen[]", "listen[].address", "listen[].port", "listen[].mode"}
    expected |= {"listen[].proxy_protocol", "listen[].trusted_proxies"}
    expected -= {"listen"}
    missing = sorted(expected - documented)
    assert not missing, f"keys not in conf/relaybox.toml: {missing}"
    assert cfg.listen


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[auth]\nreset_grase = '1h'\n")
    with pytest.raises(ConfigError, match=r"auth\.reset_grase: unknown key"):
        config_mod.load(p)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[auth]\nreset_grace = 'soon'", r"auth\.reset_grace: 'soon' is not a duration"),
        ("[limits]\nmax_message_size = 'big'", r"limits\.max_message_size"),
        ("[[listen]]\naddress='127.0.0.1'\nport=70000\nmode='tls'", r"listen\[0\]\.port"),
        ("[[listen]]\naddress='127.0.0.1'\nport=25\nmode='plain'", r"listen\[0\]\.mode"),
        ("[dns]\nrequired = ['ownership', 'magic']", r"dns\.required"),
        ("[dns]\nnameservers = ['not-an-ip']", r"dns\.nameservers"),
        ("[delivery]\nmode = 'smarthost'", r"delivery\.smarthost\.host: required"),
        ("[auth]\nmax_failures = true", r"auth\.max_failures: expected an integer"),
        ("state_dir = 5", r"state_dir: expected a path"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        config_mod.load(p)


def test_durations_and_sizes() -> None:
    assert units.parse_duration("90s") == 90
    assert units.parse_duration("15m") == 900
    assert units.parse_duration("1h") == 3600
    assert units.parse_duration("5d") == 432000
    assert units.parse_duration("0") == 0
    assert units.parse_size("25MiB") == 25 * 1024 * 1024
    assert units.parse_size("100kB") == 100_000
    assert units.format_duration(3600) == "1h"
    assert units.format_duration(90) == "90s"


def test_secrets_are_redacted() -> None:
    cfg = config_mod.from_dict(
        {
            "delivery": {
                "mode": "smarthost",
                "smarthost": {"host": "h", "password": "hunter2hunter2"},
            }
        }
    )
    shown = repr(config_mod.to_dict(cfg, redact=True))
    assert "hunter2hunter2" not in shown
    assert config_mod.to_dict(cfg, redact=False)["delivery"]["smarthost"]["password"]


def test_env_var_and_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "c.toml"
    p.write_text("public_hostname = 'smtp.example.com'\n")
    monkeypatch.setenv("RELAYBOX_CONFIG", str(p))
    assert config_mod.load().public_hostname == "smtp.example.com"
    monkeypatch.delenv("RELAYBOX_CONFIG")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/relaybox")
    assert Config().state_dir == Path("/var/lib/relaybox")


def test_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.public_hostname = "x"  # type: ignore[misc]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_duration_must_be_finite(value: str) -> None:
    """TOML has nan and inf; as a duration (say auth.reset_grace) they would reach the store."""
    with pytest.raises(config_mod.ConfigError, match="reset_grace.*finite"):
        config_mod.from_dict({"auth": {"reset_grace": float(value)}})


@pytest.mark.parametrize("value", ["0", "10ms", "2m"])
def test_dns_timeout_is_bounded(value: str) -> None:
    """dns.timeout = 0 would make every lookup an instant temperror (domains never verify)."""
    with pytest.raises(config_mod.ConfigError, match=r"timeout: .* is outside 50ms\.\.60s"):
        config_mod.from_dict({"dns": {"timeout": value}})

"""Issue 14's CLI: `relaybox user set`, `user add --expires`, `user usage`, `user list
--unused-since`, the controls in `user show` / `user list`, and doctor's expiry warnings.

Run through Click's runner like tests/test_user_cli.py (one test runs the installed console
script itself), against a real state dir; counts are seeded with relay/store/usage.py's own
functions (admit, note_refused, Tally.flush), users' pasts with the users store's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from admin.cli import cli
from relay import config as config_mod
from relay import userrules
from relay.config import Config
from relay.service import doctor
from relay.store import admissions, logins, shared, usage, users
from relay.store.db import Database
from relay.store.passwords import Hasher
from relay.store.usage import Hit
from relay.store.users import SettingsChange, User
from relay.userrules import Limits
from tests import leaks
from tests.test_user_cli import CONTROL_KEYS, DEFAULT_LIMITS, LIST_KEYS, NO_USAGE
from tests.userhelpers import json_of, one_line_error

LOGIN = "app@example.com"
DAY = 86400.0
CONSOLE = Path(sys.executable).parent / "relaybox"
SHOW_KEYS = [*LIST_KEYS, *CONTROL_KEYS, "host", "listeners", "sandbox"]


def _add(relaybox: Any, login: str = LOGIN, *extra: str) -> dict[str, Any]:
    data = json_of(relaybox("user", "add", login, "--json", *extra))
    leaks.add(data["password"])
    return json_of(relaybox("user", "show", login, "--json"))


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _in_main_db(conf: Config, fn: Any) -> Any:
    async def _main() -> Any:
        db = await shared.open_main(conf)
        try:
            return await fn(db)
        finally:
            await db.close()

    return asyncio.run(_main())


def _in_usage_db(conf: Config, fn: Any) -> Any:
    async def _main() -> Any:
        db = await shared.open_counts(conf)
        try:
            return await fn(db)
        finally:
            await db.close()

    return asyncio.run(_main())


def _create_user(conf: Config, login: str, *, created: float) -> None:
    async def create(db: Database) -> None:
        hasher = Hasher(conf.auth)
        try:
            password = leaks.add("a-long-enough-test-password-" + login)
            await users.create(db, login, password, hasher=hasher, cfg=conf, now=created, actor="t")
        finally:
            hasher.close()

    _in_main_db(conf, create)


UNLIMITED = Limits(0, 0, 0)


async def _send(db: Database, login: str, messages: int, rcpt: int, now: float) -> None:
    """What the server counts for ``messages`` accepted messages of ``rcpt`` recipients."""
    for _ in range(messages):
        assert await admissions.admit(db, login, rcpt, UNLIMITED, now) is None


# --- user set: limits -------------------------------------------------------------------------


def test_set_limits_prints_the_user_and_writes_an_audit_event(relaybox: Any, domain: str) -> None:
    before = _add(relaybox)
    assert before["limits"] == DEFAULT_LIMITS

    data = json_of(relaybox("user", "set", LOGIN, "--messages-per-hour", "5", "--json"))
    assert list(data) == SHOW_KEYS
    assert data["limits"]["messages_per_hour"] == {"limit": 5, "default": False}
    assert data["limits"]["messages_per_day"] == {"limit": 10000, "default": True}
    assert data == json_of(relaybox("user", "show", LOGIN, "--json"))

    text = relaybox("user", "set", LOGIN, "--messages-per-day", "0", "--recipients-per-day", "250")
    assert text.exit_code == 0, text.output
    assert len(text.stdout.splitlines()) <= 12
    for needle in (
        "messages per hour   5 (own)",
        "messages per day    unlimited (own)",
        "recipients per day  250 (own)",
        "Expires:    never",
    ):
        assert needle in text.stdout, text.stdout
    shown = json_of(relaybox("user", "show", LOGIN, "--json"))["limits"]
    assert shown["messages_per_day"] == {"limit": 0, "default": False}
    assert shown["recipients_per_day"] == {"limit": 250, "default": False}

    back = json_of(relaybox("user", "set", LOGIN, "--messages-per-hour", "default", "--json"))
    assert back["limits"]["messages_per_hour"] == {"limit": 1000, "default": True}
    assert back["limits"]["messages_per_day"] == {"limit": 0, "default": False}
    one = json_of(relaybox("user", "set", LOGIN, "--default", "messages-per-day", "--json"))
    assert one["limits"]["messages_per_day"] == {"limit": 10000, "default": True}
    assert one["limits"]["recipients_per_day"] == {"limit": 250, "default": False}
    every = json_of(relaybox("user", "set", LOGIN, "--default", "all", "--json"))
    assert every["limits"] == DEFAULT_LIMITS

    events = json_of(relaybox("audit", "--target", LOGIN, "--json"))
    sets = [e for e in events if e["action"] == "user.set"]
    assert len(sets) == 5
    assert sets[-1]["detail"] == "messages_per_hour=5"  # oldest last
    assert "messages_per_day=0" in sets[-2]["detail"]
    assert "recipients_per_day=250" in sets[-2]["detail"]
    assert sets[0]["detail"] == (
        "messages_per_hour=default messages_per_day=default recipients_per_day=default"
    )


def test_set_errors_are_one_line_and_change_nothing(relaybox: Any, domain: str) -> None:
    _add(relaybox)
    one_line_error(relaybox("user", "set", LOGIN), "nothing to change", "--messages-per-hour")
    one_line_error(relaybox("user", "set", LOGIN, "--json"), "nothing to change")
    one_line_error(
        relaybox("user", "set", "ghost@example.com", "--messages-per-hour", "5"), "no such user"
    )
    one_line_error(relaybox("user", "set", "nonsense", "--expires", "never"), "name@domain")
    for bad in ("abc", "-1", "5000000000", "1.5"):
        one_line_error(
            relaybox("user", "set", LOGIN, "--messages-per-hour", bad), "--messages-per-hour"
        )
    one_line_error(
        relaybox("user", "set", LOGIN, "--default", "messages_per_week"),
        "--default",
        "messages-per-hour, messages-per-day, recipients-per-day or all",
    )
    one_line_error(
        relaybox("user", "set", LOGIN, "--messages-per-hour", "5", "--default", "all"),
        "--default",
        "--messages-per-hour",
    )
    one_line_error(
        relaybox("user", "set", LOGIN, "--allow-ip", "10.1.2.3/8"), "--allow-ip", "10.1.2.3/8"
    )
    one_line_error(relaybox("user", "set", LOGIN, "--allow-ip", "not-an-ip"), "--allow-ip")
    one_line_error(
        relaybox("user", "set", LOGIN, "--allow-ip", "any", "--allow-ip", "192.0.2.0/24"),
        "--allow-ip any",
    )
    one_line_error(
        relaybox("user", "set", LOGIN, "--allow-from", "billing@other.example"),
        "--allow-from",
        "not in the user's domain example.com",
    )
    one_line_error(relaybox("user", "set", LOGIN, "--expires", "soon"), "--expires")
    one_line_error(relaybox("user", "set", LOGIN, "--expires", "2001-01-01"), "in the past")
    shown = json_of(relaybox("user", "show", LOGIN, "--json"))
    assert shown["limits"] == DEFAULT_LIMITS
    assert (shown["allow_ip"], shown["allow_from"], shown["expires_at"]) == ([], [], None)
    events = json_of(relaybox("audit", "--target", LOGIN, "--json"))
    assert [e["action"] for e in events] == ["user.add"]


# --- user set: allow-lists and expiry ---------------------------------------------------------


def test_set_allow_lists_replace_the_whole_list_and_any_clears(relaybox: Any, domain: str) -> None:
    _add(relaybox)
    data = json_of(
        relaybox(
            "user", "set", LOGIN,
            "--allow-ip", "192.0.2.0/24", "--allow-ip", "2001:DB8::/32", "--allow-ip", "127.0.0.1",
            "--allow-from", "noreply@example.com", "--allow-from", "*@Mail.Example.com",
            "--json",
        )
    )  # fmt: skip
    assert data["allow_ip"] == ["192.0.2.0/24", "2001:db8::/32", "127.0.0.1/32"]
    assert data["allow_from"] == ["noreply@example.com", "*@mail.example.com"]
    text = relaybox("user", "show", LOGIN)
    assert text.exit_code == 0
    assert "Allowed IPs:     192.0.2.0/24, 2001:db8::/32, 127.0.0.1/32" in text.stdout
    assert "Allowed senders: noreply@example.com, *@mail.example.com" in text.stdout

    data = json_of(relaybox("user", "set", LOGIN, "--allow-ip", "198.51.100.7", "--json"))
    assert data["allow_ip"] == ["198.51.100.7/32"]  # the whole new list
    assert data["allow_from"] == ["noreply@example.com", "*@mail.example.com"]  # kept
    data = json_of(
        relaybox("user", "set", LOGIN, "--allow-ip", "any", "--allow-from", "ANY", "--json")
    )
    assert (data["allow_ip"], data["allow_from"]) == ([], [])
    text = relaybox("user", "show", LOGIN)
    assert "Allowed IPs:     any" in text.stdout
    assert "Allowed senders: any address of example.com" in text.stdout
    details = [e["detail"] for e in json_of(relaybox("audit", "--target", LOGIN, "--json"))]
    assert details[0] == "allow_ip=any allow_from=any"
    assert details[1] == "allow_ip=198.51.100.7/32"


def test_expiry_on_add_and_set(relaybox: Any, domain: str) -> None:
    assert _add(relaybox)["expires_at"] is None
    before = time.time()
    later = _add(relaybox, "later@example.com", "--expires", "90d")
    assert int(before) + 90 * DAY <= _ts(later["expires_at"]) <= time.time() + 90 * DAY
    dated = _add(relaybox, "dated@example.com", "--expires", "2099-03-01")
    assert dated["expires_at"] == "2099-03-01T00:00:00Z"
    assert _add(relaybox, "never@example.com", "--expires", "never")["expires_at"] is None
    one_line_error(relaybox("user", "add", "past@example.com", "--expires", "2001-01-01"), "past")
    one_line_error(relaybox("user", "add", "bad@example.com", "--expires", "soon"), "--expires")
    one_line_error(relaybox("user", "show", "past@example.com"), "no such user")

    data = json_of(relaybox("user", "set", LOGIN, "--expires", "2099-12-31T12:00Z", "--json"))
    assert data["expires_at"] == "2099-12-31T12:00:00Z"
    text = relaybox("user", "show", LOGIN)
    assert "Expires:    2099-12-31T12:00:00Z (in " in text.stdout
    assert (
        json_of(relaybox("user", "set", LOGIN, "--expires", "never", "--json"))["expires_at"]
        is None
    )
    events = json_of(relaybox("audit", "--target", LOGIN, "--json"))
    assert [e["detail"] for e in events[:2]] == [
        "expires_at=never",
        "expires_at=2099-12-31T12:00:00Z",
    ]
    added = json_of(relaybox("audit", "--target", "dated@example.com", "--json"))
    assert added[0]["detail"] == "expires_at=2099-03-01T00:00:00Z"

    table = relaybox("user", "list")
    assert table.exit_code == 0
    header, _rule, *rows = table.stdout.splitlines()
    assert "Expires" in header
    row = next(r for r in rows if r.startswith("dated@example.com"))
    assert "2099-03-01T00:00:00Z" in row
    assert "never" in next(r for r in rows if r.startswith("never@example.com"))


def test_the_installed_console_script(cli_config: Path, conf: Config, domain: str) -> None:
    """The real `relaybox` executable: set, its JSON, and an error without a traceback."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(CONSOLE), "--config", str(cli_config), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    added = run("user", "add", LOGIN, "--expires", "30d", "--json")
    assert added.returncode == 0, added.stderr
    leaks.add(json.loads(added.stdout)["password"])
    done = run(
        "user", "set", LOGIN, "--messages-per-hour", "5", "--allow-ip", "127.0.0.0/8", "--json"
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["limits"]["messages_per_hour"] == {"limit": 5, "default": False}
    assert data["allow_ip"] == ["127.0.0.0/8"]
    bad = run("user", "set", LOGIN, "--allow-ip", "300.1.1.1")
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert bad.stdout == ""


# --- usage today, user usage ------------------------------------------------------------------


def test_usage_today_and_the_user_at_a_limit(relaybox: Any, conf: Config, domain: str) -> None:
    _add(relaybox)
    _add(relaybox, "quiet@example.com")
    json_of(relaybox("user", "set", LOGIN, "--messages-per-hour", "3", "--json"))
    now = time.time()
    _in_usage_db(conf, lambda db: _send(db, LOGIN, 3, 2, now))

    shown = json_of(relaybox("user", "show", LOGIN, "--json"))
    assert shown["usage_today"] == {
        "messages": 3,
        "recipients": 6,
        "messages_this_hour": 3,
        "limited": ["messages_per_hour"],
    }
    listed = {u["login"]: u for u in json_of(relaybox("user", "list", "--json"))}
    assert listed[LOGIN]["usage_today"] == shown["usage_today"]
    assert listed["quiet@example.com"]["usage_today"] == NO_USAGE

    text = relaybox("user", "show", LOGIN)
    assert "Today:      3 messages (3 this hour), 6 recipients" in text.stdout
    assert "at its limit: messages per hour" in text.stdout
    table = relaybox("user", "list")
    header, _rule, *rows = table.stdout.splitlines()
    assert "Limited" in header
    assert "messages per hour" in next(r for r in rows if r.startswith(LOGIN))
    assert "messages per hour" not in next(r for r in rows if r.startswith("quiet@"))

    # An unlimited (0) limit is never reached; recipients count toward recipients_per_day.
    json_of(
        relaybox(
            "user", "set", LOGIN, "--messages-per-hour", "0", "--recipients-per-day", "6", "--json"
        )
    )
    again = json_of(relaybox("user", "show", LOGIN, "--json"))["usage_today"]
    assert again["limited"] == ["recipients_per_day"]


def test_user_usage_per_day_oldest_first(relaybox: Any, conf: Config, domain: str) -> None:
    _add(relaybox)
    now = time.time()

    async def seed(db: Database) -> None:
        await _send(db, LOGIN, 3, 2, now - 2 * DAY)
        await _send(db, LOGIN, 2, 1, now)
        await _send(db, "other@example.com", 7, 1, now)  # someone else's counts stay theirs
        tally = usage.Tally()
        for state, n, at in (("delivered", 5, now - 2 * DAY), ("bounced", 1, now - 2 * DAY),
                             ("delivered", 1, now), ("deferred", 1, now)):  # fmt: skip
            for _ in range(n):
                tally.add(LOGIN, state, at)
        await tally.flush(db, now)
        hit = Hit("messages_per_hour", 2, userrules.window_end("messages_per_hour", now))
        await usage.note_refused(db, LOGIN, hit, now)

    _in_usage_db(conf, seed)
    data = json_of(relaybox("user", "usage", LOGIN, "--days", "3", "--json"))
    assert list(data) == ["login", "days"]
    assert data["login"] == LOGIN
    keys = [userrules.day_key(now - i * DAY) for i in (2, 1, 0)]
    assert data["days"] == [
        {"day": keys[0], "accepted": 3, "recipients": 6, "delivered": 5, "deferred": 0,
         "bounced": 1, "refused_for_limit": 0},
        {"day": keys[1], "accepted": 0, "recipients": 0, "delivered": 0, "deferred": 0,
         "bounced": 0, "refused_for_limit": 0},
        {"day": keys[2], "accepted": 2, "recipients": 2, "delivered": 1, "deferred": 1,
         "bounced": 0, "refused_for_limit": 1},
    ]  # fmt: skip
    default = json_of(relaybox("user", "usage", "APP@example.com", "--json"))
    assert len(default["days"]) == 30 and default["days"][-3:] == data["days"]

    text = relaybox("user", "usage", LOGIN, "--days", "3")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "Day", "Accepted", "Recipients", "Delivered", "Deferred", "Bounced", "Refused", "(limit)",
    ]  # fmt: skip
    assert lines[2].split() == [keys[0], "3", "6", "5", "0", "1", "0"]
    assert lines[4].split() == [keys[2], "2", "2", "1", "1", "0", "1"]
    assert "5 messages" in lines[-1] and "8 recipients" in lines[-1]

    one_line_error(relaybox("user", "usage", "ghost@example.com"), "no such user")
    for bad in ("0", "401", "x"):
        one_line_error(relaybox("user", "usage", LOGIN, "--days", bad), "--days", "1 to 400")


def test_usage_of_a_state_dir_without_counts_yet(relaybox: Any, conf: Config, domain: str) -> None:
    _add(relaybox)
    assert not conf.usage_path.exists()
    data = json_of(relaybox("user", "usage", LOGIN, "--days", "2", "--json"))
    assert [d["accepted"] for d in data["days"]] == [0, 0]
    assert json_of(relaybox("user", "show", LOGIN, "--json"))["usage_today"] == NO_USAGE


# --- user list --unused-since -----------------------------------------------------------------


def test_list_unused_since(relaybox: Any, conf: Config, domain: str) -> None:
    now = time.time()
    _create_user(conf, "old-never@example.com", created=now - 40 * DAY)
    _create_user(conf, "new-never@example.com", created=now - DAY)
    _create_user(conf, "old-active@example.com", created=now - 40 * DAY)
    _create_user(conf, "old-dormant@example.com", created=now - 40 * DAY)
    seen = {"old-active@example.com": now - DAY, "old-dormant@example.com": now - 35 * DAY}
    _in_main_db(conf, lambda db: logins.record_logins(db, seen))

    dormant = json_of(relaybox("user", "list", "--unused-since", "30d", "--json"))
    assert [u["login"] for u in dormant] == ["old-dormant@example.com", "old-never@example.com"]
    assert list(dormant[0]) == [*LIST_KEYS, *CONTROL_KEYS]
    wider = json_of(relaybox("user", "list", "--unused-since", "12h", "--json"))
    assert [u["login"] for u in wider] == [
        "new-never@example.com", "old-active@example.com", "old-dormant@example.com",
        "old-never@example.com",
    ]  # fmt: skip
    text = relaybox("user", "list", "--unused-since", "30d")
    assert text.exit_code == 0
    assert "old-never@example.com" in text.stdout and "old-active" not in text.stdout
    none = relaybox("user", "list", "--unused-since", "90d")
    assert none.exit_code == 0 and "no user unused since" in none.stdout
    assert json_of(relaybox("user", "list", "--unused-since", "90d", "--json")) == []
    one_line_error(relaybox("user", "list", "--unused-since", "soon"), "--unused-since")
    helped = relaybox("user", "list", "--help")
    assert "30 seconds" in " ".join(helped.stdout.split())


# --- doctor -----------------------------------------------------------------------------------


def _user(login: str, expires_at: float | None, *, disabled: bool = False) -> User:
    return User(login, "example.com", 0.0, None, 0.0, None, disabled, expires_at=expires_at)


def test_doctor_expiry_check_decides() -> None:
    now = 1_800_000_000.0
    assert doctor.check_user_expiry([_user("a@example.com", None)], now) == []
    far = [_user("far@example.com", now + 8 * DAY)]
    assert [c.status for c in doctor.check_user_expiry(far, now)] == ["pass"]
    checks = doctor.check_user_expiry(
        [
            _user("soon@example.com", now + 3 * DAY),
            _user("edge@example.com", now + 7 * DAY),
            _user("gone@example.com", now - 60),
            _user("disabled-gone@example.com", now - 60, disabled=True),  # refused anyway
            *far,
        ],
        now,
    )
    by_name = {c.check: c for c in checks}
    assert set(by_name) == {"users expiring", "users expired"}
    soon = by_name["users expiring"]
    assert soon.status == "warn"
    assert "soon@example.com" in soon.detail and "edge@example.com" in soon.detail
    assert "far@example.com" not in soon.detail and "gone@" not in soon.detail
    assert "relaybox user set" in soon.detail
    gone = by_name["users expired"]
    assert gone.status == "warn" and "gone@example.com" in gone.detail
    assert "disabled-gone" not in gone.detail + soon.detail


def test_doctor_warns_about_users_expiring_within_7_days(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = tmp_path / "relaybox.toml"
    path.write_text(
        f'state_dir = "{state}"\n'
        '[[listen]]\naddress = "127.0.0.1"\nport = 0\nmode = "starttls"\n'
        "[auth]\nargon2 = { time_cost = 1, memory_kib = 1024, parallelism = 1 }\n"
    )

    def relaybox(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(path), *args])

    assert relaybox("domain", "add", "--sandbox", "try.local").exit_code == 0  # no DNS looked up
    for login, expires in (("soon@try.local", "3d"), ("later@try.local", "30d")):
        added = json_of(relaybox("user", "add", login, "--expires", expires, "--json"))
        leaks.add(added["password"])
    cfg = config_mod.load(path)
    now = time.time()
    _create_user(cfg, "gone@try.local", created=now - DAY)
    change = SettingsChange(expires=True, expires_at=now - 60)
    _in_main_db(
        cfg,
        lambda db: users.update_settings(db, "gone@try.local", change, now=now - 3600, actor="t"),
    )

    result = relaybox("doctor", "--json")
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["users expiring"]["status"] == "warn"
    assert "soon@try.local" in checks["users expiring"]["detail"]
    assert "later@try.local" not in checks["users expiring"]["detail"]
    assert checks["users expired"]["status"] == "warn"
    assert "gone@try.local" in checks["users expired"]["detail"]
    text = relaybox("doctor")
    assert "users expiring" in text.stdout and "WARN" in text.stdout

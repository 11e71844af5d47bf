"""Who can read what: the service user, the files it must read, the files others must not.

Used by the doctor's checks and, for the config file's secret, once when `serve` starts. POSIX
permission bits only (ACLs are not consulted).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config


def service_user(cfg: Config) -> pwd.struct_passwd | None:
    """Who the service runs as: the state dir's owner if not root, else a `relaybox` user."""
    try:
        owner = cfg.state_dir.stat().st_uid
        if owner != 0:
            return pwd.getpwuid(owner)
    except (OSError, KeyError):
        pass
    try:
        return pwd.getpwnam("relaybox")
    except KeyError:
        return None


def readable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Every directory on the way, the symlink targets' too (Let's Encrypt's live/ links into
    archive/), must let ``user`` through, and the file must be readable by it."""
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))

    def allowed(p: Path, bit: int) -> bool:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in gids:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    try:
        for candidate in {path.absolute(), path.resolve()}:
            if not all(allowed(d, 1) for d in candidate.parents):
                return False
        return allowed(path.resolve(), 4)
    except OSError:
        return False


def stray_files(state_dir: Path) -> list[Path]:
    """Files in the state dir that its owner (the service) does not own: it may not open them."""
    owner = state_dir.stat().st_uid
    return [p for p in sorted(state_dir.rglob("*")) if p.lstat().st_uid != owner]


@dataclass(frozen=True)
class ConfigSecret:
    """The config file holds the smarthost password; ``exposed`` if others can read it."""

    exposed: bool
    detail: str  # the file, its mode, and (exposed) who can read it and what to do


def config_secret(cfg: Config) -> ConfigSecret | None:
    """Whether the config file holding the smarthost password is readable by everyone, or by a
    group other than the service user's; None when there is no such file or no password.

    0640 with the service's group (the documented ``root:relaybox``) is not exposed: the
    service must be able to read its config.
    """
    if cfg.source.startswith("(") or not cfg.delivery.smarthost.password:
        return None
    try:
        st = Path(cfg.source).stat()
    except OSError:
        return None
    mode = st.st_mode & 0o777
    user = service_user(cfg)
    service_gid = user.pw_gid if user is not None else os.getegid()
    held = f"{cfg.source} holds delivery.smarthost.password"
    if mode & 0o004:
        who = "everyone"
    elif mode & 0o040 and st.st_gid != service_gid:
        who = f"group {_group_name(st.st_gid)}"
    else:
        return ConfigSecret(False, f"{held}, mode {mode:04o}")
    fix = f"chmod 0600, or 0640 with group {_group_name(service_gid)}"
    return ConfigSecret(True, f"{held} and is readable by {who} (mode {mode:04o}): {fix}")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"

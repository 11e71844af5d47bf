"""Group a py-spy raw profile of a relaybox server into stages (bench/README.md, "Where a
message's time goes").

    py-spy record --pid PID --format raw -r 250 --duration 20 -o prof.txt
    python -m bench.profgroups prof.txt

Stacks idle in a thread's queue (aiosqlite's worker, the thread pool's) are left out; every other
stack goes to the first group, in the order below, that one of its frames matches (the mail log
and metrics come early so that a log call is counted as logging wherever it is made). IDLE names
lines of aiosqlite 0.22 and Python 3.11, the lock's versions.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

IDLE = (
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "_worker (concurrent/futures/thread.py:81)",
)
MAIN = ("run_forever", "run_until_complete")

# (name, frames any of which puts a stack in the group, whether the stack must be off the loop)
GROUPS: list[tuple[str, tuple[str, ...], bool]] = [
    ("the aiosqlite threads at work", ("aiosqlite/core.py",), True),
    ("other threads (argon2 pool, to_thread)", ("threading.py",), True),
    ("the RSA-2048 private-key step", ("private_key_step (relay/dkimsign.py",), False),
    ("the rest of Signer.sign", ("sign (relay/dkim.py", "relay/dkimsign.py"), False),
    ("mail log, metrics", ("maillog", "metrics", "logging/", "prometheus"), False),
    ("TLS records", ("ssl.py", "sslproto.py"), False),
    (
        "aiosqlite wake-ups",
        ("call_soon_threadsafe", "_read_from_self", "_write_to_self", "aiosqlite"),
        False,
    ),
    ("the credential recheck at MAIL", ("recheck (relay",), False),
    ("MAIL: policy, limits", ("handle_MAIL",), False),
    ("RCPT: syntax, suppression", ("handle_RCPT",), False),
    (
        "DATA: checks, headers, admission, enqueue",
        ("handle_DATA", "accept (relay/smtp/accept.py"),
        False,
    ),
    ("DATA reading", ("relay/smtp/data.py", "relay/smtp/reader.py", "relay/smtp/spill.py"), False),
    ("delivery: scheduler, outbound sessions", ("relay/delivery/", "aiosmtplib/"), False),
    ("aiosmtpd parsing and replies", ("aiosmtpd/",), False),
    ("relaybox's other code", ("relay/",), False),
    ("asyncio's loop and streams", ("asyncio/",), False),
]


def group_of(stack: Sequence[str]) -> str:
    on_loop = any(m in f for f in stack for m in MAIN)
    for name, needles, off_loop in GROUPS:
        if off_loop and on_loop:
            continue
        if any(n in f for f in stack for n in needles):
            return name
    return "other"


def shares(lines: Sequence[str]) -> tuple[int, Counter[str]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack_text, _, n = line.rstrip("\n").rpartition(" ")
        if not stack_text or not n.isdigit():  # a line torn by --nonblocking sampling
            continue
        stack = stack_text.split(";")
        if stack[-1].startswith(IDLE):
            continue
        total += int(n)
        counts[group_of(stack)] += int(n)
    return total, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", help="py-spy --format raw output")
    args = p.parse_args()
    with open(args.profile, encoding="utf-8", errors="replace") as f:
        total, counts = shares(f.readlines())
    print(f"{total} samples")
    for name in [g[0] for g in GROUPS] + ["other"]:
        print(f"| {100 * counts[name] / max(total, 1):.1f} % | {name} |")


if __name__ == "__main__":
    main()

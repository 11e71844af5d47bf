"""`python -m bench`: the whole benchmark in one command (under 10 minutes on 2 cores).

Starts every target on loopback (aiosmtpd-ceiling, relaybox-accept, relaybox-e2e, relaybox-nocache,
postfix-e2e and postfix-dkim-e2e when bench/setup-peers.sh has run), runs the scenarios
interleaved for --rounds rounds, then the big-message memory run and the 1M-recipient spool scale
run, and prints a table, the ratios and one JSON line. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import harness, report
from bench import postfix as postfix_mod
from bench import relaybox_target as rb_mod
from bench.common import all_procs, log, make_cert, memory, python_cmd, write_file
from bench.dnszone import Zone
from bench.harness import Result, Scenario
from bench.pgstore import start_pg
from bench.targets import REPO, Ceiling, Proc, Sink, Target, port_of

CEILING = "aiosmtpd-ceiling"
UNREACHED_LIMIT = 1_000_000_000  # [limits.user] of the -limits targets: checked, never met
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of load per measurement")
    p.add_argument("-c", "--connections", default="8,32", help="comma-separated concurrencies")
    p.add_argument("--reconnect-connections", type=int, default=8)
    p.add_argument("--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--big", type=int, default=32, help="parallel 10 MiB messages (0: skip)")
    p.add_argument("--no-postfix", action="store_true")
    p.add_argument("--no-relaybox", action="store_true")
    p.add_argument("--no-pg", action="store_true", help="skip the -pg (PostgreSQL store) targets")
    p.add_argument(
        "--targets",
        default="",
        help="comma-separated relaybox targets to run (the ceiling always runs), e.g. "
        "relaybox-e2e,relaybox-e2e-webhook: fewer targets, more rounds in the same time",
    )
    p.add_argument(
        "--base",
        default="",
        help="another checkout (e.g. `git worktree add /tmp/base HEAD~1`): every relaybox target "
        "also runs from it as TARGET@base, in the same rounds; the ratios TARGET / TARGET@base "
        "are an A/B of the two",
    )
    p.add_argument("--no-scale", action="store_true", help="skip the 1M-recipient spool run")
    p.add_argument("--scale-recipients", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, no big/scale runs")
    p.add_argument("--json-out", default="", help="also write the JSON summary to this file")
    p.add_argument(
        "--keep", default="", help="work in this directory and keep it (configs, logs, state)"
    )
    p.add_argument(
        "--relaybox-toml",
        default="",
        help="extra TOML for every relaybox config, e.g. 'workers = 2' (top-level keys) or a "
        "'[section]' (appended)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.big, args.no_scale = 1, 2.0, 0, True
    args.connections = [int(c) for c in str(args.connections).split(",") if c]
    args.targets = sorted({t.strip() for t in str(args.targets).split(",") if t.strip()})
    return args


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


async def run_scale(recipients: int) -> dict[str, Any] | None:
    proc = await asyncio.create_subprocess_exec(
        *python_cmd("bench.spoolscale", "--recipients", str(recipients)),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0 or not out.strip():
        log(f"spoolscale failed ({proc.returncode})")
        return None
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


async def main(args: argparse.Namespace) -> int:
    stops: list[Callable[[], Awaitable[None]]] = []
    info: dict[str, Any] = {"machine": machine(), "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="relaybox-bench-") as tmp:
        work = Path(args.keep or tmp)  # --keep: created by entry()
        try:
            return await _run(args, work, stops, info)
        finally:
            for stop in reversed(stops):
                try:
                    await stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the others
                    log(f"stop failed: {exc!r}")
            if args.keep:
                log(f"kept {work} (relaybox configs, logs and state, OpenDKIM config)")


async def _run(
    args: argparse.Namespace,
    work: Path,
    stops: list[Callable[[], Awaitable[None]]],
    info: dict[str, Any],
) -> int:
    cert, key = make_cert(work / "tls")
    user = "app@bench.test"
    pw = work / "ceiling-password"
    pw.write_text(secrets.token_urlsafe(18))
    zone = Zone()
    zone.start()

    async def stop_zone() -> None:
        zone.stop()

    stops.append(stop_zone)
    sink = await Sink.start()
    stops.append(sink.stop)
    ceiling = await Ceiling.start(cert, key, user, pw)
    stops.append(ceiling.stop)
    targets: dict[str, Target] = {CEILING: ceiling.target}

    why = "--no-relaybox" if args.no_relaybox else rb_mod.available()
    if why is None:
        common = {"cert": cert, "key": key, "zone": zone, "sink_port": sink.port}
        # The -pg targets: the shared store in PostgreSQL (Debian's, a durable cluster of the
        # bench's own on loopback: fsync and synchronous commits on), the spool local (issue 15).
        wants_pg = not args.targets or any(t.endswith("-pg") for t in args.targets)
        pg = None if args.no_pg or not wants_pg else await start_pg(work, stops, info)
        # The -webhook targets post every event to this loopback receiver (answers 204).
        hooks, line = await Proc.start("webhook-receiver", python_cmd("bench.hookreceiver"))
        stops.append(hooks.stop)
        hook_url = f"http://127.0.0.1:{port_of(line)}/hook"
        # relaybox always signs; an Ed25519 key (~0.1 ms) stands in for "without RSA-2048 DKIM".
        # The -limits targets: every [limits.user] limit configured, never reached (issue 14).
        for name, paused, ttl, users, dkim, limit in (
            ("relaybox-accept", True, "5m", 0, "rsa", 0),
            ("relaybox-accept-limits", True, "5m", 0, "rsa", UNREACHED_LIMIT),
            ("relaybox-accept-ed25519", True, "5m", 0, "ed25519", 0),
            ("relaybox-accept-inline", True, "5m", 0, "rsa", 0),
            ("relaybox-e2e", False, "5m", 0, "rsa", 0),
            ("relaybox-e2e-inline", False, "5m", 0, "rsa", 0),
            ("relaybox-e2e-limits", False, "5m", 0, "rsa", UNREACHED_LIMIT),
            ("relaybox-accept-webhook", True, "5m", 0, "rsa", 0),
            ("relaybox-e2e-webhook", False, "5m", 0, "rsa", 0),
            ("relaybox-nocache", True, "0s", args.reconnect_connections, "rsa", 0),
            ("relaybox-accept-pg", True, "5m", 0, "rsa", 0),
            ("relaybox-e2e-pg", False, "5m", 0, "rsa", 0),
        ):
            if name.endswith("-pg") and pg is None:
                continue
            if args.targets and name not in args.targets:
                continue
            for code in (None, Path(args.base)) if args.base else (None,):
                full = name if code is None else f"{name}@base"
                rb = await rb_mod.Relaybox.start(
                    full,
                    work / full,
                    paused=paused,
                    cache_ttl=ttl,
                    users=users,
                    dkim_key_type=dkim,
                    user_limit=limit,
                    webhook_url=hook_url if name.endswith("-webhook") else "",
                    store=pg.store_table(pg.new_database()) if pg and name.endswith("-pg") else "",
                    dkim_signing="inline" if name.endswith("-inline") else "auto",
                    extra=args.relaybox_toml.replace("\\n", "\n"),
                    code=code,
                    **common,
                )
                stops.append(rb.stop)
                targets[full] = rb.target
    else:
        info["skipped"]["relaybox"] = why
        log(f"relaybox targets skipped: {why}")

    why = "--no-postfix" if args.no_postfix else postfix_mod.available()
    if why is None:
        peer = postfix_mod.PostfixPeer(work)
        stops.append(peer.stop)
        for t in await peer.start(sink.port):
            targets[t.name] = t
    else:
        info["skipped"]["postfix"] = why
        log(f"postfix targets skipped: {why}")

    scenarios: list[Scenario] = []
    order = [
        CEILING,
        "relaybox-accept",
        "relaybox-accept-limits",
        "relaybox-accept-ed25519",
        "relaybox-accept-inline",
        "relaybox-e2e",
        "relaybox-e2e-inline",
        "relaybox-e2e-limits",
        "relaybox-accept-webhook",
        "relaybox-e2e-webhook",
        "relaybox-accept-pg",
        "relaybox-e2e-pg",
        "postfix-e2e",
        "postfix-dkim-e2e",
    ]
    order = [m for n in order for m in (n, f"{n}@base")]  # each next to its base (--base)
    for c in args.connections:
        scenarios += [Scenario(targets[n], c, size=args.size) for n in order if n in targets]
    for n in (CEILING, "relaybox-accept", "relaybox-accept@base", "relaybox-nocache"):
        if n in targets and args.reconnect_connections:
            scenarios.append(Scenario(targets[n], args.reconnect_connections, reconnect=True))

    sink_target = Target("sink", sink.port, "", pw, lambda procs: {sink.proc.pid})
    cap = await harness.run_loadgen(sink_target, 8, duration=2.0)
    info["sink_capacity"] = cap["rate"]
    log(f"sink capacity (plain SMTP, no TLS/AUTH, C=8): {cap['rate']:.0f} msgs/s")
    log("warm-up: every target, 1 s at C=8")
    for t in targets.values():
        if t.e2e:
            await sink.reset()
        load = await harness.run_loadgen(t, 8, duration=1.0)
        if t.e2e:
            await harness.drain(sink, load["ok"])  # nothing of it may arrive during a measurement
    results: list[Result] = []
    argon2: list[float] = []
    signs: list[dict[str, float]] = []
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        ordered = scenarios if rnd % 2 == 0 else list(reversed(scenarios))
        for sc in ordered:
            results.append(await harness.measure(sc, rnd, sink, work, args.duration))
        if "relaybox-nocache" in targets:
            argon2.append(await harness.argon2_rate())
        if "relaybox-accept" in targets:
            signs.append(await harness.sign_costs())
    info["rounds_s"] = round(time.monotonic() - t_start, 1)

    procs = all_procs()
    mem = {name: memory(t.selector(procs)) for name, t in targets.items()}
    big = []
    if args.big:
        for name in ("relaybox-accept", CEILING):
            if name in targets:
                t = targets[name]
                big.append(
                    await harness.big_messages(t, t.selector(all_procs()), args.big, 10 * MIB)
                )
    scale = None
    if not args.no_scale and "relaybox-accept" in targets:
        log(f"spool scale run: {args.scale_recipients} recipients")
        scale = await run_scale(args.scale_recipients)

    rows = harness.summarise(results, CEILING)
    ratios: dict[str, Any] = {}
    for c in args.connections:
        for num, den in (
            ("relaybox-e2e", "postfix-dkim-e2e"),
            ("relaybox-e2e", "postfix-e2e"),
            ("relaybox-accept", CEILING),
            ("relaybox-accept-ed25519", CEILING),
            ("relaybox-e2e", CEILING),
            ("relaybox-accept", "relaybox-accept-inline"),
            ("relaybox-e2e", "relaybox-e2e-inline"),
            ("relaybox-accept-limits", "relaybox-accept"),
            ("relaybox-e2e-limits", "relaybox-e2e"),
            ("relaybox-accept-webhook", "relaybox-accept"),
            ("relaybox-e2e-webhook", "relaybox-e2e"),
            ("relaybox-accept-pg", "relaybox-accept"),
            ("relaybox-e2e-pg", "relaybox-e2e"),
        ):
            if num in targets and den in targets:
                ratios[f"{num} / {den} c={c}"] = harness.paired_ratio(results, num, den, c)
    for base in sorted(n for n in targets if n.endswith("@base")):  # --base: the A/B
        new = base.removesuffix("@base")
        modes = [(c, False) for c in args.connections]
        if new == "relaybox-accept" and args.reconnect_connections:
            modes.append((args.reconnect_connections, True))
        for c, rc in modes:
            what = f"c={c}" + (" reconnect" if rc else "")
            ratios[f"{new} / {base} {what}"] = harness.paired_ratio(
                results, new, base, c, reconnect=rc
            )
            ratios[f"{new} / {base} {what} server CPU per message"] = harness.paired_ratio(
                results, new, base, c, reconnect=rc, measure=lambda r: r.ms_per_msg
            )
    for key in sorted(signs[0]) if signs else ():  # measured alone, between the rounds
        ratios[f"DKIM {key} (alone, one core)"] = harness.median([s[key] for s in signs])
    if argon2:
        nocache = [r for r in results if r.scenario.target.name == "relaybox-nocache"]
        rate = harness.median([r.rate for r in nocache])
        a2 = harness.median(argon2)
        ratios["argon2 pool verifies/s (alone, all cores)"] = round(a2, 1)
        ratios["relaybox-nocache reconnect / argon2 pool"] = round(rate / a2, 3)
        # The pool figure has every core to itself; in the run, TLS on both sides shares them.
        # What the cores can do at the measured CPU per login (server + client) is the bound
        # that argon2 leaves once the handshakes are paid.
        per_login = harness.median(
            [(r.ms_per_msg or 0) + (r.load["client_cpu_ms_per_msg"] or 0) for r in nocache]
        )
        if per_login:
            bound = (os.cpu_count() or 1) * 1000 / per_login
            ratios["relaybox-nocache CPU bound logins/s"] = round(bound, 1)
            ratios["relaybox-nocache reconnect / CPU bound"] = round(rate / bound, 3)

    print()
    print(
        f"relaybox bench: {info['machine']['cpus']} CPUs ({info['machine']['cpu']}), "
        f"{args.rounds} rounds x {args.duration:.0f} s, {args.size} B messages, "
        f"STARTTLS + AUTH PLAIN; medians over rounds"
    )
    harness.print_table(rows, {k: v["mib"] for k, v in mem.items()})
    print()
    for k, v in ratios.items():
        print(f"  {k:<48} {v}")
    derived = {"machine": info["machine"], "rows": rows, "ratios": ratios}
    for k, v in report.goal_arithmetic(derived).items():
        print(f"  {k:<48} {v}")
    for b in big:
        print(
            f"  {b['target']}: {b['messages']} parallel x {b['size'] // MIB} MiB -> ok {b['ok']}, "
            f"non-250 {b['rejects'] or b['errors'] or 'none'}, peak RSS {b['peak_rss_mib']} MiB"
        )
    if scale:
        print(f"  spool scale: {json.dumps(scale)}")
    print(f"  sink capacity (plain SMTP, C=8): {info['sink_capacity']:.0f} msgs/s")
    for k, v in info["skipped"].items():
        print(f"  skipped {k}: {v}")
    summary = {
        **info,
        "args": {k: v for k, v in vars(args).items() if k != "json_out"},
        "rows": rows,
        "ratios": ratios,
        "memory": mem,
        "big_messages": big,
        "spool_scale": scale,
    }
    line = json.dumps(summary)
    print("JSON " + line)
    if args.json_out:
        write_file(Path(args.json_out), line + "\n")
    return 0


def entry() -> None:
    args = parse_args()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        log("not root: the postfix targets need root (bench/setup-peers.sh)")
    try:
        sys.exit(asyncio.run(main(args)))
    except KeyboardInterrupt:
        sys.exit(130)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        log(f"bench failed: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    entry()

"""The bench run: start every target, run the scenarios interleaved and repeated, report.

Each round runs every scenario once, in the opposite order from the previous round (A B C, C B A,
...), so the machine's drift hits all targets alike; each round is normalised by the ceiling's
rate in that same round, and the report gives medians over rounds.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, log, peak_rss_kib, python_cmd, reset_peak_rss
from bench.targets import REPO, Sink, Target

DRAIN_STALL_S = 15.0  # e2e: give up waiting for the sink after this long without progress
DRAIN_MAX_S = 120.0


@dataclass(frozen=True)
class Scenario:
    target: Target
    connections: int
    reconnect: bool = False
    size: int = 2048

    @property
    def key(self) -> str:
        mode = "reconnect" if self.reconnect else "persistent"
        return f"{self.target.name} c={self.connections} {mode}"


@dataclass
class Result:
    scenario: Scenario
    round: int
    load: dict[str, Any]
    rate: float  # e2e: received by the sink per second; else 250s per second at the client
    server_cpu_s: float
    sink: dict[str, Any] = field(default_factory=dict)
    loop_cpu_s: float = 0.0  # the serving processes' main threads (bench/common.py, loop_ticks)

    @property
    def ms_per_msg(self) -> float | None:
        ok = self.load["ok"]
        return self.server_cpu_s * 1000 / ok if ok else None

    @property
    def loop_ms_per_msg(self) -> float | None:
        ok = self.load["ok"]
        return self.loop_cpu_s * 1000 / ok if ok else None


async def run_loadgen(
    target: Target,
    connections: int,
    *,
    duration: float,
    reconnect: bool = False,
    size: int = 2048,
    messages: int = 0,
    acked: Path | None = None,
    run_id: str = "",
) -> dict[str, Any]:
    """bench/loadgen.py in its own process (its CPU is then not the target's, and is reported)."""
    if target.credentials is not None:
        login = ["--credentials", str(target.credentials)]
    elif target.user:
        login = ["--user", target.user, "--password-file", str(target.password_file)]
    else:
        login = ["--no-tls"]  # the sink: plain SMTP, no AUTH
    args = [
        "--port",
        str(target.port),
        *login,
        "-c",
        str(connections),
        "-s",
        str(size),
    ]
    args += ["-m", str(messages)] if messages else ["-d", str(duration)]
    if reconnect:
        args.append("--reconnect")
    if acked is not None:
        args += ["--acked-file", str(acked)]
    if run_id:
        args += ["--run-id", run_id]
    proc = await asyncio.create_subprocess_exec(
        *python_cmd("bench.loadgen", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), duration + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


async def drain(sink: Sink, expected: int) -> dict[str, Any]:
    """Wait until the sink has `expected` messages (bounded: stalls and a hard cap)."""
    loop = asyncio.get_running_loop()
    start = last_progress = loop.time()
    seen = -1
    while True:
        st = await sink.stats()
        now = loop.time()
        if st["received"] >= expected:
            return st
        if st["received"] != seen:
            seen, last_progress = st["received"], now
        if now - last_progress > DRAIN_STALL_S or now - start > DRAIN_MAX_S:
            log(f"sink stalled at {st['received']}/{expected}")
            return st
        await asyncio.sleep(0.05)  # sleep-ok: polling the sink's counter


async def measure(sc: Scenario, rnd: int, sink: Sink, workdir: Path, duration: float) -> Result:
    t = sc.target
    meter = CpuMeter(t.selector)
    acked_path = workdir / "acked.txt"
    if t.e2e:
        await sink.reset()
    meter.start()
    run_id = f"r{rnd}-{t.name}-c{sc.connections}{'-re' if sc.reconnect else ''}"
    load = await run_loadgen(
        t,
        sc.connections,
        duration=duration,
        reconnect=sc.reconnect,
        size=sc.size,
        acked=acked_path if t.e2e else None,
        run_id=run_id,
    )
    rate = float(load["rate"])
    sink_info: dict[str, Any] = {}
    if t.e2e:
        st = await drain(sink, load["ok"])
        window = st["last"] - load["start_monotonic"]
        rate = st["received"] / window if st["received"] and window > 0 else 0.0
        received = set(await sink.dump(workdir / "received.txt"))
        acked_lines = [line.split() for line in acked_path.read_text().splitlines() if line]
        acked = {parts[0] for parts in acked_lines}
        lost = [parts for parts in acked_lines if parts[0] not in received]
        sink_info = {
            "received": st["received"],
            "lost": len(lost),
            "duplicated": st["duplicates"],
            "unexpected": len(received - acked),
            "drain_s": round(st["last"] - load["end_monotonic"], 3) if st["received"] else None,
        }
    cpu = meter.stop()
    if sink_info.get("lost"):
        sink_info["lost_detail"] = await explain_lost(t, lost)
    res = Result(sc, rnd, load, rate, cpu, sink_info, meter.loop_s)
    extra = ""
    if sink_info:
        extra = f" sink lost={sink_info['lost']} dup={sink_info['duplicated']}"
    log(
        f"round {rnd} {sc.key}: {rate:.0f} msgs/s p99 {load['p99_ms']}ms "
        f"cpu {res.ms_per_msg or 0:.2f} ms/msg{extra}"
        + (f" rejects={load['rejects']}" if load["rejects"] else "")
        + (f" errors={load['errors']}" if load["errors"] else "")
    )
    return res


async def explain_lost(target: Target, lost: list[list[str]], limit: int = 5) -> list[Any]:
    """Message-ID, queue id and the target's own account of (up to `limit`) lost messages."""
    out: list[Any] = []
    for parts in lost[:limit]:
        msgid, qid = parts[0], parts[1] if len(parts) > 1 else "-"
        detail: Any = None
        if target.inspect is not None and qid != "-":
            try:
                detail = await target.inspect(qid)
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                detail = f"inspect failed: {exc}"
        log(f"{target.name}: acknowledged, never received: {msgid} queued as {qid}: {detail}")
        out.append({"message_id": msgid, "queue_id": qid, "target_says": detail})
    return out


async def argon2_rate() -> float:
    proc = await asyncio.create_subprocess_exec(
        *python_cmd("bench.argon2rate", "--seconds", "2"),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return float(json.loads(out.splitlines()[-1])["rate"])


async def sign_costs() -> dict[str, float]:
    """bench/signrate.py in its own process: a DKIM signature's CPU, alone on one core."""
    proc = await asyncio.create_subprocess_exec(
        *python_cmd("bench.signrate", "--seconds", "1"),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


async def big_messages(target: Target, pids: set[int], count: int, size: int) -> dict[str, Any]:
    """`count` connections each sending one message of `size` bytes at once: the target's peak
    RSS (VmHWM reset first, so it is this run's own peak)."""
    reset_peak_rss(pids)
    before = peak_rss_kib(pids)
    load = await run_loadgen(target, count, duration=0, messages=1, size=size)
    after = peak_rss_kib(pids)
    log(
        f"{target.name}: {count} x {size // 2**20} MiB: ok={load['ok']} rejects={load['rejects']} "
        f"peak RSS {after // 1024} MiB"
    )
    return {
        "target": target.name,
        "messages": count,
        "size": size,
        "ok": load["ok"],
        "rejects": load["rejects"],
        "errors": load["errors"],
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(after / 1024, 1),
        "elapsed_s": load["elapsed_s"],
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(results: list[Result], ceiling_name: str) -> list[dict[str, Any]]:
    """One row per scenario: medians over rounds, and the per-round ratio to the ceiling."""
    by_key: dict[str, list[Result]] = {}
    for r in results:
        by_key.setdefault(r.scenario.key, []).append(r)
    ceiling = {
        (r.round, r.scenario.connections, r.scenario.reconnect): r.rate
        for r in results
        if r.scenario.target.name == ceiling_name
    }
    rows = []
    for key, rs in by_key.items():
        sc = rs[0].scenario
        ratios = []
        for r in rs:
            c = ceiling.get((r.round, sc.connections, sc.reconnect))
            if c:
                ratios.append(r.rate / c)
        cpu = [r.ms_per_msg for r in rs if r.ms_per_msg is not None]
        loop = [r.loop_ms_per_msg for r in rs if r.loop_ms_per_msg]
        client = [r.load["client_cpu_ms_per_msg"] for r in rs if r.load["client_cpu_ms_per_msg"]]
        rejects: dict[str, int] = {}
        for r in rs:
            for k, v in {**r.load["rejects"], **r.load["errors"]}.items():
                rejects[k] = rejects.get(k, 0) + v
        row: dict[str, Any] = {
            "scenario": key,
            "target": sc.target.name,
            "connections": sc.connections,
            "reconnect": sc.reconnect,
            "rounds": len(rs),
            "rate": round(median([r.rate for r in rs]), 1),
            "rates": [round(r.rate, 1) for r in rs],
            "accept_rate": round(median([r.load["rate"] for r in rs]), 1),
            "p50_ms": round(median([r.load["p50_ms"] for r in rs]), 2),
            "p95_ms": round(median([r.load["p95_ms"] for r in rs]), 2),
            "p99_ms": round(median([r.load["p99_ms"] for r in rs]), 2),
            "server_cpu_ms_per_msg": round(median(cpu), 3) if cpu else None,
            "loop_cpu_ms_per_msg": round(median(loop), 3) if loop else None,
            "client_cpu_ms_per_msg": round(median(client), 3) if client else None,
            "x_ceiling": round(median(ratios), 3) if ratios else None,
            "non_250": rejects,
        }
        if sc.target.e2e:
            row["lost"] = sum(r.sink.get("lost", 0) for r in rs)
            row["duplicated"] = sum(r.sink.get("duplicated", 0) for r in rs)
            row["unexpected"] = sum(r.sink.get("unexpected", 0) for r in rs)
        rows.append(row)
    return rows


def paired_ratio(
    results: list[Result],
    num: str,
    den: str,
    connections: int,
    *,
    reconnect: bool = False,
    measure: Callable[[Result], float | None] = lambda r: r.rate,
) -> float | None:
    """Median over rounds of num/den (the rate, or ``measure``), each round's pair measured
    minutes apart at most."""
    value: dict[tuple[str, int], float | None] = {}
    for r in results:
        sc = r.scenario
        if sc.connections == connections and sc.reconnect == reconnect:
            value[(sc.target.name, r.round)] = measure(r)
    ratios = []
    for (name, rnd), v in value.items():
        d = value.get((den, rnd))
        if name == num and v is not None and d:
            ratios.append(v / d)
    return round(median(ratios), 3) if ratios else None


def print_table(rows: list[dict[str, Any]], rss: dict[str, float]) -> None:
    head = (
        f"{'target':<24} {'C':>3} {'mode':<10} {'msgs/s':>8} {'accept/s':>8} {'x ceil':>7} "
        f"{'p50':>7} {'p95':>7} "
        f"{'p99':>7} {'srv ms/msg':>10} {'loop ms':>8} {'cli ms/msg':>10} {'mem MiB':>8}  notes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        notes = []
        if "lost" in r:
            notes.append(f"lost={r['lost']} dup={r['duplicated']}")
        if r["non_250"]:
            notes.append(" ".join(f"{k}:{v}" for k, v in sorted(r["non_250"].items())))
        x = f"{r['x_ceiling']:.2f}" if r["x_ceiling"] is not None else "-"
        srv = r["server_cpu_ms_per_msg"]
        loop = r.get("loop_cpu_ms_per_msg")
        cli = r["client_cpu_ms_per_msg"]
        print(
            f"{r['target']:<24} {r['connections']:>3} "
            f"{'reconnect' if r['reconnect'] else 'persistent':<10} {r['rate']:>8.0f} "
            f"{r['accept_rate']:>8.0f} {x:>7} "
            f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{srv if srv is not None else '-':>10} {loop if loop is not None else '-':>8} "
            f"{cli if cli is not None else '-':>10} "
            f"{rss.get(r['target'], 0):>8.0f}  {'; '.join(notes)}"
        )
    sys.stdout.flush()

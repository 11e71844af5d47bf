"""Render a run's JSON summary (python -m bench --json-out FILE) as Markdown for the README.

python -m bench.report FILE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _num(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


CEILING = "aiosmtpd-ceiling"
GOAL = 0.6  # issue 17: relaybox-accept >= 0.6 x the ceiling's rate
RSA = "DKIM sign_rsa_ms (alone, one core)"


def goal_arithmetic(s: dict[str, Any]) -> dict[str, float]:
    """What this run's cores allow, from its own medians (no new measurement): a target's CPU
    per message (server + load generator) bounds its rate at ``cpus x 1000 / that`` with every
    core busy, which no target here reaches (the sink, the bench and the box's other work share
    them); and the server CPU per message that ``GOAL`` x the ceiling's rate leaves, before and
    after the RSA signature this run measured alone."""
    cpus = int(s["machine"]["cpus"])
    rows = {(r["target"], r["connections"]): r for r in s["rows"] if not r["reconnect"]}
    sign = s["ratios"].get(RSA)
    out: dict[str, float] = {}
    for c in sorted({c for _, c in rows}):
        ceiling = rows.get((CEILING, c))
        if ceiling is None or not ceiling["rate"]:
            continue
        for target in (CEILING, "relaybox-accept", "relaybox-accept-ed25519"):
            r = rows.get((target, c))
            if r is None or not r["server_cpu_ms_per_msg"] or not r["client_cpu_ms_per_msg"]:
                continue
            per_msg = r["server_cpu_ms_per_msg"] + r["client_cpu_ms_per_msg"]
            out[f"{target} cores busy c={c}"] = round(r["rate"] * per_msg / 1000, 2)
            if target != CEILING:
                bound = cpus * 1000 / per_msg
                out[f"{target} CPU bound / ceiling c={c}"] = round(bound / ceiling["rate"], 3)
        accept = rows.get(("relaybox-accept", c))
        if accept is not None and accept["client_cpu_ms_per_msg"]:
            budget = cpus * 1000 / (GOAL * ceiling["rate"]) - accept["client_cpu_ms_per_msg"]
            key = f"relaybox-accept server CPU ms/msg that {GOAL}x the ceiling leaves c={c}"
            out[key] = round(budget, 2)
            if sign:
                out[f"the same less the RSA signature and the ceiling's own c={c}"] = round(
                    budget - sign - ceiling["server_cpu_ms_per_msg"], 2
                )
    return out


def render(s: dict[str, Any]) -> str:
    m = s["machine"]
    a = s["args"]
    out = [
        f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, {m['date']}; load average at start "
        f"{m['loadavg_at_start'][0]}. {a['rounds']} interleaved rounds x {a['duration']:.0f} s, "
        f"{a['size']} B messages, STARTTLS + AUTH PLAIN; medians over rounds.",
        "",
        "| target | C | mode | msgs/s | x ceiling | p50 ms | p95 ms | p99 ms | server CPU ms/msg "
        "| main thread ms/msg | client CPU ms/msg | memory MiB | notes |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in s["rows"]:
        mem = s["memory"].get(r["target"], {})
        notes = []
        if "lost" in r:
            notes.append(
                f"accepted {r['accept_rate']:.0f}/s; lost {r['lost']}, dup {r['duplicated']}"
            )
        if r["non_250"]:
            notes.append(", ".join(f"{k}: {v}" for k, v in sorted(r["non_250"].items())))
        mode = "reconnect" if r["reconnect"] else "persistent"
        kind = "" if mem.get("kind") == "peak RSS" else " (PSS)"
        out.append(
            f"| {r['target']} | {r['connections']} | {mode} | {r['rate']:.0f} "
            f"| {_num(r['x_ceiling'], '{:.2f}')} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {_num(r['server_cpu_ms_per_msg'], '{:.2f}')} "
            f"| {_num(r.get('loop_cpu_ms_per_msg'), '{:.2f}')} "
            f"| {_num(r['client_cpu_ms_per_msg'], '{:.2f}')} | {_num(mem.get('mib'))}{kind} "
            f"| {'; '.join(notes)} |"
        )
    out += ["", "| ratio (median of per-round ratios) | value |", "| --- | ---: |"]
    out += [f"| {k} | {v} |" for k, v in s["ratios"].items()]
    goals = goal_arithmetic(s)
    if goals:
        out += ["", f"| what {s['machine']['cpus']} cores allow (from the medians above) | value |"]
        out += ["| --- | ---: |"] + [f"| {k} | {v} |" for k, v in goals.items()]
    if s.get("big_messages"):
        out.append("")
    for b in s.get("big_messages") or []:
        out.append(
            f"- {b['target']}: {b['messages']} parallel {b['size'] // 2**20} MiB messages: "
            f"{b['ok']} accepted, non-250 {b['rejects'] or b['errors'] or 'none'}, "
            f"peak RSS {b['peak_rss_mib']} MiB."
        )
    sc = s.get("spool_scale")
    if sc:
        st, bk = sc["start"], sc["at_backlog"]
        out += [
            "",
            f"Spool with {sc['queued_recipients_after']:,} queued recipients "
            f"(filled at {sc['fill']['rcpts_per_s']:,.0f} recipients/s, "
            f"{sc['spool_file_mib']} MiB):",
            "",
            "| spool | empty | at 1M | ratio |",
            "| --- | ---: | ---: | ---: |",
            f"| enqueue msgs/s (1 rcpt, 2 KB, 32 submitters) | {st['enqueue_msgs_per_s']:,.0f} "
            f"| {bk['enqueue_msgs_per_s']:,.0f} | {sc['enqueue_ratio']} |",
            f"| claim_due(100) recipients/s | {st['claim_rcpts_per_s']:,.0f} "
            f"| {bk['claim_rcpts_per_s']:,.0f} | {sc['claim_ratio']} |",
            f"| record outcome recipients/s | {st['record_rcpts_per_s']:,.0f} "
            f"| {bk['record_rcpts_per_s']:,.0f} | {sc.get('record_ratio')} |",
            f"| next_due() ms | {st['next_due_ms']} | {bk['next_due_ms']} | |",
        ]
    if s.get("sink_capacity"):
        out += ["", f"Sink capacity (plain SMTP, C=8): {s['sink_capacity']:.0f} msgs/s."]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report")
    p.add_argument("file")
    print(render(json.loads(Path(p.parse_args().file).read_text())), end="")


if __name__ == "__main__":
    main()

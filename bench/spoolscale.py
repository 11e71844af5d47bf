"""Spool scale run: enqueue and claim-due rates on an empty spool and with 1,000,000 queued
recipients, through relay.spool's own API (group commit, synchronous=FULL, WAL), so a missing
index or a full scan shows as a rate that falls with the backlog.

    python -m bench.spoolscale [--recipients 1000000] [--sample 4000]      # one JSON line

Phases, each timed:
  1. start: enqueue `sample` messages (1 recipient, 2 KB, 32 concurrent submitters: the shape of
     SMTP acceptance), then claim them back with claim_due(100) until none is due.
  2. fill: synthetic backlog up to `recipients` queued recipients (10 per message, 200-byte
     bodies, 256 concurrent submitters so group commit writes big batches).
  3. at 1M: the same enqueue and claim-due sample as phase 1, on top of the backlog, plus
     next_due() latency and the hot queries' plans (EXPLAIN QUERY PLAN: index, not SCAN).
Claims take the oldest due recipients first, so the claim sample at 1M claims backlog rows:
the rate is what a deliverer sees with a million recipients waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.store.spool import DueRecipient, Outcome, Spool

CLAIM_LIMIT = 100


async def enqueue_many(
    spool: Spool, messages: int, recipients: int, body: bytes, concurrency: int, tag: str
) -> float:
    """Enqueue `messages` messages of `recipients` recipients; returns seconds taken."""
    rcpts = tuple(f"r{i}@dest{i % 50}.example" for i in range(recipients))
    counter = iter(range(messages))

    async def submitter() -> None:
        for _ in counter:  # shared iterator: each message taken by exactly one submitter
            await spool.enqueue(
                sender=f"{tag}@bench.test", recipients=rcpts, body=body, user="app@bench.test"
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def claim_n(spool: Spool, wanted: int) -> tuple[list[DueRecipient], float, list[float]]:
    """claim_due(CLAIM_LIMIT) until `wanted` recipients are claimed or none is due."""
    got: list[DueRecipient] = []
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(wanted // CLAIM_LIMIT + 10):  # bounded: each call claims up to the limit
        if len(got) >= wanted:
            break
        t = time.perf_counter()
        batch = await spool.claim_due(CLAIM_LIMIT)
        lat.append(time.perf_counter() - t)
        if not batch:
            break
        got += batch
    return got, time.perf_counter() - t0, lat


async def record_delivered(spool: Spool, claimed: list[DueRecipient]) -> float:
    """Record every claimed recipient delivered, CLAIM_LIMIT per call (a deliverer's batches)."""
    t0 = time.perf_counter()
    for i in range(0, len(claimed), CLAIM_LIMIT):
        await spool.record(
            Outcome(d.message_id, d.idx, "delivered", 250, "2.0.0 OK", "sink")
            for d in claimed[i : i + CLAIM_LIMIT]
        )
    return time.perf_counter() - t0


def ms(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


async def sample(spool: Spool, n: int, label: str, fodder: bool) -> dict[str, Any]:
    """Enqueue n SMTP-shaped messages (timed); claim n recipients and record them delivered
    (timed). Claims take the oldest due rows: at the start, `fodder` first queues n recipients in
    messages shaped like the backlog's (10 recipients), so both samples claim the same shape."""
    if fodder:
        await enqueue_many(spool, max(1, n // 10), 10, b"y" * 200, 32, "fodder")
    enq_s = await enqueue_many(spool, n, 1, b"x" * 2048, 32, label)
    claimed, claim_s, lat = await claim_n(spool, n)
    record_s = await record_delivered(spool, claimed)
    t = time.perf_counter()
    await spool.next_due()
    next_due_ms = (time.perf_counter() - t) * 1000
    return {
        "enqueue_msgs_per_s": round(n / enq_s, 1),
        "claimed": len(claimed),
        "claim_rcpts_per_s": round(len(claimed) / claim_s, 1) if claim_s else 0.0,
        "record_rcpts_per_s": round(len(claimed) / record_s, 1) if record_s else 0.0,
        "claim_call_p50_ms": ms(lat, 0.5),
        "claim_call_p99_ms": ms(lat, 0.99),
        "next_due_ms": round(next_due_ms, 2),
    }


def spool_size_mib(state_dir: Path) -> float:
    return sum(p.stat().st_size for p in state_dir.glob("spool-*")) / 2**20


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="relaybox-spoolscale-") as tmp:
        cfg = Config(state_dir=Path(tmp))
        spool = await Spool.open(cfg)
        try:
            start = await sample(spool, args.sample, "start", fodder=True)
            per_msg = 10
            fill_msgs = max(0, args.recipients // per_msg)
            batches0, ops0 = spool.batches, spool.batched_ops
            fill_s = await enqueue_many(spool, fill_msgs, per_msg, b"y" * 200, 256, "fill")
            batches = spool.batches - batches0
            fill = {
                "recipients": fill_msgs * per_msg,
                "seconds": round(fill_s, 1),
                "rcpts_per_s": round(fill_msgs * per_msg / fill_s, 1) if fill_s else 0.0,
                "avg_batch": round((spool.batched_ops - ops0) / batches, 1) if batches else 0.0,
            }
            print(f"filled {fill}", file=sys.stderr, flush=True)
            at_1m = await sample(spool, args.sample, "at1m", fodder=False)
            stats = await spool.stats()
            plans = await spool.query_plans()
        finally:
            await spool.close()
        db_mib = spool_size_mib(Path(tmp))
    return {
        "start": start,
        "fill": fill,
        "at_backlog": at_1m,
        "queued_recipients_after": stats.recipients.get("queued", 0),
        "enqueue_ratio": round(at_1m["enqueue_msgs_per_s"] / start["enqueue_msgs_per_s"], 3),
        "claim_ratio": round(at_1m["claim_rcpts_per_s"] / start["claim_rcpts_per_s"], 3),
        "record_ratio": round(at_1m["record_rcpts_per_s"] / start["record_rcpts_per_s"], 3),
        "query_plans": plans,
        "spool_file_mib": round(db_mib, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.spoolscale")
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--sample", type=int, default=4000)
    result = asyncio.run(run(p.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

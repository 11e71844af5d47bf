"""How many argon2 verifications per second relaybox's own pool (relay.passwords.Hasher, default
[auth] parameters, one thread per core) completes on this box: the bound on fresh-connection AUTH
without the auth cache.

    python -m bench.argon2rate --seconds 2     # prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from relay.config_sections import AuthConfig
from relay.store.passwords import Hasher


async def measure(seconds: float) -> dict[str, float]:
    hasher = Hasher(AuthConfig())
    try:
        password = "bench-password-0123456789"
        stored = await hasher.hash(password)
        done = 0
        deadline = time.monotonic() + seconds

        async def lane() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                if not await hasher.verify(stored, password):
                    raise RuntimeError("argon2 verify failed")
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(hasher.workers)))
        elapsed = time.monotonic() - t0
        return {"verifies": done, "threads": hasher.workers, "rate": round(done / elapsed, 1)}
    finally:
        hasher.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.argon2rate")
    p.add_argument("--seconds", type=float, default=2.0)
    print(json.dumps(asyncio.run(measure(p.parse_args().seconds))))


if __name__ == "__main__":
    main()

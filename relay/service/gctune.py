"""The garbage collector of a serving worker: set once, when it starts serving.

Measured on a worker under fresh-connection load (bench/README.md, "Kept after that (2026-12-03,
fourth session)"): with Python's defaults the collector took ~5 % of the worker's CPU, and each
full collection walked every object the process had, ~50 ms with the loop stopped, which is what
a p99 then shows. Sessions make reference cycles (protocol, transport, SSL objects), so the
collector cannot be turned off; two settings:

- ``gc.freeze()`` once serving: what startup made (modules, config, the stores' objects, the
  listeners) leaves the collector's generations, so a full collection no longer walks it.
  Frozen objects are still freed when their last reference goes; only a cycle among them would
  stay (there is garbage to collect first, so none is frozen).
- The youngest generation collected every ``YOUNG`` allocations net instead of 700: a
  collection walks the young objects still alive (the sessions in flight), so fewer of them cost
  less in all; cyclic garbage waits a little longer (a few MiB more at most, measured).
"""

from __future__ import annotations

import gc

YOUNG = 10_000


def settle() -> None:
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)

"""relay/delivery/budget.py: large bodies in flight wait for room, in the order they asked.

The deliverer's use of it is shown against a real sink in tests/test_delivery.py; here the order:
a large body waiting at the head is not passed by a smaller one that asked after it, a waiter that
gives up (its job cancelled) lets the next one in, and small bodies never wait.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from relay.delivery.budget import FACTOR, LARGE, BodyBudget


async def hold(
    budget: BodyBudget, size: int, order: list[str], name: str, go: asyncio.Event
) -> None:
    async with budget.held(size):
        order.append(name)
        await go.wait()


async def turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)  # sleep-ok: let the other tasks run up to their next wait


async def test_room_is_granted_first_come_first_served() -> None:
    budget = BodyBudget(10 * FACTOR * LARGE // 3)  # room for 10/3 bodies of LARGE
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcd"}
    a = asyncio.create_task(hold(budget, 2 * LARGE, order, "a", release["a"]))
    await turns()
    b = asyncio.create_task(hold(budget, 2 * LARGE, order, "b", release["b"]))  # no room: waits
    await turns()
    c = asyncio.create_task(hold(budget, LARGE, order, "c", release["c"]))  # would fit: after b
    small = asyncio.create_task(hold(budget, LARGE - 1, order, "small", release["d"]))
    await turns()
    assert order == ["a", "small"]
    assert budget.used == FACTOR * 2 * LARGE
    release["a"].set()
    await turns()
    assert order == ["a", "small", "b", "c"]
    assert budget.used == FACTOR * 3 * LARGE <= budget.total
    for event in release.values():
        event.set()
    await asyncio.gather(a, b, c, small)
    assert budget.used == 0 and budget.peak == FACTOR * 3 * LARGE


async def test_a_waiter_that_gives_up_lets_the_next_one_in() -> None:
    budget = BodyBudget(FACTOR * 2 * LARGE)
    order: list[str] = []
    go = asyncio.Event()
    a = asyncio.create_task(hold(budget, 2 * LARGE, order, "a", go))
    await turns()
    b = asyncio.create_task(hold(budget, 2 * LARGE, order, "b", go))
    c = asyncio.create_task(hold(budget, LARGE, order, "c", go))
    await turns()
    b.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await b
    assert order == ["a"]  # c still waits: a holds all of it
    go.set()
    await asyncio.gather(a, c)
    assert order == ["a", "c"] and budget.used == 0


@pytest.mark.parametrize("size", [100 * LARGE, 10 * LARGE])
async def test_a_body_larger_than_the_budget_goes_alone(size: int) -> None:
    budget = BodyBudget(FACTOR * 4 * LARGE)
    assert budget.charge(size) == budget.total
    async with budget.held(size):
        assert budget.used == budget.total
    assert budget.used == 0

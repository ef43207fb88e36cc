"""Interleaved timing shared by the benchmarks that compare ``agent.ask`` with a raw SDK call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable


async def medians_ms(calls: dict[str, Callable[[], Awaitable[object]]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls taking turns in every round (so a load spike on the
    machine falls on all of them, not on one)."""
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in timings.items()}

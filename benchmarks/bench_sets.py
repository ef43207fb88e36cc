"""Image sets: many prompts under a rate limit, and batch jobs of 1,000 prompts (issue 14 targets).

The emulator runs in its own process (``python -m nbimagine.emulator --rate-limit ... --batch-time
...``), as a provider does: its request handling and drawing never compete with the client for the
client's interpreter.

1. 100 prompts against an emulator limited to 60 requests/minute (evenly spaced, no burst) with 1 s
   latency: ``generate_many`` with the limit unknown, on OpenAI (learnt from the first answer's
   ``x-ratelimit-*`` headers) and on Gemini (which states it only in a 429), against the
   limit's minimum (the 100th request cannot start before 99 intervals, and takes one latency:
   100 s) and against a baseline measured in the same run: a plain loop of raw ``openai`` SDK calls
   fired exactly on the limit's schedule at an emulator with the same latency and no limit (what
   this machine makes of the minimum: its scheduling delays, nothing rejected). Also: requests
   rejected, rejected again on their retry (target 0), results lost (target 0). ``--quick`` scales it
   10x down (600/min, 0.1 s latency: minimum 10 s).
2. ``submit_batch`` of 1,000 prompts: client time until the job id is known (target <= 2 s).
3. Collecting those 1,000 results into the history (target <= 30 s), then collecting again
   (exactly once: nothing added).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

PROMPT = "product {i}, studio shot"


@contextlib.contextmanager
def emulator_process(*flags: str) -> Iterator[str]:
    """``python -m nbimagine.emulator --port 0 FLAGS`` in its own process; yields its URL."""
    process = subprocess.Popen([sys.executable, "-m", "nbimagine.emulator", "--port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def rate_stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        return json.load(answer)["rate_stats"]


def _use(url: str) -> None:
    from urllib.parse import urlsplit

    from nbimagine._session import get_session, set_emulator
    from nbimagine.emulator import Emulator

    parts = urlsplit(url)
    set_emulator(Emulator(parts.hostname or "127.0.0.1", parts.port or 80))
    get_session().use("openai", emulator=True, size="128x128")


async def _raw_paced(base_url: str, count: int, interval: float) -> tuple[float, int]:
    """Raw SDK calls fired at t0 + k * interval; returns (wall time, 429s seen: none without a limit)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    limited = 0

    async def seen(response: Any) -> None:
        nonlocal limited
        limited += response.status_code == 429

    client = AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0,
                         http_client=DefaultAsyncHttpxClient(event_hooks={"response": [seen]}))
    tool = {"type": "image_generation", "size": "128x128"}

    async def one(i: int) -> None:
        await client.responses.create(model="gpt-5", input=PROMPT.format(i=i), tools=[tool],  # type: ignore[list-item]
                                      tool_choice="image_generation")

    await one(-1)  # warm-up (imports, connection), before the limit counts
    await asyncio.sleep(interval)
    limited = 0
    start = loop_start = asyncio.get_running_loop().time()
    tasks = []
    for i in range(count):
        delay = loop_start + i * interval - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    wall = asyncio.get_running_loop().time() - start
    await client.close()
    return wall, limited


def rate_limited(quick: bool) -> None:
    from nbimagine._history import History
    from nbimagine._many import ManyRun, prepare_agent, run_with_progress
    from nbimagine._session import get_session

    per_minute, latency, count = (600, 0.1, 100) if quick else (60, 1.0, 100)
    interval = 60 / per_minute
    minimum = (count - 1) * interval + latency
    flags = ("--rate-limit", f"{per_minute}", "--latency", f"{latency}")
    scale = "scaled 10x down (--quick)" if quick else "the issue's figures"
    print(f"{count} prompts at {per_minute} requests/min, {latency:g} s latency ({scale}); "
          f"the limit's minimum is {minimum:.1f} s")

    with emulator_process("--latency", f"{latency}") as url:
        wall_raw, _ = asyncio.run(_raw_paced(f"{url}/v1", count, interval))
    print(f"  baseline, raw SDK calls fired on the limit's schedule (no limit enforced): {wall_raw:.1f} s = "
          f"{wall_raw / minimum:.3f}x the minimum")

    for provider, how in (("openai", "the first answer's x-ratelimit-* headers"), ("gemini", "the first 429s")):
        with emulator_process(*flags) as url, tempfile.TemporaryDirectory() as root:
            _use(url)
            history = History(root, "bench")
            options = {"provider": provider}
            agent, params = prepare_agent(None, (), options, get_session())
            run = ManyRun([PROMPT.format(i=i) for i in range(count)], agent=agent, params=params, n=1,
                          overrides=options, record=True, history=history, concurrency=8, rate_limit=None)
            start = time.perf_counter()
            result = run_with_progress(run, progress=False)
            wall = time.perf_counter() - start
            stats = rate_stats(url)
            lost = count - len(result.ok)
        limiter = run.limiter
        print(f"  generate_many on {provider}, concurrency 8, the limit learnt from {how}: {wall:.1f} s = "
              f"{wall / minimum:.3f}x the minimum (target <= 1.10x), {wall / wall_raw:.3f}x the baseline")
        print(f"    rejected: {stats['rejected']} (client saw {limiter.rejected}), rejected again: "
              f"{stats['rejected_again']} (client saw {limiter.rejected_again}; target 0), lost: {lost} "
              f"(target 0), recorded: {len(history)}; spacing learnt: {limiter.interval + limiter.margin:.3f} s")


def batch_of_1000() -> None:
    import nbimagine
    from nbimagine._history import History

    with emulator_process("--batch-time", "1") as url, tempfile.TemporaryDirectory() as root:
        _use(url)
        history = History(root, "bench")
        nbimagine.submit_batch(["warm-up"], history=history).wait(progress=False)  # SDK imports
        prompts = [f"catalogue item {i}" for i in range(1000)]
        start = time.perf_counter()
        job = nbimagine.submit_batch(prompts, history=history)
        submit = time.perf_counter() - start
        print(f"submit_batch of 1,000 prompts: job id {job.id} after {submit:.2f} s (target <= 2 s)")
        status = job.status()
        while not status.done:  # the emulator draws the 1,000 images meanwhile
            time.sleep(0.5)
            status = job.status()
        before = len(history)
        start = time.perf_counter()
        result = job.results(status)
        collect = time.perf_counter() - start
        print(f"collecting 1,000 results into the history: {collect:.1f} s (target <= 30 s); "
              f"{len(result.ok)} ok, {len(history) - before} images recorded")
        before = len(history)
        start = time.perf_counter()
        again = job.results(status)
        second = time.perf_counter() - start
        print(f"collecting again: {second:.1f} s, {len(history) - before} added (exactly once: 0), "
              f"same ids: {[e.id for e in again.entries] == [e.id for e in result.entries]}")


def main() -> None:
    quick = "--quick" in sys.argv or os.environ.get("NBIMAGINE_BENCH_QUICK") == "1"
    rate_limited(quick)
    batch_of_1000()


if __name__ == "__main__":
    main()

"""Background responses: what polling costs the server, and how late the result arrives.

Three 6 s background jobs run at once against the emulator with the default ``poll_interval`` (1 s).
Measured per job: status requests per second once the backoff has ramped up (target <= 1), and the
delay between the job's end on the server and the reply in hand (target <= one poll interval).
Baseline in the same run: a hand-written loop polling every 0.1 s, as is common in samples.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from nbimagine import Agent
from nbimagine.config import OpenAIResponsesConfig
from nbimagine.emulator import Emulator
from nbimagine.tools import ImageGenerationTool

DURATION = 6.0
JOBS = 3
KEY = "sk-bench"


async def _ours(emu: Emulator, index: int) -> dict[str, float]:
    config = OpenAIResponsesConfig("gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, background=True)
    agent = Agent("bench", config=config, tools=[ImageGenerationTool(size="256x256")])
    reply = await agent.ask(f"A lighthouse, background benchmark {index}")
    arrived = time.monotonic()
    return _figures(emu, reply.response_id, arrived)


async def _naive(emu: Emulator, index: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=KEY, base_url=emu.openai_base_url, max_retries=0)
    response = await client.responses.create(model="gpt-4.1", input=f"A lighthouse, naive loop {index}",
                                             tools=[{"type": "image_generation", "size": "256x256"}],
                                             background=True)
    while response.status in ("queued", "in_progress"):
        await asyncio.sleep(0.1)
        response = await client.responses.retrieve(response.id)
    arrived = time.monotonic()
    await client.close()
    return _figures(emu, response.id, arrived)


def _figures(emu: Emulator, response_id: str, arrived: float) -> dict[str, float]:
    job = emu.state.store[f"openai:job:{response_id}"]
    ended = job.started + job.duration
    polls = [r for r in emu.requests if r.method == "GET" and r.path.endswith(response_id)]
    # Steady state: the second half of the job, well after the backoff ramp (0.25 + 0.5 + 1 s).
    window = (job.started + DURATION / 2, ended)
    steady = [r for r in polls if window[0] <= r.at < window[1]]
    return {"polls": len(polls), "steady_rate": len(steady) / (window[1] - window[0]), "late": arrived - ended}


async def _run(emu: Emulator, which) -> list[dict[str, float]]:
    return list(await asyncio.gather(*(which(emu, i) for i in range(JOBS))))


def main() -> None:
    with Emulator(background_duration=DURATION) as emu:
        asyncio.run(_warm_up(emu))
        emu.reset()
        ours = asyncio.run(_run(emu, _ours))
        emu.reset()
        naive = asyncio.run(_run(emu, _naive))
    for name, rows in (("nbimagine (poll_interval 1 s)", ours), ("baseline: fixed 0.1 s loop", naive)):
        rate = statistics.mean(r["steady_rate"] for r in rows)
        late = max(r["late"] for r in rows)
        polls = statistics.mean(r["polls"] for r in rows)
        print(f"{name:32s} {rate:5.2f} status requests/s at steady state, {polls:4.1f} per {DURATION:.0f} s job, "
              f"result {late * 1000:4.0f} ms after the job ended (worst of {JOBS})")
    ratio = statistics.mean(r["steady_rate"] for r in naive) / max(statistics.mean(r["steady_rate"] for r in ours),
                                                                    1e-9)
    rate = max(r["steady_rate"] for r in ours)
    late = max(r["late"] for r in ours)
    print(f"polling load {ratio:.1f}x below the baseline; targets: <= 1 request/s ({'ok' if rate <= 1.0 else 'MISSED'})"
          f", result within one poll interval ({'ok' if late <= 1.0 else 'MISSED'})")


async def _warm_up(emu: Emulator) -> None:
    emu.background_duration = 0.1
    config = OpenAIResponsesConfig("gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, background=True,
                                   poll_interval=0.1)
    await Agent("warm", config=config, tools=[ImageGenerationTool(size="256x256")]).ask("warm up")
    emu.background_duration = DURATION


if __name__ == "__main__":
    main()

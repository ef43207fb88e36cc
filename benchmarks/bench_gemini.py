"""Per-call overhead of ``agent.ask`` on Gemini against a raw ``google-genai`` call.

Both calls hit the same emulator answer (gemini-3.1-flash-image, TEXT + IMAGE: a text part and a
1024x1024 JPEG, each with a thought signature) from the same event loop, interleaved so that drift
affects both alike. The raw call is ``client.aio.models.generate_content`` plus picking the image bytes
out of the parts; ``agent.ask`` adds request building, media-type sniffing, metadata, history and the
``Reply``. Target: ratio <= 1.10.

``agent_retries`` is the default config (``max_retries=2``: the SDK's retry wrapper is on); the headline
``agent`` figure uses ``max_retries=0`` like the raw client, so that both make the same single attempt.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _timing import medians_ms

from nbimagine import Agent
from nbimagine.config import GeminiConfig
from nbimagine.emulator import Emulator

ROUNDS = 30
WARMUP = 10  # more than the emulator's 8 variants of one request, so every one is in its render cache
MODEL = "gemini-3.1-flash-image"
PROMPT = "A lighthouse on a cliff at dusk, benchmark"
KEY = "AIzaBenchKey-0123456789"


async def _overhead(emu: Emulator) -> dict[str, float]:
    from google import genai
    from google.genai import types

    raw_client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.gemini_base_url))
    raw_config = types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"])
    config = GeminiConfig(model=MODEL, api_key=KEY, base_url=emu.gemini_base_url,
                          response_modalities=["TEXT", "IMAGE"], max_retries=0)
    agent = Agent("bench", config=config)
    agent_retries = Agent("bench", config=config.replace(max_retries=2))

    async def raw() -> bytes:
        response = await raw_client.aio.models.generate_content(model=MODEL, contents=PROMPT, config=raw_config)
        return next(p.inline_data.data for p in response.candidates[0].content.parts if p.inline_data)

    async def ours() -> bytes:
        return (await agent.ask(PROMPT)).files[0].data

    async def ours_retries() -> bytes:
        return (await agent_retries.ask(PROMPT)).files[0].data

    calls = {"raw": raw, "agent": ours, "agent_retries": ours_retries}
    for _ in range(WARMUP):  # connections, the emulator's render cache, lazy imports
        for call in calls.values():
            await call()
    median = await medians_ms(calls, ROUNDS)
    await raw_client.aio.aclose()
    return {
        "raw_ms": median["raw"],
        "agent_ms": median["agent"],
        "agent_retries_ms": median["agent_retries"],
        "ratio": median["agent"] / median["raw"],
        "ratio_retries": median["agent_retries"] / median["raw"],
        "added_ms_per_image": median["agent"] - median["raw"],
    }


def main() -> dict[str, Any]:
    with Emulator() as emu:
        results = asyncio.run(_overhead(emu))
    print(f"Gemini overhead ({MODEL}, TEXT+IMAGE, 1024x1024 JPEG from the emulator, median of "
          f"{ROUNDS} interleaved calls after {WARMUP} warm-up rounds)")
    print(f"  raw google-genai call        {results['raw_ms']:7.2f} ms")
    print(f"  agent.ask (max_retries=0)    {results['agent_ms']:7.2f} ms")
    print(f"  agent.ask (max_retries=2)    {results['agent_retries_ms']:7.2f} ms")
    print(f"  ratio agent/raw              {results['ratio']:7.3f}   (target <= 1.10) {_ok(results['ratio'] <= 1.10)}")
    print(f"  ratio with retries on        {results['ratio_retries']:7.3f}")
    print(f"  added per image              {results['added_ms_per_image']:7.2f} ms")
    return results


def _ok(flag: bool) -> str:
    return "OK" if flag else "OVER"


if __name__ == "__main__":
    main()

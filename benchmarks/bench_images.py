"""Per-call overhead of ``agent.ask`` through the OpenAI Images API against a raw ``client.images.generate``.

Both calls hit the same emulator answers (1024x1024 PNGs) from the same event loop, interleaved so that drift
affects both alike; once with ``n=1`` and once with ``n=4`` (four images from one request). ``agent.ask`` does
what the raw call does plus the model-rule checks, decoding each image (the raw call leaves base64), metadata
and typed, priced usage, so the raw call with a b64decode per image is shown too: with four images the decode
alone is a third of the raw call, so the ratio's target is against that (the bytes a caller needs). Targets:
ratio <= 1.10 and <= 15 ms added per image.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from _timing import medians_ms

from nbimagine import Agent
from nbimagine.config import OpenAIImagesConfig
from nbimagine.emulator import Emulator

ROUNDS = 60
PROMPT = "A lighthouse on a cliff at dusk, benchmark"


async def _overhead(emu: Emulator, n: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    key = "sk-bench"
    raw_client = AsyncOpenAI(api_key=key, base_url=emu.openai_base_url, max_retries=0)
    params: dict[str, Any] = {"model": "gpt-image-2", "size": "1024x1024", "output_format": "png", "n": n}
    agent = Agent("bench", config=OpenAIImagesConfig(api_key=key, base_url=emu.openai_base_url, max_retries=0,
                                                     **params))

    async def raw() -> list[str]:
        response = await raw_client.images.generate(prompt=PROMPT, **params)
        return [item.b64_json or "" for item in response.data or []]

    async def raw_decoded() -> list[bytes]:
        return [base64.b64decode(b64) for b64 in await raw()]

    async def ours() -> list[bytes]:
        reply = await agent.ask(PROMPT)
        assert len(reply.files) == n and reply.usage is not None and reply.cost is not None
        return [f.data for f in reply.files]

    for _ in range(3):  # warm-up: connections, emulator render cache, lazy imports, prices
        await raw(), await ours()
    median = await medians_ms({"raw": raw, "agent": ours, "raw_decoded": raw_decoded}, ROUNDS)
    await raw_client.close()
    return {
        "raw_ms": median["raw"],
        "raw_decoded_ms": median["raw_decoded"],
        "agent_ms": median["agent"],
        "ratio": median["agent"] / median["raw"],
        "ratio_decoded": median["agent"] / median["raw_decoded"],
        "added_ms_per_image": (median["agent"] - median["raw"]) / n,
    }


def main() -> dict[str, Any]:
    results = {}
    with Emulator() as emu:
        for n in (1, 4):
            results[n] = asyncio.run(_overhead(emu, n))
    print(f"OpenAI Images API overhead (1024x1024 PNGs from the emulator, median of {ROUNDS} interleaved calls)")
    for n, r in results.items():
        print(f"  n={n}: raw images.generate {r['raw_ms']:7.2f} ms, + b64decode {r['raw_decoded_ms']:7.2f} ms, "
              f"agent.ask {r['agent_ms']:7.2f} ms")
        print(f"       ratio agent/raw {r['ratio']:6.3f}, agent/(raw + b64decode) {r['ratio_decoded']:6.3f} "
              f"(target <= 1.10) {_ok(r['ratio_decoded'] <= 1.10)}; added per image {r['added_ms_per_image']:6.2f} "
              f"ms (target <= 15 ms) {_ok(r['added_ms_per_image'] <= 15)}")
    return results


def _ok(flag: bool) -> str:
    return "OK" if flag else "OVER"


if __name__ == "__main__":
    main()

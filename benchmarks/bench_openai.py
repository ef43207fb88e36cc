"""Per-call overhead of ``agent.ask`` against a raw ``openai`` SDK call, and ``import nbimagine`` time.

Both calls hit the same emulator answer (a 1024x1024 PNG) from the same event loop, interleaved so that
drift affects both alike. Targets: ratio <= 1.10 and <= 15 ms added per image; import <= 150 ms.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import subprocess
import sys
import time
from typing import Any

from _timing import medians_ms

from nbimagine import Agent
from nbimagine.config import OpenAIResponsesConfig
from nbimagine.emulator import Emulator
from nbimagine.emulator._server import VARIANTS
from nbimagine.tools import ImageGenerationTool

ROUNDS = 40
PROMPT = "A lighthouse on a cliff at dusk, benchmark"


async def _overhead(emu: Emulator) -> dict[str, float]:
    from openai import AsyncOpenAI

    key = "sk-bench"
    raw_client = AsyncOpenAI(api_key=key, base_url=emu.openai_base_url, max_retries=0)
    tool = {"type": "image_generation", "size": "1024x1024", "output_format": "png"}
    agent = Agent("bench", config=OpenAIResponsesConfig("gpt-4.1", api_key=key, base_url=emu.openai_base_url,
                                                       max_retries=0),
                  tools=[ImageGenerationTool(size="1024x1024", output_format="png")])

    async def raw() -> bytes:
        response = await raw_client.responses.create(
            model="gpt-4.1", input=[{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}],
            tools=[tool],  # type: ignore[list-item]
        )
        return next(item.result for item in response.output if item.type == "image_generation_call")

    async def raw_decoded() -> bytes:
        return base64.b64decode(await raw())

    async def ours() -> bytes:
        return (await agent.ask(PROMPT)).files[0].data

    for _ in range(VARIANTS + 2):  # warm-up: connections, every variant in the render cache, lazy imports
        await raw(), await ours()
    median = await medians_ms({"raw": raw, "agent": ours, "raw_decoded": raw_decoded}, ROUNDS)
    await raw_client.close()
    return {
        "raw_ms": median["raw"],
        "raw_decoded_ms": median["raw_decoded"],
        "agent_ms": median["agent"],
        "ratio": median["agent"] / median["raw"],
        "added_ms_per_image": median["agent"] - median["raw"],
    }


def _wall(code: str, runs: int = 7) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> dict[str, Any]:
    with Emulator() as emu:
        results = asyncio.run(_overhead(emu))
    baseline = _wall("pass")
    imported = _wall("import nbimagine")
    public = _wall("import nbimagine, nbimagine.config, nbimagine.tools, nbimagine.events, nbimagine.errors;"
                   " from nbimagine import Agent")
    sdk = _wall("import openai")
    results.update(python_startup_ms=baseline, import_ms=imported, import_public_api_ms=public,
                   import_openai_sdk_ms=sdk)
    print("OpenAI Responses overhead (1024x1024 PNG from the emulator, median of "
          f"{ROUNDS} interleaved calls)")
    print(f"  raw openai SDK call     {results['raw_ms']:7.2f} ms")
    print(f"  raw call + b64decode    {results['raw_decoded_ms']:7.2f} ms")
    print(f"  agent.ask               {results['agent_ms']:7.2f} ms")
    print(f"  ratio agent/raw         {results['ratio']:7.3f}   (target <= 1.10) {_ok(results['ratio'] <= 1.10)}")
    print(f"  added per image         {results['added_ms_per_image']:7.2f} ms (target <= 15 ms) "
          f"{_ok(results['added_ms_per_image'] <= 15)}")
    print("Import time (wall, fresh interpreter, median of 7)")
    print(f"  python -c pass          {baseline:7.1f} ms (baseline)")
    print(f"  import nbimagine        {imported:7.1f} ms (target <= 150 ms) {_ok(imported <= 150)}; "
          f"{imported - baseline:.1f} ms over the baseline")
    print(f"  + configs, tools, Agent {public:7.1f} ms")
    print(f"  import openai (for scale) {sdk:5.1f} ms")
    return results


def _ok(flag: bool) -> str:
    return "OK" if flag else "OVER"


if __name__ == "__main__":
    main()

"""What pricing adds per image: usage normalisation, the genai-prices calculation, stamping ``cost_usd``.

Every reply's usage differs in practice (prompt tokens vary), so each timed call prices a usage not seen
before (no cache hit). The baseline is one ``agent.ask`` against the emulator in the same run. Target: <= 1 ms
per image. Also reported: the one-off cost of loading genai-prices (done on a background thread when the
first agent is made), of ``estimate()``, and what a budget adds to each generation: checking and holding
before the request, counting and giving back after it (the notebook's under the history's write lock).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from nbimagine import Agent
from nbimagine._agent import Reply, _attach_cost
from nbimagine._cost import Usage, estimate, gemini_usage, openai_usage
from nbimagine.config import GeminiConfig, OpenAIResponsesConfig
from nbimagine.emulator import Emulator
from nbimagine.tools import ImageGenerationTool

ROUNDS = 400


def _openai_usage(i: int) -> Usage:
    chat = openai_usage({"input_tokens": 300 + i, "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens": 40 + i % 7, "output_tokens_details": {"reasoning_tokens": 0}}, "gpt-4.1")
    image = openai_usage({"input_tokens": 20 + i, "input_tokens_details": {"image_tokens": 0, "text_tokens": 20 + i},
                          "output_tokens": 1056}, "gpt-image-1", image_model=True)
    return Usage.combine([chat, image], images=1)


def _gemini_usage(i: int) -> Usage:
    raw = {"promptTokenCount": 12 + i, "candidatesTokenCount": 1130, "thoughtsTokenCount": 180 + i % 11,
           "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12 + i}],
           "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120},
                                       {"modality": "TEXT", "tokenCount": 10}]}
    return Usage.combine([gemini_usage(raw, "gemini-3.1-flash-image")], images=1)


def _per_image_ms(agent: Agent, reply: Reply, make: Any) -> float:
    samples = []
    for i in range(ROUNDS):
        reply.usage = make(i)
        reply.files = reply.files[:1]
        start = time.perf_counter()
        _attach_cost(reply, agent._provider)
        samples.append(time.perf_counter() - start)
    assert reply.cost is not None and "cost_usd" in reply.files[0].metadata
    return statistics.median(samples) * 1000


def _budget_ms(agent: Agent, reply: Reply, *, notebook: bool) -> float:
    """One generation's budget work: hold (estimate, check, hold) then settle (count, give back)."""
    from nbimagine._budget import hold
    from nbimagine._history import History
    from nbimagine._session import ImagineSession

    samples = []
    with tempfile.TemporaryDirectory() as folder, History(folder, "bench") as history:
        session = ImagineSession(budget_usd=None if notebook else 1000.0)
        if notebook:
            history.set_budget(1000.0)
        for i in range(50):
            start = time.perf_counter()
            holds = hold(session, history, lambda i=i: estimate(agent.config, tools=agent.tools,
                                                                prompt=f"prompt {i}"), 1)
            holds.settle(reply, 1, 1, provider="openai", model="gpt-4.1")
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> dict[str, Any]:
    load = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                           "from nbimagine._cost import _load_prices; _load_prices(); "
                           "print((time.perf_counter() - t) * 1000)"], check=True, capture_output=True, text=True)
    load_ms = float(load.stdout)
    with Emulator() as emu:
        openai_agent = Agent("b", config=OpenAIResponsesConfig("gpt-4.1", api_key="k", base_url=emu.openai_base_url),
                             tools=[ImageGenerationTool(size="1024x1024", quality="medium", model="gpt-image-1")])
        gemini_agent = Agent("g", config=GeminiConfig("gemini-3.1-flash-image", api_key="k",
                                                      base_url=emu.gemini_base_url))
        for _ in range(3):
            openai_reply = openai_agent.ask_sync("A lighthouse at dusk, benchmark")
            gemini_reply = gemini_agent.ask_sync("A lighthouse at dusk, benchmark")
        asks = []
        for _ in range(20):
            start = time.perf_counter()
            openai_agent.ask_sync("A lighthouse at dusk, benchmark")
            asks.append(time.perf_counter() - start)
        ask_ms = statistics.median(asks) * 1000
        openai_ms = _per_image_ms(openai_agent, openai_reply, _openai_usage)
        gemini_ms = _per_image_ms(gemini_agent, gemini_reply, _gemini_usage)
        samples = []
        for i in range(50):
            start = time.perf_counter()
            estimate(openai_agent.config, tools=openai_agent.tools, prompt=f"prompt {i}", n=4)
            samples.append(time.perf_counter() - start)
        estimate_ms = statistics.median(samples) * 1000
        session_budget_ms = _budget_ms(openai_agent, openai_reply, notebook=False)
        notebook_budget_ms = _budget_ms(openai_agent, openai_reply, notebook=True)
    print(f"cost per image, OpenAI (chat + image tool, 2 prices): {openai_ms:.3f} ms "
          f"({openai_ms / ask_ms:.1%} of an emulator agent.ask of {ask_ms:.2f} ms)   target <= 1 ms")
    print(f"cost per image, Gemini (1 price):                     {gemini_ms:.3f} ms")
    print(f"estimate() for -n 4:                                  {estimate_ms:.3f} ms")
    print(f"loading genai-prices once (background thread):        {load_ms:.0f} ms")
    print(f"a budget, per generation: session / notebook:         {session_budget_ms:.2f} ms / "
          f"{notebook_budget_ms:.2f} ms (hold + settle; the notebook's: two history transactions)")
    return {"openai_ms": openai_ms, "gemini_ms": gemini_ms, "estimate_ms": estimate_ms, "load_ms": load_ms,
            "ask_ms": ask_ms, "session_budget_ms": session_budget_ms, "notebook_budget_ms": notebook_budget_ms}


if __name__ == "__main__":
    main()

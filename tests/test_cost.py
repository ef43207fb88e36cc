"""Usage, prices and estimates: every figure is checked against genai-prices' own extraction and calculation
of the same answer, over the real SDKs (recorded traffic and the emulator), never against hard-coded prices."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from google.oauth2.credentials import Credentials
from replay import ReplayServer, load_cassette

from nbimagine import Agent
from nbimagine._cost import (
    _TABLE,
    Cost,
    Usage,
    default_image_model,
    estimate,
    gemini_image_tokens,
    openai_image_tokens,
    openai_usage,
    price,
)
from nbimagine.config import (
    AzureOpenAIImagesConfig,
    AzureOpenAIResponsesConfig,
    FoundryAgentConfig,
    GeminiConfig,
    OpenAIConfig,
    OpenAIImagesConfig,
    OpenAIResponsesConfig,
    VertexAIConfig,
)
from nbimagine.events import ReplyEvent
from nbimagine.tools import ImageGenerationTool

CASSETTES = Path(__file__).parent / "cassettes"
KEY = "sk-cost-test-0123456789"
GKEY = "AIzaCostTest-0123456789"


def genai_total(body: dict[str, Any], provider_id: str, flavor: str = "default") -> Decimal:
    """genai-prices' own reading and pricing of a whole answer body."""
    return genai_prices.extract_usage(body, provider_id=provider_id, api_flavor=flavor).calc_price().total_price


def close(a: float, b: Decimal | float) -> bool:
    return abs(a - float(b)) < 1e-12


def ask_stream(agent: Agent, prompt: str) -> Any:
    async def run() -> Any:
        reply = None
        async for event in agent.stream(prompt):
            if isinstance(event, ReplyEvent):
                reply = event.reply
        return reply

    return asyncio.run(run())


# --- recorded traffic -----------------------------------------------------------------------------------

OPENAI_CASSETTES = [
    "openai__test_openai_responses_image_generation_jpeg.yaml",
    "openai__test_openai_responses_image_or_text_output.yaml",
]


@pytest.mark.parametrize("name", OPENAI_CASSETTES)
def test_recorded_openai_usage_and_cost_match_genai_prices(name: str) -> None:
    interactions = load_cassette(CASSETTES / name)
    config = OpenAIResponsesConfig("gpt-5", api_key=KEY, max_retries=0)
    with ReplayServer(CASSETTES / name) as server:
        agent = Agent("replay", config=config.replace(base_url=server.url + "/v1"), tools=[ImageGenerationTool()])
        replies = [agent.ask_sync("turn") for _ in interactions]
    for reply, interaction in zip(replies, interactions, strict=True):
        body = interaction["response"]["parsed_body"]
        recorded = body["usage"]
        usage = reply.usage
        assert dict(usage.raw) == recorded  # what the provider said, kept whole
        assert (usage.input_tokens, usage.output_tokens) == (recorded["input_tokens"], recorded["output_tokens"])
        assert usage.cached_tokens == recorded["input_tokens_details"]["cached_tokens"]
        assert usage.reasoning_tokens == recorded["output_tokens_details"]["reasoning_tokens"]
        assert usage.images == len(reply.files)
        chat = genai_total(body, "openai", "responses")
        cost = reply.cost
        assert cost is not None and not cost.simulated  # a real (recorded) answer
        if not reply.files:
            assert close(cost.usd, chat) and not cost.estimated
            continue
        # 2025-era answers report no image tool usage: each image is priced from OpenAI's documented tokens
        # for its size and quality, on the image model the answer names (else the default), and says so.
        assert cost.estimated and "documented tokens per image" in cost.note
        images = Decimal(0)
        for image in reply.files:
            model = image.metadata.get("image_model")
            if model is None:
                model = default_image_model()
                assert f"{model} assumed" in cost.note
            tokens, _ = openai_image_tokens(model, image.metadata["quality"], image.metadata["size"])
            text = max(1, len(image.metadata["revised_prompt"]) // 4)
            prices = (genai_prices.calc_price if model != "gpt-image-2.6-sunburst" else _row_price)
            images += prices(genai_prices.Usage(input_tokens=text, input_text_tokens=text, output_tokens=tokens,
                                                output_image_tokens=tokens), model, provider_id="openai").total_price
        assert close(cost.usd, chat + images)
        assert close(sum(f.metadata["cost_usd"] for f in reply.files), cost.usd)


def _row_price(usage: Any, model: str, provider_id: str) -> Any:
    """A price from nbimagine's own documented rows, computed by genai-prices' ModelPrice."""
    [row] = [r for r in _TABLE if model in r.models]
    prices = genai_prices.types.ModelPrice(**{k: Decimal(v) for k, v in row.prices.items()})
    return dataclasses.make_dataclass("P", ["total_price"])(prices.calc_price(usage)["total_price"])


GEMINI_CASSETTES = [
    ("google__test_google_image_generation_with_text.yaml", "gemini"),
    ("google__test_google_vertexai_image_generation.yaml", "vertex"),  # TEXT and IMAGE output details
    ("google__test_google_vertexai_image_generation_with_output_format.yaml", "vertex"),
]


@pytest.mark.parametrize(("name", "kind"), GEMINI_CASSETTES)
def test_recorded_gemini_usage_and_cost_match_genai_prices(name: str, kind: str) -> None:
    interactions = load_cassette(CASSETTES / name)
    with ReplayServer(CASSETTES / name) as server:
        model = interactions[0]["response"]["parsed_body"]["modelVersion"]
        if kind == "vertex":
            config: GeminiConfig = VertexAIConfig(model=model, project="pydantic-ai", location="global", max_retries=0,
                                                  credentials=Credentials(token="t"), base_url=server.url)
        else:
            config = GeminiConfig(model=model, api_key=GKEY, api_version="v1beta", base_url=server.url,
                                  max_retries=0)
        agent = Agent("replay", config=config)
        replies = [agent.ask_sync("turn") for _ in interactions]
    for reply, interaction in zip(replies, interactions, strict=True):
        body = interaction["response"]["parsed_body"]
        recorded = body["usageMetadata"]
        usage = reply.usage
        # The SDK drops keys it does not model (serviceTier); every other figure is kept as sent.
        assert _thaw(usage.raw) == {k: v for k, v in recorded.items() if k in usage.raw}
        assert set(recorded) - set(usage.raw) <= {"serviceTier"}
        assert usage.output_tokens == recorded["candidatesTokenCount"] + recorded.get("thoughtsTokenCount", 0)
        assert usage.reasoning_tokens == recorded.get("thoughtsTokenCount")
        image_detail = [d["tokenCount"] for d in recorded.get("candidatesTokensDetails", ())
                        if d["modality"] == "IMAGE"]
        assert usage.output_image_tokens == (image_detail[0] if image_detail else None)
        assert reply.cost is not None and not reply.cost.estimated and not reply.cost.simulated
        assert close(reply.cost.usd, genai_total(body, "google"))
        if reply.files:
            assert close(sum(f.metadata["cost_usd"] for f in reply.files), reply.cost.usd)


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# --- every provider path, against the emulator ------------------------------------------------------------


def _openai(emu: Any, **tool: Any) -> Agent:
    config = OpenAIResponsesConfig("gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, max_retries=0)
    return Agent("o", config=config, tools=[ImageGenerationTool(**tool)])


def _azure(emu: Any) -> Agent:
    config = AzureOpenAIResponsesConfig("gpt-4.1", api_key=KEY, base_url=emu.azure_endpoint + "/openai/v1/",
                                        image_deployment="gpt-image-1.5", max_retries=0)
    return Agent("a", config=config, tools=[ImageGenerationTool(quality="medium", size="1536x1024")])


def _gemini(emu: Any, model: str = "gemini-3.1-flash-image", **image: Any) -> Agent:
    config = GeminiConfig(model=model, api_key=GKEY, base_url=emu.gemini_base_url, max_retries=0,
                          response_modalities=["TEXT", "IMAGE"], image_config=image or None)
    return Agent("g", config=config)


def _images(emu: Any, **params: Any) -> Agent:
    return Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0, **params))


def _azure_images(emu: Any) -> Agent:
    config = AzureOpenAIImagesConfig("gpt-image-1", api_key=KEY, azure_endpoint=emu.azure_endpoint, max_retries=0,
                                     quality="low", size="1024x1536")
    return Agent("ai", config=config)


def _foundry(emu: Any) -> Agent:
    from test_foundry import FakeTokenCredential

    config = FoundryAgentConfig("gpt-4.1", project_endpoint=emu.foundry_endpoint, agent_name="painter",
                                image_deployment="gpt-image-1", credential=FakeTokenCredential(), max_retries=0)
    return Agent("f", config=config, tools=[ImageGenerationTool(quality="high", size="1536x1024")])


def _vertex(emu: Any) -> Agent:
    config = VertexAIConfig(model="gemini-2.5-flash-image", project="p", location="us-central1", max_retries=0,
                            credentials=Credentials(token="t"), base_url=emu.vertex_base_url)
    return Agent("v", config=config)


PATHS = {
    "openai": lambda emu: _openai(emu, quality="low", size="1024x1024", model="gpt-image-1"),
    "openai-partials": lambda emu: _openai(emu, quality="high", size="1024x1536", model="gpt-image-1.5",
                                           partial_images=2),
    "openai-default-model": lambda emu: _openai(emu),
    "azure": _azure,
    "gemini": _gemini,
    "gemini-4k": lambda emu: _gemini(emu, "gemini-3-pro-image-preview", image_size="4K"),
    "vertex": _vertex,
    "images-api": lambda emu: _images(emu, model="gpt-image-1.5", quality="medium", size="1024x1024"),
    "images-api-n3-partials": lambda emu: _images(emu, model="gpt-image-2", quality="low", size="1536x1024", n=3,
                                                  partial_images=1),
    "azure-images-api": _azure_images,
    "foundry": _foundry,
}


@pytest.mark.parametrize("stream", [False, True], ids=["ask", "stream"])
@pytest.mark.parametrize("path", PATHS)
def test_every_provider_path_prices_its_reply_like_genai_prices(emu: Any, path: str, stream: bool) -> None:
    agent = PATHS[path](emu)
    reply = ask_stream(agent, "A lighthouse at dusk") if stream else agent.ask_sync("A lighthouse at dusk")
    cost = reply.cost
    assert isinstance(cost, Cost) and cost.simulated and not cost.estimated
    usage = reply.usage
    assert usage.images == len(reply.files) == getattr(agent.config, "n", None) or 1
    assert usage.output_image_tokens > 0
    if agent.config.provider in ("gemini", "vertex"):
        expected = genai_total({"usageMetadata": _thaw(usage.raw), "modelVersion": reply.model}, "google")
    elif isinstance(agent.config, OpenAIImagesConfig):
        # A stream reports usage per image, without output details; genai-prices reads the summed figures.
        extracted = genai_prices.extract_usage({"usage": {"output_tokens_details": {}, **_thaw(usage.raw)},
                                                "model": "gpt-image-1"}, provider_id="openai", api_flavor="images")
        provider_id = "azure" if agent.config.provider == "azure" else "openai"
        priced = genai_prices.Usage(**{**vars(extracted.usage), "output_image_tokens": usage.output_image_tokens})
        expected = genai_prices.calc_price(priced, agent.config.model, provider_id=provider_id).total_price
    else:
        raw = _thaw(usage.raw)
        image_gen = raw["tool_usage"]["image_gen"]
        image_model = reply.files[0].metadata["image_model"]
        provider_id = "azure" if agent.config.provider in ("azure", "foundry") else "openai"
        expected = genai_total({"usage": raw["usage"], "model": reply.model}, provider_id, "responses")
        # genai-prices reads an image usage with its OpenAI "images" extractor (Azure reports the same shape).
        extracted = genai_prices.extract_usage({"usage": image_gen, "model": "gpt-image-1"}, provider_id="openai",
                                               api_flavor="images").usage
        try:
            expected += genai_prices.calc_price(extracted, image_model, provider_id=provider_id).total_price
        except LookupError:  # a model genai-prices does not know yet: nbimagine's documented row prices it
            expected += _row_price(extracted, image_model, provider_id).total_price
    assert close(cost.usd, expected)
    assert all(close(image.metadata["cost_usd"], cost.usd / len(reply.files)) for image in reply.files)


def test_chat_completions_usage_and_cost_stream_and_not(emu: Any) -> None:
    agent = Agent("c", config=OpenAIConfig("gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    for reply in (agent.ask_sync("hello"), ask_stream(agent, "hello")):
        raw = _thaw(reply.usage.raw)
        assert reply.usage.input_tokens == raw["prompt_tokens"] > 0
        assert close(reply.cost.usd, genai_total({"usage": raw, "model": reply.model}, "openai", "chat"))


def test_emulator_image_tokens_follow_the_documented_tables(emu: Any) -> None:
    # Size, quality and model move the reported tokens exactly as OpenAI's and Google's tables say.
    for quality, size, model in [("low", "1024x1536", "gpt-image-1"), ("high", "1536x1024", "gpt-image-1-mini"),
                                 ("medium", "2048x1152", "gpt-image-2")]:
        reply = _openai(emu, quality=quality, size=size, model=model).ask_sync("x")
        assert reply.usage.parts[1].output_image_tokens == openai_image_tokens(model, quality, size)[0]
    for model, tier in [("gemini-3.1-flash-image", "512"), ("gemini-3.1-flash-image", "2K"),
                        ("gemini-3-pro-image-preview", "4K"), ("gemini-2.5-flash-image", None)]:
        reply = _gemini(emu, model, **({"image_size": tier} if tier else {})).ask_sync("x")
        assert reply.usage.output_image_tokens == gemini_image_tokens(model, tier)


# --- the rules of pricing ----------------------------------------------------------------------------------


def test_image_output_is_never_priced_at_the_text_rate() -> None:
    # An image tool usage without output_tokens_details: its output is image tokens (LiteLLM billed them as
    # text). gpt-image-1.5 charges $32/M for image output and $10/M for text, so the difference shows.
    raw = {"input_tokens": 20, "input_tokens_details": {"image_tokens": 0, "text_tokens": 20},
           "output_tokens": 4160, "total_tokens": 4180}
    usage = openai_usage(raw, "gpt-image-1.5", image_model=True)
    assert usage.output_image_tokens == 4160
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=20, input_text_tokens=20, input_image_tokens=0, output_tokens=4160,
                           output_image_tokens=4160), "gpt-image-1.5", provider_id="openai").total_price
    assert close(price(usage, "openai").usd, expected)
    as_text = genai_prices.calc_price(genai_prices.Usage(input_tokens=20, output_tokens=4160), "gpt-image-1.5",
                                      provider_id="openai").total_price
    assert expected > 2 * as_text


def test_unknown_model_is_unknown_never_guessed(emu: Any) -> None:
    assert price(Usage("no-such-image-model", 10, 10), "openai") is None
    assert price(Usage("gpt-4.1", 10, 10), "some-other-provider") is None
    # One unpriced part makes the whole reply unknown: a partial sum would read as the bill.
    both = Usage.combine([Usage("gpt-4.1", 10, 10), Usage("no-such-image-model", 10, 10)], images=1)
    assert price(both, "openai") is None
    reply = _openai(emu, model="no-such-image-model", quality="low", size="1024x1024").ask_sync("x")
    assert reply.files and reply.cost is None and "cost_usd" not in reply.files[0].metadata
    est = estimate(reply._agent.config, tools=reply._agent.tools)
    assert not est.known and est.low_usd is None and "no-such-image-model" in str(est)


def test_own_price_rows_never_shadow_genai_prices() -> None:
    for row in _TABLE:
        for model in row.models:
            with pytest.raises(LookupError):
                genai_prices.calc_price(genai_prices.Usage(input_tokens=1), model, provider_id="openai")


def test_usage_is_immutable_and_keeps_the_raw_answer(emu: Any) -> None:
    reply = _gemini(emu).ask_sync("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.usage.output_tokens = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        reply.usage.raw["promptTokenCount"] = 0  # type: ignore[index]
    assert reply.usage.raw["promptTokenCount"] == reply.usage.input_tokens
    with pytest.raises(TypeError):
        reply.files[0].metadata["cost_usd"] = 0  # type: ignore[index]


def test_prices_follow_the_request_date() -> None:
    usage = Usage("gpt-image-1", 10, 272, input_text_tokens=10, output_image_tokens=272)
    a = price(usage, "openai", day=dt.date(2026, 1, 1))
    b = genai_prices.calc_price(genai_prices.Usage(input_tokens=10, input_text_tokens=10, output_tokens=272,
                                                   output_image_tokens=272), "gpt-image-1", provider_id="openai",
                                genai_request_timestamp=dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc))
    assert close(a.usd, b.total_price)


# --- estimates and dry runs ---------------------------------------------------------------------------------

ESTIMATED = {
    "gpt-image-1 low square": lambda emu: _openai(emu, quality="low", size="1024x1024", model="gpt-image-1"),
    "gpt-image-1.5 auto": lambda emu: _openai(emu, model="gpt-image-1.5"),
    "gpt-image-2 wide high": lambda emu: _openai(emu, quality="high", size="2048x1152", model="gpt-image-2"),
    "default model": lambda emu: _openai(emu),
    "azure": _azure,
    "gemini 3.1 2K": lambda emu: _gemini(emu, image_size="2K"),
    "gemini 3 pro 4K": lambda emu: _gemini(emu, "gemini-3-pro-image-preview", image_size="4K"),
    "vertex 2.5": _vertex,
    "images api n=3": lambda emu: _images(emu, model="gpt-image-1", n=3, partial_images=2),
    "azure images api": _azure_images,
    "foundry": _foundry,
}


@pytest.mark.parametrize("case", ESTIMATED)
def test_estimate_brackets_what_the_call_then_costs(emu: Any, case: str) -> None:
    agent = ESTIMATED[case](emu)
    prompt = "A lighthouse on a cliff at dusk, in watercolour"
    est = estimate(agent.config, tools=agent.tools, prompt=prompt, n=3)
    assert est.known and est.simulated and est.n == 3 and est.assumptions
    reply = agent.ask_sync(prompt)
    assert est.low_usd / 3 <= reply.cost.usd <= est.high_usd / 3, (est, reply.cost, reply.usage)


def test_estimate_counts_input_images(emu: Any) -> None:
    from nbimagine.events import ImageInput

    agent = _gemini(emu, "gemini-2.5-flash-image")
    picture = agent.ask_sync("a red square").files[0]
    alone = estimate(agent.config, prompt="make it blue")
    edit = estimate(agent.config, prompt="make it blue", inputs=[ImageInput(data=picture.data)])
    assert edit.low_usd > alone.low_usd and "1 input image" in " ".join(edit.assumptions)


def test_dry_run_sends_nothing_and_shows_the_exact_request(emu: Any) -> None:
    for agent in (_openai(emu, quality="low", size="1024x1024", model="gpt-image-1"), _azure(emu), _gemini(emu),
                  _vertex(emu), _images(emu, model="gpt-image-1", n=2), _foundry(emu)):
        emu.reset()
        dry = agent.dry_run("A lighthouse at dusk")
        assert emu.requests == []  # nothing reached the service (Foundry: not even the agent version lookup)
        assert dry.estimate.known
        agent.ask_sync("A lighthouse at dusk")
        sent = emu.requests[-1]  # Foundry first finds or makes the agent version
        if isinstance(agent.config, FoundryAgentConfig):  # the version is only known once it was looked up
            assert dry.request["json"]["agent_reference"]["version"].startswith("(the version with these tools")
            emu.reset()
            dry = agent.dry_run("A lighthouse at dusk")
            assert emu.requests == []
        assert dry.request["json"] == sent.json  # the very body a real call sends
        assert dry.request["url"].endswith(sent.path + (f"?{_query(sent.query)}" if sent.query else ""))
        shown = repr(dry.request)
        assert KEY not in shown and GKEY not in shown and dry.request["headers"].get("authorization") != "t"


def _query(query: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(query)


def test_dry_run_masks_secrets_and_shortens_images(emu: Any) -> None:
    from nbimagine.events import ImageInput

    agent = _openai(emu, quality="low", size="1024x1024")
    image = agent.ask_sync("a red square").files[0]
    emu.reset()
    dry = agent.dry_run("make it blue", ImageInput(data=image.data))
    assert emu.requests == []
    text = repr(dry.request)
    assert KEY not in text and dry.request["headers"]["authorization"] == "***"
    assert len(text) < 5000 and "characters" in text  # the base64 image is shortened, not embedded

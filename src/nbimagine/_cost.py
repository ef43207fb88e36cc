"""What a reply used and what it cost: ``Usage``, ``Cost``, ``Estimate`` and where each price comes from.

Prices come from `genai-prices <https://github.com/pydantic/genai-prices>`_ (its bundled data only: nothing is
fetched at run time) wherever it knows the model; otherwise from ``_TABLE`` below, where every row names its
source and the day it was read; otherwise the cost is unknown (``None``), never a guess.

``genai_prices`` takes about 0.4 s to import, so it is loaded on first use, and :func:`warm_up` starts that
import on a background thread when the first agent is made (the request takes far longer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .tools import STANDARD_SIZES

if TYPE_CHECKING:
    from .config import ProviderConfig

__all__ = ["Cost", "CostReport", "CostRow", "Estimate", "Usage", "estimate", "price"]


# --- usage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Tokens one reply used, as the provider reported them (``None``: the provider did not say).

    ``input_tokens`` and ``output_tokens`` are totals; ``*_text_tokens``, ``*_image_tokens``, ``cached_tokens``
    (input read from a cache) and ``reasoning_tokens`` (Gemini "thoughts", OpenAI reasoning) are parts of them.
    ``images`` is the number of finished images in the reply. ``raw`` is the provider's own usage object
    (read-only). When one reply is billed on several models (OpenAI Responses: the chat model and the image
    tool's model, reported separately in ``usage`` and ``tool_usage.image_gen``) ``parts`` holds one ``Usage`` per
    model and the top-level counts are their sums; otherwise ``parts`` is empty and ``model`` is the model billed.
    """

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    input_text_tokens: int | None = None
    input_image_tokens: int | None = None
    cached_tokens: int | None = None
    output_text_tokens: int | None = None
    output_image_tokens: int | None = None
    reasoning_tokens: int | None = None
    images: int = 0
    parts: tuple[Usage, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .events import FrozenDict

        object.__setattr__(self, "raw", _freeze(dict(self.raw)) if not isinstance(self.raw, FrozenDict) else self.raw)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def combine(cls, parts: Sequence[Usage], *, images: int = 0, raw: Mapping[str, Any] | None = None) -> Usage:
        """One reply's usage over several billed models (kept in ``parts``)."""
        parts = [p for p in parts if p is not None]
        if len(parts) == 1:
            return dataclasses.replace(parts[0], images=images, raw=raw or parts[0].raw)

        def total(name: str) -> int | None:
            values = [getattr(p, name) for p in parts]
            return None if all(v is None for v in values) else sum(v or 0 for v in values)

        summed = {name: total(name) for name in _OPTIONAL_COUNTS}
        return cls(model=None, input_tokens=sum(p.input_tokens for p in parts),
                   output_tokens=sum(p.output_tokens for p in parts), images=images, parts=tuple(parts),
                   raw=raw or {}, **summed)

    def __str__(self) -> str:
        def detail(image: int | None, text: int | None) -> str:
            bits = [f"{image:,} image" if image else "", f"{text:,} text" if text else ""]
            shown = ", ".join(b for b in bits if b)
            return f" ({shown})" if shown else ""

        return (f"{self.input_tokens:,} in{detail(self.input_image_tokens, self.input_text_tokens)}, "
                f"{self.output_tokens:,} out{detail(self.output_image_tokens, self.output_text_tokens)}")


_OPTIONAL_COUNTS = ("input_text_tokens", "input_image_tokens", "cached_tokens", "output_text_tokens",
                    "output_image_tokens", "reasoning_tokens")


def _freeze(value: Any) -> Any:
    from .events import FrozenDict

    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _int(value: Any) -> int | None:
    """A token count as reported, or None: a negative count (or one that is not an integer) from a gateway or
    a proxy would price an answer below nothing and give a budget back."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def openai_usage(raw: Mapping[str, Any] | None, model: str | None, *, image_model: bool = False) -> Usage | None:
    """``usage`` of a Responses or Chat Completions answer (either naming), or an Images API / image tool usage.

    ``image_model``: the usage of a GPT Image model, whose output is image tokens unless the answer says
    otherwise (``output_tokens_details`` may be omitted; pricing those tokens at the text rate is the classic
    bug, e.g. LiteLLM issues 13847 and 18541).
    """
    if not raw:
        return None
    inputs = raw.get("input_tokens", raw.get("prompt_tokens"))
    outputs = raw.get("output_tokens", raw.get("completion_tokens"))
    in_details = raw.get("input_tokens_details") or raw.get("prompt_tokens_details") or {}
    out_details = raw.get("output_tokens_details") or raw.get("completion_tokens_details") or {}
    cached = in_details.get("cached_tokens", raw.get("cached_tokens"))
    output_text, output_image = _int(out_details.get("text_tokens")), _int(out_details.get("image_tokens"))
    if image_model and output_image is None:
        output_image = max((_int(outputs) or 0) - (output_text or 0), 0)
    return Usage(
        model=model, input_tokens=_int(inputs) or 0, output_tokens=_int(outputs) or 0,
        input_text_tokens=_int(in_details.get("text_tokens")), input_image_tokens=_int(in_details.get("image_tokens")),
        cached_tokens=_int(cached), output_text_tokens=output_text, output_image_tokens=output_image,
        reasoning_tokens=_int(out_details.get("reasoning_tokens")), raw=raw,
    )


def gemini_usage(raw: Mapping[str, Any] | None, model: str | None) -> Usage | None:
    """``usageMetadata`` of a Gemini / Vertex answer, in the wire's camelCase.

    Output is candidates plus thoughts (both are billed as output); input is the prompt plus tool-use prompt
    tokens; per-modality counts come from ``promptTokensDetails`` / ``candidatesTokensDetails``.
    """
    if not raw:
        return None

    def modality(key: str, name: str) -> int | None:
        found = [_int(d.get("tokenCount")) or 0 for d in raw.get(key) or ()
                 if isinstance(d, Mapping) and d.get("modality") == name]
        return sum(found) if found else None

    thoughts = _int(raw.get("thoughtsTokenCount"))
    return Usage(
        model=model,
        input_tokens=(_int(raw.get("promptTokenCount")) or 0) + (_int(raw.get("toolUsePromptTokenCount")) or 0),
        output_tokens=(_int(raw.get("candidatesTokenCount")) or 0) + (thoughts or 0),
        input_text_tokens=modality("promptTokensDetails", "TEXT"),
        input_image_tokens=modality("promptTokensDetails", "IMAGE"),
        cached_tokens=_int(raw.get("cachedContentTokenCount")),
        output_text_tokens=modality("candidatesTokensDetails", "TEXT"),
        output_image_tokens=modality("candidatesTokensDetails", "IMAGE"),
        reasoning_tokens=thoughts, raw=raw,
    )


# --- prices -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What a reply cost, in US dollars.

    ``source`` names the price list (``"genai-prices 0.2.3"``, or a row of nbimagine's own table with its URL
    and date). ``simulated``: the emulator answered, so this is what the same call would cost on the real
    service. ``estimated``: part of the figure is not from reported usage but from the provider's documented
    tokens per image (older OpenAI answers do not report the image tool's tokens); ``note`` says which part.
    """

    usd: float
    source: str
    simulated: bool = False
    estimated: bool = False
    note: str | None = None

    def __str__(self) -> str:
        flags = [f for f, on in (("simulated", self.simulated), ("estimated", self.estimated)) if on]
        return format_usd(self.usd) + (f" ({', '.join(flags)})" if flags else "")


# Batch jobs are billed at half the synchronous price on both vendors: OpenAI "Batch API" guide ("50% cost
# discount"), Google "Batch Mode" (Gemini API docs: "50% of the standard cost"). Read 2026-11-30.
BATCH_DISCOUNT = 0.5
_BATCH_SOURCE = "batch price: 50% of it (OpenAI Batch API; Gemini Batch Mode)"


def batch_priced(cost: Cost) -> Cost:
    """``cost`` as a batch job's line is billed (half), with the rule in its ``source``."""
    return dataclasses.replace(cost, usd=cost.usd * BATCH_DISCOUNT, source=f"{cost.source}; {_BATCH_SOURCE}")


def batch_estimate(found: Estimate) -> Estimate:
    """``found`` for the same requests sent as a batch job (half the price, the rule among its assumptions)."""
    if not found.known:
        return found
    return dataclasses.replace(
        found, low_usd=None if found.low_usd is None else found.low_usd * BATCH_DISCOUNT,
        high_usd=found.high_usd * BATCH_DISCOUNT if found.high_usd is not None else None,
        assumptions=(*found.assumptions, f"sent as a batch job: {_BATCH_SOURCE}"))


def format_usd(amount: float | Decimal | None) -> str:
    """``$1.27``, ``$0.14``, ``$0.043``, ``$0.0055``: cents from a dime up, two significant digits below."""
    if amount is None:
        return "unknown"
    value = float(amount)
    if value == 0:
        return "$0.00"
    if abs(value) >= 0.1:
        return f"${value:,.2f}"
    text = f"{value:.2g}"
    return "$" + (f"{value:.8f}".rstrip("0") if "e" in text else text)


# genai-prices' provider ids for ours. Vertex AI bills Gemini at the Gemini API's rates (genai-prices keeps one
# "google" provider with both pricing pages); Foundry deployments bill at Azure OpenAI's.
GENAI_PROVIDER = {"openai": "openai", "azure": "azure", "foundry": "azure", "gemini": "google", "vertex": "google"}


@dataclass(frozen=True)
class _Row:
    models: tuple[str, ...]
    prices: Mapping[str, str]  # genai-prices ModelPrice fields, $ per 1M tokens
    source: str
    checked: str


# Models genai-prices does not cover yet, from the provider's own model page. Keep this short: a row goes
# as soon as genai-prices knows the model (tests/test_cost.py checks that no row shadows it).
_TABLE: tuple[_Row, ...] = (
    _Row(("gpt-image-2.6-sunburst",),
         {"input_mtok": "5", "cache_read_mtok": "1.25", "output_mtok": "30", "input_image_mtok": "8",
          "cache_image_read_mtok": "2"},
         "https://developers.openai.com/api/docs/models/gpt-image-2.6-sunburst", "2026-11-30"),
)


def _genai() -> Any:
    import genai_prices

    return genai_prices


def warm_up() -> None:
    """Import genai-prices on a background thread (once per process)."""
    global _warming
    with _warm_lock:
        if _warming is not None:
            return
        _warming = threading.Thread(target=_load_prices, name="nbimagine-prices", daemon=True)
        _warming.start()


def _load_prices() -> None:
    with contextlib.suppress(Exception):  # only a warm-up: price() reports real problems
        _genai().data_snapshot.get_snapshot().find_provider_model("gpt-image-1", None, "openai", None)


_warm_lock = threading.Lock()
_warming: threading.Thread | None = None


def _genai_usage(usage: Usage) -> Any:
    counts = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
              "cache_read_tokens": usage.cached_tokens, "input_text_tokens": usage.input_text_tokens,
              "input_image_tokens": usage.input_image_tokens, "output_text_tokens": usage.output_text_tokens,
              "output_image_tokens": usage.output_image_tokens}
    return _genai().Usage(**{k: v for k, v in counts.items() if v is not None})


Priced = tuple[Decimal, str]  # USD, and the price list it came from


@lru_cache(maxsize=4096)  # replies with the same figures (an image size and quality) are common
def _price_tokens(provider_id: str, model: str, counts: tuple[int | None, ...], day: _dt.date) -> Priced | None:
    """(USD, source) for one model's tokens, or None when no price list knows the model."""
    usage = Usage(model, **dict(zip(_COUNTED, counts, strict=True)))
    genai = _genai()
    when = _dt.datetime.combine(day, _dt.time(12), tzinfo=_dt.timezone.utc)
    try:
        result = genai.calc_price(_genai_usage(usage), model, provider_id=provider_id, genai_request_timestamp=when)
        return result.total_price, f"genai-prices {genai.__version__}"
    except LookupError:
        pass
    row = _row(model)
    if row is None:
        return None
    from genai_prices.types import ModelPrice

    prices = ModelPrice(**{k: Decimal(v) for k, v in row.prices.items()})
    return prices.calc_price(_genai_usage(usage))["total_price"], f"{row.source} (read {row.checked})"


def _row(model: str) -> _Row | None:
    name = model.lower()
    return next((row for row in _TABLE if name in row.models), None)


def price_tokens(usage: Usage, provider: str, *, day: _dt.date | None = None) -> Priced | None:
    """(USD, source) for one model's usage on ``provider`` (our provider name), or None when unpriced."""
    provider_id = GENAI_PROVIDER.get(provider)
    if not usage.model or provider_id is None:
        return None
    counts = tuple(getattr(usage, name) for name in _COUNTED)
    return _price_tokens(provider_id, usage.model, counts, day or _dt.date.today())


_COUNTED = ("input_tokens", "output_tokens", *_OPTIONAL_COUNTS)


def price(usage: Usage | None, provider: str, *, simulated: bool = False, estimated_parts: Iterable[Usage] = (),
          day: _dt.date | None = None) -> Cost | None:
    """The cost of ``usage`` on ``provider`` (``openai``, ``azure``, ``gemini``, ``vertex``...), or None.

    Every billed model must be priced, or the cost is unknown: a partial sum would read as the whole bill.
    ``estimated_parts`` are usages derived from documented tokens per image (see :class:`Cost`).
    """
    estimated = list(estimated_parts)
    lines = [*([] if usage is None else usage.parts or (usage,)), *estimated]
    if not lines:
        return None
    total = Decimal(0)
    sources: list[str] = []
    for part in lines:
        priced = price_tokens(part, provider, day=day)
        if priced is None:
            return None
        total += priced[0]
        if priced[1] not in sources:
            sources.append(priced[1])
    note = None
    if estimated:
        models = ", ".join(sorted({p.model or "?" for p in estimated}))
        note = (f"{models}: tokens from the provider's documented tokens per image size and quality "
                "(the answer did not report them)")
    return Cost(float(total), " + ".join(sources), simulated=simulated, estimated=bool(estimated), note=note)


# --- tokens per image (documented) -----------------------------------------------------------------


# OpenAI image generation guide, "Cost and latency" (output image tokens per image); the same table for the
# GPT Image 1 family and 1.5: https://developers.openai.com/api/docs/guides/image-generation#cost-and-latency
# (read 2026-11-30).
_GPT_IMAGE_1_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
_GPT_IMAGE_1_FAMILY = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest")
# GPT Image 2 bills any WxH by a formula: OpenAI's image cost calculator (guide, "Size and quality options"), as
# transcribed at https://community.openai.com/t/1382699 (read 2026-11-30). It gives 196 tokens for 1024x1024
# low, which a recorded gpt-image-2 answer reports (pydantic-ai cassette, tool_usage.image_gen.output_tokens).
_GPT_IMAGE_2_FACTORS = {"low": 16, "medium": 48, "high": 96}
# "Each partial image adds 100 image output tokens" (same guide, "Streaming").
PARTIAL_IMAGE_TOKENS = 100
OPENAI_STANDARD_SIZES = tuple(size for size in STANDARD_SIZES if size != "auto")


def openai_image_tokens(model: str, quality: str, size: str) -> tuple[int, str | None] | None:
    """Output image tokens of one image, and the assumption behind them (None: documented for this model).

    None when nothing documents the model or the quality. Later GPT Image 2.x models (2.5, 2.6...) publish
    their price per token but not their tokens per image: GPT Image 2's formula is assumed for them, and said.
    """
    base = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model.lower())
    if base in _GPT_IMAGE_1_FAMILY:
        tokens = _GPT_IMAGE_1_TOKENS.get(quality, {}).get(size)
        return None if tokens is None else (tokens, None)
    if not base.startswith("gpt-image-2"):
        return None
    factor = _GPT_IMAGE_2_FACTORS.get(quality)
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if factor is None or match is None:
        return None
    width, height = int(match[1]), int(match[2])
    long_edge, short_edge = max(width, height), min(width, height)
    short_axis = (2 * factor * short_edge + long_edge) // (2 * long_edge)
    tokens = (factor * short_axis * (2_000_000 + width * height) + 4_000_000 - 1) // 4_000_000
    note = None if base == "gpt-image-2" else f"{model} publishes no tokens per image: GPT Image 2's are assumed"
    return tokens, note


# Gemini output image tokens per image, by image_size tier. Sources (read 2026-11-30):
# 2.5 Flash Image: "each 1024x1024 image = 1290 tokens", https://ai.google.dev/gemini-api/docs/pricing;
# 3 Pro Image: 1120 (1K, 2K), 2000 (4K), https://ai.google.dev/gemini-api/docs/pricing#gemini-3-pro-image;
# 3.1 Flash Image: 747 (512), 1120 (1K), 1680 (2K), 2520 (4K),
# https://docs.cloud.google.com/vertex-ai/generative-ai/docs/models/gemini/3-1-flash-image.
_GEMINI_IMAGE_TOKENS = {
    "gemini-2.5-flash-image": {"1K": 1290},
    "gemini-3-pro-image": {"1K": 1120, "2K": 1120, "4K": 2000},
    "gemini-3.1-flash-image": {"512": 747, "1K": 1120, "2K": 1680, "4K": 2520},
}
# Input tokens per input image. 2.5: 258 per 768x768 tile (https://ai.google.dev/gemini-api/docs/image-understanding
# #technical-details-image); 3 Pro Image: 560 (genai-prices' note on its batch price, from the pricing page);
# 3.1 Flash Image: 1120 (the Vertex model page above).
_GEMINI_INPUT_IMAGE_TOKENS = {"gemini-3-pro-image": 560, "gemini-3.1-flash-image": 1120}


def gemini_family(model: str) -> str | None:
    name = model.lower().removeprefix("models/").removesuffix("-preview")
    for family in _GEMINI_IMAGE_TOKENS:
        if name == family or name.startswith(family + "-preview"):
            return family
    return None


def gemini_image_tokens(model: str, image_size: str | None) -> int | None:
    family = gemini_family(model)
    if family is None:
        return None
    tiers = _GEMINI_IMAGE_TOKENS[family]
    return tiers.get(image_size or "1K")


def gemini_input_image_tokens(model: str, width: int, height: int) -> int | None:
    family = gemini_family(model)
    if family is None:
        return None
    if family in _GEMINI_INPUT_IMAGE_TOKENS:
        return _GEMINI_INPUT_IMAGE_TOKENS[family]
    if width <= 384 and height <= 384:
        return 258
    return 258 * -(-width // 768) * -(-height // 768)


# --- emulator detection --------------------------------------------------------------------------------

_EMULATOR_URLS: set[str] = set()


def register_emulator(url: str, *, live: bool = True) -> None:
    """Called by the emulator as it starts and stops: replies from it are priced as ``simulated``."""
    origin = _origin(url)
    if live:
        _EMULATOR_URLS.add(origin)
    else:
        _EMULATOR_URLS.discard(origin)


def is_emulated(url: str | None) -> bool:
    """True when ``url`` points at an nbimagine emulator (this process's, or ``NBIMAGINE_EMULATOR=<url>``)."""
    if not url:
        return False
    import os

    origin = _origin(url)
    env = os.environ.get("NBIMAGINE_EMULATOR", "")
    return origin in _EMULATOR_URLS or (env.startswith("http") and origin == _origin(env))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").replace("localhost", "127.0.0.1")
    return f"{parts.scheme}://{host}:{parts.port or ''}"


# --- estimates ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What a request would cost, before it is sent: ``low_usd`` to ``high_usd`` (None: unknown), for ``n``
    replies, with every assumption made spelled out. ``simulated``: the request would go to the emulator,
    which charges nothing; the figures are what the real service would charge."""

    low_usd: float | None
    high_usd: float | None
    n: int
    provider: str
    model: str
    assumptions: tuple[str, ...]
    sources: tuple[str, ...] = ()
    simulated: bool = False

    @property
    def known(self) -> bool:
        return self.high_usd is not None

    def __str__(self) -> str:
        if not self.known:
            return f"unknown ({self.assumptions[-1] if self.assumptions else 'no price for ' + self.model})"
        amount = (format_usd(self.high_usd) if self.low_usd == self.high_usd
                  else f"{format_usd(self.low_usd)} to {format_usd(self.high_usd)}")
        what = f"{self.n} request{'s' if self.n != 1 else ''}"
        return f"{amount} for {what}" + (" (simulated)" if self.simulated else "")

    def _repr_markdown_(self) -> str:
        lines = [f"**Estimate: {self}**", ""]
        lines += [f"- {a}" for a in self.assumptions]
        if self.sources:
            lines.append(f"- prices: {'; '.join(self.sources)}")
        return "\n".join(lines)


def estimate(config: ProviderConfig, *, tools: Sequence[object] = (), n: int = 1, inputs: Sequence[Any] = (),
             prompt: str | None = None) -> Estimate:
    """The cost range of ``n`` requests with ``config`` and ``tools`` (no network, nothing sent).

    ``inputs`` are what you would pass to ``ask`` (prompt text, images); their sizes refine the range. The range
    spans what is not known before the answer: ``quality``/``size`` ``auto``, the chat model's own tokens
    (OpenAI Responses), text and "thoughts" (Gemini). Unknown models give ``low_usd = high_usd = None``.
    """
    from ._agent import _load_provider, normalize_inputs
    from .errors import ConfigError

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be a positive integer, not {n!r}")
    items = normalize_inputs([*([prompt] if prompt else []), *inputs]) if (inputs or prompt) else []
    text = " ".join(i for i in items if isinstance(i, str))
    images = [i for i in items if not isinstance(i, str)]
    provider = _load_provider(config, list(tools))  # also refuses tools the provider cannot run
    if provider.name in ("gemini", "vertex"):
        low, high, assumptions = _estimate_gemini(config, text, images)
    else:
        # Azure and Foundry run the image tool on a deployment, named (as a rule) after its model.
        configured = getattr(provider, "_image_model", lambda: None)()
        low, high, assumptions = _estimate_openai(config, tools, text, images, configured)
    return _finish(provider.name, config, low, high, assumptions, n, is_emulated(provider.endpoint()))


def _finish(provider: str, config: ProviderConfig, low: list[Usage], high: list[Usage] | None,
            assumptions: list[str], n: int, simulated: bool) -> Estimate:
    if high is None:
        return Estimate(None, None, n, provider, config.model, tuple(assumptions), (), simulated)
    sources: list[str] = []
    totals = []
    for lines in (low, high):
        total = Decimal(0)
        for usage in lines:
            priced = price_tokens(usage, provider)
            if priced is None:
                assumptions.append(f"no price is known for {usage.model} on {provider}")
                return Estimate(None, None, n, provider, config.model, tuple(assumptions), (), simulated)
            total += priced[0]
            if priced[1] not in sources:
                sources.append(priced[1])
        totals.append(float(total) * n)
    return Estimate(totals[0], totals[1], n, provider, config.model, tuple(assumptions), tuple(sources), simulated)


def _text_tokens(text: str) -> tuple[int, int]:
    """Prompt tokens, low and high: about 4 characters of English per token (OpenAI's and Google's rule of
    thumb), from half that to twice that plus 32 for other scripts, formatting and the request's framing."""
    if not text:
        return 0, 32
    about = -(-len(text) // 4)
    return max(1, about // 2), 2 * about + 32


# The chat model's own tokens around an image tool call, beyond the prompt: up to 2,858 input (tool definitions,
# reasoning context) and 1,970 output tokens in recorded gpt-5 / gpt-5.4 replies (tests/cassettes, pydantic-ai).
_CHAT_INPUT = (0, 3000)
_CHAT_OUTPUT = (0, 2000)
# Gemini text and thoughts around an image: 0 to 48 text tokens and 174 to 529 thought tokens in the recordings.
_GEMINI_TEXT_OUTPUT = (0, 300)
_GEMINI_THOUGHTS = (0, 600)


def default_image_model() -> str:
    """The image tool's model when none is set: the SDK's documented default (``ImageGeneration.model``)."""
    return "gpt-image-2.6-sunburst"


def _estimate_openai(config: Any, tools: Sequence[object], text: str, images: Sequence[Any],
                     image_model: str | None) -> tuple[list[Usage], list[Usage] | None, list[str]]:
    from .config import OpenAIImagesConfig
    from .tools import ImageGenerationTool

    prompt = _text_tokens(text)
    image_in = sum(openai_input_image_tokens(*(_input_size(i) or (1024, 1024))) for i in images)
    assumptions: list[str] = [f"prompt {prompt[0]:,} to {prompt[1]:,} tokens (about 4 characters per token)"]
    if images:
        assumptions.append(f"{len(images)} input image(s): about {image_in:,} image tokens")
    if isinstance(config, OpenAIImagesConfig):  # the Images API: the image model alone, n images per call
        lines = _image_lines(config.model, config.quality, config.size, config.partial_images, config.n or 1,
                             prompt, image_in, assumptions, pinned=True)
        return ([lines[0]], [lines[1]], assumptions) if lines else ([], None, assumptions)
    chat_low = Usage(config.model, prompt[0] + image_in + _CHAT_INPUT[0], _CHAT_OUTPUT[0])
    chat_high = Usage(config.model, prompt[1] + image_in + _CHAT_INPUT[1], _CHAT_OUTPUT[1])
    assumptions.append(f"{config.model}: {chat_low.input_tokens:,} to {chat_high.input_tokens:,} input and "
                       f"{_CHAT_OUTPUT[0]:,} to {_CHAT_OUTPUT[1]:,} output tokens (the prompt, and what recorded "
                       "image replies used beyond it)")
    tool = next((t for t in tools if isinstance(t, ImageGenerationTool)), None)
    if tool is None:
        assumptions.append("no image tool: text only")
        return [chat_low], [chat_high], assumptions
    lines = _image_lines(image_model or default_image_model(), tool.quality, tool.size, tool.partial_images, 1,
                         prompt, image_in, assumptions, pinned=bool(image_model))
    if lines is None:
        return [chat_low], None, assumptions
    return [chat_low, lines[0]], [chat_high, lines[1]], assumptions


def _image_lines(model: str, quality: str | None, size: str | None, partial_images: int | None, count: int,
                 text_in: tuple[int, int], image_in: int, assumptions: list[str], *,
                 pinned: bool) -> tuple[Usage, Usage] | None:
    """The image model's usage for ``count`` images at the low and the high end, or None when undocumented."""
    if not pinned:
        assumptions.append(f"image model {model} (the tool's default; set ImageGenerationTool(model=...) to pin it)")
    qualities = [quality] if quality not in (None, "auto") else ["low", "high"]
    sizes = [size] if size not in (None, "auto") else list(OPENAI_STANDARD_SIZES)
    rules = [openai_image_tokens(model, q, s) for q in qualities for s in sizes]
    if any(rule is None for rule in rules):
        assumptions.append(f"{model}: no documented tokens per image for quality {'/'.join(qualities)}, "
                           f"size {'/'.join(sizes)}; set quality and size, or use a documented image model")
        return None
    per_image = [rule[0] for rule in rules if rule]
    assumptions.extend(dict.fromkeys(rule[1] for rule in rules if rule and rule[1]))
    partial = (partial_images or 0) * PARTIAL_IMAGE_TOKENS
    quality_note = quality if quality not in (None, "auto") else "auto (low to high)"
    size_note = size if size not in (None, "auto") else "auto (any standard size)"
    assumptions.append(f"{count} image(s) per request, quality {quality_note}, size {size_note}: "
                       f"{min(per_image):,} to {max(per_image):,} output image tokens each"
                       + (f" + {partial} for {partial_images} partial image(s)" if partial else ""))

    def usage(k: int, tokens: int) -> Usage:
        out = (tokens + partial) * count
        return Usage(model, text_in[k] + image_in, out, input_text_tokens=text_in[k], input_image_tokens=image_in,
                     output_image_tokens=out)

    return usage(0, min(per_image)), usage(1, max(per_image))


def openai_input_image_tokens(width: int, height: int) -> int:
    """Vision tokens of an input image at high detail: 85 + 170 per 512 px tile after scaling to fit 2048 px and
    a 768 px short side (https://developers.openai.com/api/docs/guides/images-vision#calculating-costs, read
    2026-11-30)."""
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * (-(-int(width) // 512)) * (-(-int(height) // 512))


def _input_size(image: Any) -> tuple[int, int] | None:
    from ._images import image_size

    data = getattr(image, "data", None)
    return image_size(data, image.media_type) if data else None


def _estimate_gemini(config: Any, text: str, images: Sequence[Any]) -> tuple[list[Usage], list[Usage] | None,
                                                                             list[str]]:
    from .config import image_config_fields

    size = image_config_fields(config.image_config).get("image_size") or "1K"
    modalities = config.response_modalities or ("TEXT", "IMAGE")
    prompt = _text_tokens(text)
    image_in = 0
    for image in images:
        dims = _input_size(image) or (1024, 1024)
        tokens = gemini_input_image_tokens(config.model, *dims)
        image_in += tokens or 0
    assumptions = [f"prompt {prompt[0]:,} to {prompt[1]:,} tokens (about 4 characters per token)"
                   + (f", {len(images)} input image(s) about "
                                                               f"{image_in:,} tokens" if images else "")]
    if "IMAGE" not in modalities:
        per_image = 0
        assumptions.append("response_modalities has no IMAGE: text only")
    else:
        tokens = gemini_image_tokens(config.model, size)
        if tokens is None:
            assumptions.append(f"{config.model}: no documented tokens per image at image_size {size}")
            return [Usage(config.model, prompt[0] + image_in, 0)], None, assumptions
        per_image = tokens
        assumptions.append(f"one image at image_size {size}: {per_image:,} output image tokens")
    thinks = (config.model or "").lower().startswith("gemini-3")
    thoughts = _GEMINI_THOUGHTS if thinks else (0, 0)
    text_out = _GEMINI_TEXT_OUTPUT if "TEXT" in modalities else (0, 0)
    assumptions.append(f"{text_out[0]} to {text_out[1]} text tokens"
                       + (f" and {thoughts[0]} to {thoughts[1]} thought tokens" if thinks else "")
                       + " (the range seen in recorded replies)")

    def usage(k: int) -> Usage:
        return Usage(config.model, prompt[k] + image_in, per_image + text_out[k] + thoughts[k],
                     input_text_tokens=prompt[k], input_image_tokens=image_in or None,
                     output_text_tokens=text_out[k] or None, output_image_tokens=per_image or None)

    return [usage(0)], [usage(1)], assumptions


# --- reports -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostRow:
    """One line of a :class:`CostReport`: what one ``provider``/``model`` cost on one ``day`` (local date).

    ``usd`` is the known cost (``simulated_usd`` of it: the emulator's figures for real calls;
    ``unrecorded_usd`` of it: requests whose images are not in the history, e.g. ``--no-history`` cells,
    text-only answers and Python API calls). ``images`` counts the row's images in the history, ``unpriced``
    those of unknown cost (not in ``usd``); ``charged_usd`` is what budgets count for the unknown ones: their
    request's estimated high end, never shown as a cost."""

    day: str
    provider: str
    model: str
    images: int
    usd: float
    simulated_usd: float = 0.0
    unpriced: int = 0
    charged_usd: float = 0.0
    unrecorded_usd: float = 0.0


@dataclass(frozen=True)
class CostReport:
    """What a notebook spent, by day, provider and model (``History.cost()``, ``%imagine cost``).

    ``rows`` are oldest first. ``to_records()`` gives plain dicts (``pandas.DataFrame(report.to_records())``);
    ``by("provider")`` (or ``"model"``, ``"day"``) sums ``usd`` per value. ``budget_usd`` is the notebook's
    budget, if one is set; ``spent_usd`` is what it counts (known costs plus the charges for unknown ones) and
    ``held_usd`` what requests still in flight hold of it (in any kernel), ``held_jobs_usd`` of that what batch
    jobs whose results are not collected yet hold."""

    notebook: str
    rows: tuple[CostRow, ...] = ()
    budget_usd: float | None = None
    held_usd: float = 0.0
    held_jobs_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return sum(r.usd for r in self.rows)

    @property
    def simulated_usd(self) -> float:
        return sum(r.simulated_usd for r in self.rows)

    @property
    def charged_usd(self) -> float:
        return sum(r.charged_usd for r in self.rows)

    @property
    def spent_usd(self) -> float:
        """What a budget counts as spent: ``total_usd`` plus ``charged_usd``."""
        return self.total_usd + self.charged_usd

    @property
    def images(self) -> int:
        return sum(r.images for r in self.rows)

    @property
    def unpriced(self) -> int:
        return sum(r.unpriced for r in self.rows)

    def by(self, key: str) -> dict[str, float]:
        if key not in ("day", "provider", "model"):
            raise ValueError(f"CostReport.by() takes 'day', 'provider' or 'model', not {key!r}")
        totals: dict[str, float] = {}
        for row in self.rows:
            name = getattr(row, key)
            totals[name] = totals.get(name, 0.0) + row.usd
        return totals

    def to_records(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.rows]

    def summary(self) -> str:
        """One line: total, images, simulated part, unknown costs, budget left."""
        text = f"{format_usd(self.total_usd)} for {self.images} image(s) in notebook {self.notebook!r}"
        if self.simulated_usd:
            share = "all" if abs(self.simulated_usd - self.total_usd) < 1e-12 else format_usd(self.simulated_usd)
            text += f" ({share} simulated by the emulator)"
        unrecorded = sum(r.unrecorded_usd for r in self.rows)
        if unrecorded:
            text += f", {format_usd(unrecorded)} of it for requests whose images are not in the history"
        if self.unpriced:
            text += f"; {self.unpriced} image(s) of unknown cost"
            if self.charged_usd:
                text += f" (a budget counts {format_usd(self.charged_usd)} for them: their estimate's high end)"
        elif self.charged_usd:
            text += f"; requests of unknown cost counted at their estimate's high end: {format_usd(self.charged_usd)}"
        if self.budget_usd is not None:
            left = self.budget_usd - self.spent_usd - self.held_usd
            text += f"; budget {format_usd(self.budget_usd)}, {format_usd(left)} left"
            if self.held_usd:
                from ._budget import notebook_standing

                text += f" ({notebook_standing(self).held_text()})"  # type: ignore[union-attr]
        return text

    def __repr__(self) -> str:
        width = max([28, *(len(r.model) for r in self.rows)])
        header = f"{'day':<10}  {'provider':<8}  {'model':<{width}}  {'images':>6}  {'USD':>9}"
        lines = [self.summary(), header]
        for r in self.rows:
            flag = " sim" if r.simulated_usd else ""
            unknown = f" (+{r.unpriced} unknown)" if r.unpriced else ""
            lines.append(f"{r.day:<10}  {r.provider:<8}  {r.model:<{width}}  {r.images:>6}  "
                         f"{format_usd(r.usd):>9}{flag}{unknown}")
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        cells = "".join(
            f"<tr><td>{html.escape(r.day)}</td><td>{html.escape(r.provider)}</td><td>{html.escape(r.model)}</td>"
            f"<td style='text-align:right'>{r.images}</td><td style='text-align:right'>{format_usd(r.usd)}"
            f"{' <i>simulated</i>' if r.simulated_usd else ''}{f' (+{r.unpriced} unknown)' if r.unpriced else ''}"
            "</td></tr>" for r in self.rows)
        table = ("<table><tr><th>day</th><th>provider</th><th>model</th><th>images</th><th>USD</th></tr>"
                 f"{cells}</table>") if self.rows else ""
        body = f"<div><b>{html.escape(self.summary())}</b></div>{_svg_chart(self)}{table}"
        return {"text/plain": repr(self), "text/html": body}


def _svg_chart(report: CostReport, days: int = 31) -> str:
    """Spending per day as an inline SVG bar chart (simulated spending in a lighter shade)."""
    per_day: dict[str, tuple[float, float]] = {}
    for row in report.rows:
        real, simulated = per_day.get(row.day, (0.0, 0.0))
        per_day[row.day] = (real + row.usd - row.simulated_usd, simulated + row.simulated_usd)
    shown = sorted(per_day.items())[-days:]
    top = max((a + b for _, (a, b) in shown), default=0.0)
    if top <= 0:
        return ""
    bar, gap, height = 22, 6, 90
    width = len(shown) * (bar + gap) + gap
    parts = []
    for i, (day, (real, simulated)) in enumerate(shown):
        x = gap + i * (bar + gap)
        y = 10.0 + height
        for amount, colour in ((real, "#3b6ea8"), (simulated, "#9bbbe0")):
            h = height * amount / top
            if h > 0:
                y -= h
                parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{colour}">'
                             f"<title>{day}: {format_usd(amount)}{' simulated' if colour == '#9bbbe0' else ''}"
                             "</title></rect>")
        parts.append(f'<text x="{x + bar / 2}" y="{height + 24}" font-size="9" text-anchor="middle">{day[5:]}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
            f'aria-label="spending per day, highest {format_usd(top)}" style="font-family:sans-serif">'
            f'<text x="{gap}" y="9" font-size="9">{format_usd(top)}</text>{"".join(parts)}</svg>')

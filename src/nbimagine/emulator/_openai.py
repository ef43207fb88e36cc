"""OpenAI Responses API (``POST …/responses``) with the ``image_generation`` tool, also as Azure serves it.

Wire formats follow the live API recordings (see WIRE.md §1): the JSON ``Response`` object, the SSE event
order of an image call with partial images, the error envelope, and the server-side conversation state
(``previous_response_id`` / item references) that fails loudly when a response was not stored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .._cost import PARTIAL_IMAGE_TOKENS, default_image_model, openai_image_tokens, openai_input_image_tokens
from .._images import b64decode_any, image_size
from .._providers._inputs import is_animated_gif
from ..tools import BACKGROUNDS, COMPRESSIBLE_FORMATS, QUALITIES
from ..tools import OUTPUT_FORMATS as FORMATS
from ..tools import STANDARD_SIZES as TOOL_SIZES
from ._hostile import HOSTILE_IMAGES, hostile_image
from ._server import Answer, Fault, Request, State, _summarised

__all__ = ["handle", "handle_chat"]

STANDARD_SIZES = tuple(size for size in TOOL_SIZES if size != "auto")
AZURE_IMAGE_HEADER = "x-ms-oai-image-generation-deployment"
_IMAGES_TOKEN = re.compile(r"\[images:(\d+)\]")
_ANY_TOKEN = re.compile(r"\[(?:images|fault|error):[^\]]*\]")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Small enough that the SDK's retries finish in milliseconds in tests.
_DEFAULT_RETRY_MS = 10

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
                404: "invalid_request_error", 409: "invalid_request_error", 422: "invalid_request_error",
                429: "requests"}
_ERROR_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found", 429: "rate_limit_exceeded"}
_ERROR_MESSAGES = {
    400: "The request was invalid (emulated).",
    401: "Incorrect API key provided (emulated).",
    403: "You are not allowed to use this model (emulated).",
    404: "The requested resource was not found (emulated).",
    408: "The request timed out (emulated).",
    409: "Conflict (emulated).",
    429: "Rate limit reached for requests (emulated). Please try again shortly.",
}


class _Reject(Exception):
    """Raised while reading a request; becomes an error answer in the OpenAI envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.answer = _error(status, message, param=param, code=code, type_=type_, headers=headers, extra=extra)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error", headers: dict[str, str] | None = None,
           extra: dict[str, Any] | None = None) -> Answer:
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    body.update(extra or {})
    return Answer(status, headers=dict(headers or {}), json={"error": body})


def _http_fault(fault: Fault) -> Answer:
    status = fault.status or 500
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["retry-after-ms"] = str(round(fault.retry_after * 1000))
        headers["retry-after"] = str(max(0, round(fault.retry_after)))
    elif status == 429 or status >= 500:
        headers["retry-after-ms"] = str(_DEFAULT_RETRY_MS)
        headers["retry-after"] = "0"
    message = fault.message or _ERROR_MESSAGES.get(status, "The server had an error while processing your "
                                                           "request (emulated).")
    type_ = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _error(status, message, type_=type_, code=_ERROR_CODES.get(status), headers=headers)


def rate_limited(wait: float, limit: float) -> Answer:
    """The 429 of a requests-per-minute limit, with the headers OpenAI sends (rate-limits guide:
    ``x-ratelimit-limit-requests``, ``-remaining-requests``, ``-reset-requests``; the SDK reads
    ``retry-after-ms`` before ``retry-after``)."""
    headers = {"retry-after-ms": str(max(1, round(wait * 1000))), "retry-after": str(max(1, math.ceil(wait))),
               "x-ratelimit-limit-requests": f"{limit:g}", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": f"{round(wait * 1000)}ms"}
    message = (f"Rate limit reached for requests per min (RPM): Limit {limit:g}, Used {limit:g}, Requested 1. "
               f"Please try again in {round(wait * 1000)}ms (emulated).")
    return _error(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)


# -- reading the request -------------------------------------------------------------------------------
@dataclass
class _ImageTool:
    index: int
    raw: dict[str, Any]
    width: int
    height: int
    size: str
    quality: str
    background: str
    output_format: str
    compression: int
    partial_images: int
    action: str
    model: str = ""
    mask: bytes | None = None  # input_image_mask, decoded (a file_id mask cannot be read offline)

    @property
    def transparent(self) -> bool:
        return self.background == "transparent"

    def echo(self) -> dict[str, Any]:
        """The tool as the server reports it back: every default filled in."""
        return {"type": "image_generation", "background": self.raw.get("background", "auto"),
                "moderation": self.raw.get("moderation", "auto"), "n": 1,
                "output_compression": self.compression, "output_format": self.output_format,
                "quality": self.raw.get("quality", "auto"), "size": self.raw.get("size", "auto"),
                "model": self.model, **{k: v for k, v in self.raw.items() if k not in ("type",)}}


@dataclass
class _Parsed:
    model: str
    prompt: str  # text of the last user message (fault tokens included)
    base: bytes | None  # edit base from this request's input, or from previous_response_id
    previous: str | None
    store: bool
    stream: bool
    tool: _ImageTool | None
    use_tool: bool
    images: int
    body: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_size(value: Any, param: str) -> tuple[int, int, str]:
    if value in (None, "auto"):
        return 1024, 1024, "1024x1024"
    match = _SIZE.match(str(value))
    if match:
        w, h = int(match.group(1)), int(match.group(2))
        if str(value) in STANDARD_SIZES or (
            w > 0 and h > 0 and w % 16 == 0 and h % 16 == 0 and max(w, h) <= 3840 and max(w, h) <= 3 * min(w, h)
        ):
            return w, h, f"{w}x{h}"
    raise _Reject(400, f"Invalid value: '{value}'. Supported values are: '1024x1024', '1024x1536', '1536x1024', "
                       "and 'auto', or 'WxH' where both sides are multiples of 16, at most 3840 pixels, with an "
                       "aspect ratio of at most 3:1.", param=param, code="invalid_value")


def _image_tool(tools: Any) -> _ImageTool | None:
    if not isinstance(tools, list):
        return None
    for index, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type") == "image_generation"):
            continue
        p = f"tools[{index}]"
        width, height, size = _check_size(tool.get("size"), f"{p}.size")
        quality = tool.get("quality") or "auto"
        if quality not in QUALITIES:
            raise _Reject(400, f"Invalid value: '{quality}'. Supported values are: "
                               + ", ".join(f"'{q}'" for q in QUALITIES) + ".", param=f"{p}.quality",
                          code="invalid_value")
        background = tool.get("background") or "auto"
        if background not in BACKGROUNDS:
            raise _Reject(400, f"Invalid value: '{background}'. Supported values are: 'transparent', 'opaque', "
                               "and 'auto'.", param=f"{p}.background", code="invalid_value")
        fmt = tool.get("output_format") or "png"
        if fmt not in FORMATS:
            raise _Reject(400, f"Invalid value: '{fmt}'. The emulator supports 'png', 'jpeg' and 'webp'.",
                          param=f"{p}.output_format", code="invalid_value")
        if fmt == "jpeg" and background == "transparent":
            raise _Reject(400, "Transparent background is not supported for output format 'jpeg'. Use 'png' "
                               "or 'webp'.", param=f"{p}.background", code="invalid_value")
        compression = tool.get("output_compression", 100)
        if not isinstance(compression, int) or isinstance(compression, bool) or not 0 <= compression <= 100:
            raise _Reject(400, f"Invalid 'output_compression': {compression!r}. Expected an integer between 0 "
                               "and 100.", param=f"{p}.output_compression", code="invalid_value")
        partials = tool.get("partial_images") or 0
        if not isinstance(partials, int) or isinstance(partials, bool) or not 0 <= partials <= 3:
            raise _Reject(400, f"Invalid 'partial_images': {partials!r}. Expected an integer between 0 and 3.",
                          param=f"{p}.partial_images", code="invalid_value")
        mask = None
        raw_mask = tool.get("input_image_mask")
        if isinstance(raw_mask, dict) and raw_mask.get("image_url"):
            mask = _decode_data_url(str(raw_mask["image_url"]), f"{p}.input_image_mask.image_url")
        return _ImageTool(
            mask=mask,
            index=index, raw=tool, width=width, height=height, size=size,
            quality="medium" if quality == "auto" else quality,
            background="opaque" if background == "auto" else background,
            output_format=fmt, compression=compression, partial_images=partials,
            action=tool.get("action") or "auto", model=str(tool.get("model") or default_image_model()),
        )
    return None


def _decode_data_url(url: str, param: str) -> bytes:
    from . import _draw

    if url.startswith("data:"):
        _, _, payload = url.partition(",")
        try:
            data = b64decode_any(payload)
        except (binascii.Error, ValueError, UnicodeError) as exc:
            raise _Reject(400, "Invalid base64 image_url.", param=param, code="invalid_value") from exc
        if not _draw.is_image(data) or is_animated_gif(data):
            raise _Reject(400, "The image data you provided does not represent a valid image. Please check "
                               "your input and try again with one of the supported image formats: "
                               "['image/jpeg', 'image/png', 'image/gif', 'image/webp'].",
                          param=param, code="invalid_image_format")
        return data
    if urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        # Like the live API with a public URL: fetch it; a failure is its 400 invalid_image_url.
        from .._providers._fetch import fetch_image
        from ..errors import InputError

        try:
            return fetch_image(url).data or b""
        except InputError:
            raise _Reject(400, f"Error while downloading {url}.", param=param, code="invalid_image_url") from None
    # A remote URL cannot be fetched offline: stand in a deterministic picture derived from it.
    return _stand_in(f"image at {url}")


def _stand_in(label: str) -> bytes:
    from . import _draw

    return _draw.render(label, 512, 512)


def _stored_item(state: State, item_id: str) -> dict[str, Any] | None:
    with state.lock:
        return state.store.get(f"openai:item:{item_id}")


def _stored_response(state: State, resp_id: str) -> dict[str, Any] | None:
    with state.lock:
        return state.store.get(f"openai:resp:{resp_id}")


def _content_text_and_image(content: Any, param: str) -> tuple[str, bytes | None]:
    if isinstance(content, str):
        return content, None
    texts: list[str] = []
    image: bytes | None = None
    for j, part in enumerate(content if isinstance(content, list) else []):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text", "")))
        elif kind == "input_image" and image is None:
            if part.get("image_url"):
                image = _decode_data_url(str(part["image_url"]), f"{param}.content[{j}].image_url")
            elif part.get("file_id"):
                image = _stand_in(f"file {part['file_id']}")
            else:
                raise _Reject(400, "input_image needs either 'image_url' or 'file_id'.",
                              param=f"{param}.content[{j}]", code="missing_required_parameter")
    return "\n".join(texts), image


def _parse(req: Request, state: State) -> _Parsed:
    body = req.json
    if not isinstance(body, dict):
        raise _Reject(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                           "aren't using your HTTP library correctly.)")
    if not body.get("model"):
        raise _Reject(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    raw_input = body.get("input")
    prompt = ""
    base: bytes | None = None
    if isinstance(raw_input, str):
        prompt = raw_input
    elif isinstance(raw_input, list):
        for i, item in enumerate(raw_input):
            if not isinstance(item, dict):
                raise _Reject(400, f"Invalid type for 'input[{i}]': expected an object.", param=f"input[{i}]",
                              code="invalid_type")
            kind = item.get("type", "message")
            if kind == "message":
                text, image = _content_text_and_image(item.get("content"), f"input[{i}]")
                if item.get("role", "user") == "user":
                    prompt = text
                    if image is not None:
                        base = image
            elif kind == "image_generation_call":
                if item.get("result"):
                    base = _decode_data_url("data:;base64," + str(item["result"]), f"input[{i}].result")
                else:
                    base = _referenced_image(state, item.get("id"))
            elif kind == "item_reference":
                ref = _referenced_image(state, item.get("id"))
                if ref is not None:
                    base = ref
    elif raw_input is not None:
        raise _Reject(400, "Invalid type for 'input': expected a string or an array of input items.",
                      param="input", code="invalid_type")

    previous = body.get("previous_response_id")
    if previous is not None:
        stored = _stored_response(state, str(previous))
        if stored is None:
            raise _Reject(400, f"Previous response with id '{previous}' not found.",
                          param="previous_response_id", code="previous_response_not_found")
        if base is None:
            base = stored.get("last_image")

    tool = _image_tool(body.get("tools"))
    if tool is not None and base is not None:
        from .._image_models import rules_for
        from .._images import image_size
        from ._images_api import check_mask

        if tool.raw.get("size") in (None, "auto"):  # an edit keeps its input's shape, as the real models do
            tool.width, tool.height = rules_for(str(tool.raw.get("model") or "")).output_size("auto", image_size(base))
            tool.size = f"{tool.width}x{tool.height}"
        if tool.mask is not None:
            check_mask(tool.mask, image_size(base), param=f"tools[{tool.index}].input_image_mask")
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict) and choice.get("type") == "image_generation" and tool is None:
        # The live API's answer (observed): the forced tool must be in ``tools``.
        raise _Reject(400, "Tool choice 'image_generation' not found in 'tools' parameter.", param="tool_choice")
    use_tool = tool is not None and choice != "none"
    match = _IMAGES_TOKEN.search(prompt)
    images = max(0, min(int(match.group(1)), 8)) if match else 1
    return _Parsed(model=str(body["model"]), prompt=prompt, base=base, previous=previous,
                   store=body.get("store", True) is not False, stream=bool(body.get("stream")), tool=tool,
                   use_tool=use_tool, images=images, body=body)


def _referenced_image(state: State, item_id: Any) -> bytes | None:
    item = _stored_item(state, str(item_id)) if item_id else None
    if item is None:
        raise _Reject(400, f"Item with id '{item_id}' not found.", param="input")
    return item.get("image")


# -- building the answer -------------------------------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:18]}"


def _clean(prompt: str) -> str:
    return " ".join(_ANY_TOKEN.sub(" ", prompt).split())


def _revised(prompt: str, edit: bool) -> str:
    text = _clean(prompt) or "an abstract composition"
    return (f"Edit of the provided image: {text}" if edit else text) + ", rendered by the nbimagine emulator"


def _usage(prompt: str, text: str) -> dict[str, Any]:
    inp = 20 + len(prompt) // 4
    out = 10 + len(text) // 4
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}


def image_usage(model: str, quality: str, size: str, prompt: str, inputs: list[bytes], partial_images: int,
                images: int) -> dict[str, Any]:
    """A GPT image model's usage as the real APIs report it (Images API ``usage``, Responses
    ``tool_usage.image_gen``): the documented output image tokens for the model, size and quality (see
    ``nbimagine._cost``), 100 more per partial image, vision tokens per input image. A model or quality with no
    documented figures (``xhigh``, ``max``) is counted as GPT Image 2 at high."""
    rule = (openai_image_tokens(model, quality, size)
            or openai_image_tokens("gpt-image-2", "high" if quality in ("xhigh", "max") else quality, size))
    per_image = (rule[0] if rule else 0) + PARTIAL_IMAGE_TOKENS * partial_images
    text = 10 + len(prompt) // 4
    image_in = sum(openai_input_image_tokens(*(image_size(data) or (1024, 1024))) for data in inputs)
    out = per_image * images
    return {"input_tokens": text + image_in, "input_tokens_details": {"image_tokens": image_in, "text_tokens": text},
            "output_tokens": out, "output_tokens_details": {"image_tokens": out, "text_tokens": 0},
            "total_tokens": text + image_in + out}


def _no_usage(fault: Fault | None) -> bool:
    """The ``no_usage`` fault: the answer reports no token usage at all (the client cannot price it)."""
    return fault is not None and fault.name == "no_usage"


def _tool_usage(plan: _Plan, images: int) -> dict[str, Any] | None:
    """``tool_usage.image_gen``; none when no image was made."""
    if not images:
        return None
    tool = plan.tool
    base = [plan.parsed.base] if plan.parsed.base is not None else []
    return {"image_gen": image_usage(tool.model, tool.quality, tool.size, plan.parsed.prompt, base,
                                     tool.partial_images, images),
            "web_search": {"num_requests": 0}}


@dataclass
class _Plan:
    """Everything decided before the first byte is sent, so JSON and SSE answers agree."""

    parsed: _Parsed
    fault: Fault | None
    resp_id: str
    created: int
    calls: list[dict[str, Any]]  # image_generation_call items without their result yet
    text: str
    size: tuple[int, int, str] = (1024, 1024, "1024x1024")  # what is drawn: width, height, the size reported
    variant: int = 0  # which of the different drawings identical requests cycle through
    failed: bool = False

    @property
    def tool(self) -> _ImageTool:
        assert self.parsed.tool is not None
        return self.parsed.tool


def _plan(parsed: _Parsed, fault: Fault | None, variant: int = 0) -> _Plan:
    name = fault.name if fault else None
    prompt = _clean(parsed.prompt)
    calls: list[dict[str, Any]] = []
    size = (1024, 1024, "1024x1024")
    if parsed.use_tool and name not in ("text_only", "refusal", "incomplete"):
        tool = parsed.tool
        assert tool is not None
        edit = parsed.base is not None and tool.action != "generate"
        size = (tool.width, tool.height, tool.size)  # an edit's size auto already follows its input
        for _ in range(parsed.images):
            calls.append({"id": _new_id("ig"), "type": "image_generation_call", "status": "completed",
                          "action": "edit" if edit else "generate", "background": tool.background,
                          "output_format": tool.output_format, "quality": tool.quality, "size": size[2],
                          "revised_prompt": _revised(parsed.prompt, edit), "result": None})
    if name == "refusal":
        text = "I'm sorry, but I can't help with that request."
    elif name == "incomplete":
        text = "Let me think about how to draw"
    elif name in ("image_moderation", "image_failed") and calls:
        text = "I couldn't create that image."
    elif calls:
        n = len(calls)
        verb = "edited" if calls[0]["action"] == "edit" else "generated"
        text = f"Here is the {verb} image." if n == 1 else f"Here are the {n} {verb} images."
    else:
        text = f"This is the nbimagine emulator answering without an image: {prompt or '(empty prompt)'}"
    return _Plan(parsed, fault, _new_id("resp"), int(time.time()), calls, text, size, variant)


def _image_for(plan: _Plan, k: int, *, stage: float = 1.0) -> bytes:
    """The drawing of call ``k`` (same prompt → same bytes; several calls → different pictures)."""
    from . import _draw

    tool = plan.tool
    prompt = _clean(plan.parsed.prompt) or "an abstract composition"
    if len(plan.calls) > 1:
        prompt = f"{prompt} (image {k + 1} of {len(plan.calls)})"
    base = plan.parsed.base if plan.calls[k]["action"] == "edit" else None
    quality = tool.compression if tool.output_format in COMPRESSIBLE_FORMATS else None
    fmt = tool.output_format
    name = plan.fault.name if plan.fault else None
    if name == "mime_mismatch" and stage >= 1.0:  # output_format says one format, the bytes are another
        fmt = "png" if fmt == "jpeg" else "jpeg"

    width, height, _ = plan.size

    def draw(fmt: str) -> bytes:
        return _draw.render(prompt, width, height, fmt=fmt, transparent=tool.transparent and fmt != "jpeg",
                            base=base, stage=stage, quality=quality, mask=tool.mask if base is not None else None,
                            texture=name == "large_image", variant=plan.variant)

    if name in HOSTILE_IMAGES and stage >= 1.0:
        return hostile_image(name, draw)
    return draw(fmt)


def _call_fault(plan: _Plan, k: int) -> str | None:
    """The fault that applies to call ``k``: per-image failures hit only the last call, so that the
    images made before it survive (as when one of several calls fails on the real API)."""
    name = plan.fault.name if plan.fault else None
    if (name in ("image_moderation", "image_failed", "undecodable") or name in HOSTILE_IMAGES) \
            and k != len(plan.calls) - 1:
        return None
    return name


def _finish_call(plan: _Plan, k: int) -> tuple[dict[str, Any], bytes | None]:
    """Fill in call ``k`` (result, or failure per the fault); returns the item and the image bytes."""
    item = dict(plan.calls[k])
    name = _call_fault(plan, k)
    if name == "image_moderation":
        item.update(status="failed", result=None, error={
            "code": "moderation_blocked", "type": "image_generation_user_error", "param": None,
            "message": "Your request was rejected by the safety system (emulated image moderation).",
            "moderation_details": {"categories": ["violence"], "moderation_stage": "output"}})
        return item, None
    if name == "image_failed":
        item.update(status="failed", result=None, error={
            "code": "server_error", "type": "server_error", "param": None,
            "message": "The image could not be generated because of an internal error (emulated)."})
        return item, None
    if name == "undecodable":
        data = b"nbimagine emulator: these bytes are deliberately not an image"
        item["result"] = base64.b64encode(data).decode("ascii")
        return item, None
    data = _image_for(plan, k)
    item["result"] = base64.b64encode(data).decode("ascii")
    if name == "generating_result":  # seen in production: the final item still says "generating"
        item["status"] = "generating"
    return item, None if name in HOSTILE_IMAGES else data


def _message(plan: _Plan, msg_id: str, *, done: bool) -> dict[str, Any]:
    content = [_text_part(plan)] if done else []
    return {"id": msg_id, "type": "message", "role": "assistant",
            "status": "completed" if done else "in_progress", "content": content}


def _text_part(plan: _Plan, text: str | None = None) -> dict[str, Any]:
    text = plan.text if text is None else text
    if plan.fault and plan.fault.name == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _incomplete_reason(plan: _Plan) -> str:
    return (plan.fault.argument if plan.fault else None) or "max_output_tokens"


def _response(plan: _Plan, output: list[dict[str, Any]], *, status: str,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    parsed = plan.parsed
    body = parsed.body
    tools = [plan.tool.echo() if (plan.parsed.tool and i == plan.tool.index) else t
             for i, t in enumerate(body.get("tools") or [])]
    final = status in ("completed", "failed", "incomplete")
    images = sum(1 for item in output if item.get("type") == "image_generation_call" and item.get("result"))
    return {
        "id": plan.resp_id, "object": "response", "created_at": plan.created, "status": status,
        "background": body.get("background") is True,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error, "instructions": body.get("instructions"),
        "incomplete_details": {"reason": _incomplete_reason(plan)} if status == "incomplete" else None,
        "max_output_tokens": body.get("max_output_tokens"), "max_tool_calls": None, "model": parsed.model,
        "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": parsed.previous, "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None}, "safety_identifier": None, "service_tier": "default",
        "store": parsed.store, "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"), "tools": tools, "top_logprobs": 0, "top_p": 1.0,
        "truncation": "disabled",
        # no_usage: an answer without usage, as some proxies and OpenAI-compatible gateways send.
        "usage": _usage(parsed.prompt, plan.text) if final and not _no_usage(plan.fault) else None,
        "tool_usage": _tool_usage(plan, images) if final and not _no_usage(plan.fault) else None,
        "user": None, "metadata": body.get("metadata") or {},
        # Foundry echoes the agent that answered (an extra key to the openai SDK, which keeps it).
        **({"agent_reference": body["agent_reference"]} if "agent_reference" in body else {}),
    }


def _remember(state: State, plan: _Plan, output: list[dict[str, Any]], images: list[bytes | None]) -> None:
    """Server-side conversation state; only for ``store`` true, like the real API."""
    if not plan.parsed.store:
        return
    last = next((img for img in reversed(images) if img is not None), None)
    if last is None:  # a turn without a new image keeps the conversation's previous one
        last = plan.parsed.base
    # The stored response keeps what answering it again needs, not the request's input (20 MB bodies were
    # all kept alive here).
    body = {k: _summarised(v) for k, v in plan.parsed.body.items() if k != "input"}
    kept = dataclasses.replace(plan, parsed=dataclasses.replace(plan.parsed, body=body))
    with state.lock:
        state.store[f"openai:resp:{plan.resp_id}"] = {"output": output, "last_image": last, "plan": kept}
        for i, item in enumerate(output):
            image = images[i] if i < len(images) else None  # images line up with the leading image calls
            state.store[f"openai:item:{item['id']}"] = {"item": item, "image": image}


# -- JSON ---------------------------------------------------------------------------------------------
def _json_answer(plan: _Plan, state: State) -> Answer:
    name = plan.fault.name if plan.fault else None
    if name in ("stream_error", "stream_error_nested"):
        error = {"code": "server_error", "message": _SERVER_ERROR}
        return Answer(json=_response(plan, [], status="failed", error=error))
    output: list[dict[str, Any]] = []
    images: list[bytes | None] = []
    for k in range(len(plan.calls)):
        item, data = _finish_call(plan, k)
        output.append(item)
        images.append(data)
    output.append(_message(plan, _new_id("msg"), done=True))
    status = {"incomplete": "incomplete", "no_completed": "in_progress"}.get(name or "", "completed")
    body = _response(plan, output, status=status)
    _remember(state, plan, output, images)
    return Answer(json=body, break_after=1 if name == "broken_stream" else None)


_SERVER_ERROR = "The server had an error while processing your request (emulated)."


# -- SSE ----------------------------------------------------------------------------------------------
def _frame(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _events(plan: _Plan, state: State) -> Iterator[bytes]:
    for seq, payload in enumerate(event_payloads(plan, state)):
        yield _frame(payload["type"], {"type": payload["type"], "sequence_number": seq, **payload})


def event_payloads(plan: _Plan, state: State) -> Iterator[dict[str, Any]]:
    """The stream's events in order, without sequence numbers (``_events`` and background jobs number them)."""

    def event(kind: str, **payload: Any) -> dict[str, Any]:
        return {"type": kind, **payload}

    name = plan.fault.name if plan.fault else None
    yield event("response.created", response=_response(plan, [], status="in_progress"))
    yield event("response.in_progress", response=_response(plan, [], status="in_progress"))
    output: list[dict[str, Any]] = []
    images: list[bytes | None] = []
    for k, call in enumerate(plan.calls):
        idx = len(output)
        ig = call["id"]
        added = {"id": ig, "type": "image_generation_call", "status": "in_progress", "result": None}
        yield event("response.output_item.added", output_index=idx, item=added)
        yield event("response.image_generation_call.in_progress", output_index=idx, item_id=ig)
        yield event("response.image_generation_call.generating", output_index=idx, item_id=ig)
        if name in ("stream_error", "stream_error_nested"):
            yield from _stream_failure(plan, output, event)
            return
        tool = plan.tool
        failing = _call_fault(plan, k) in ("image_moderation", "image_failed")
        for p in range(0 if failing else tool.partial_images):
            stage = (p + 1) / (tool.partial_images + 1)
            partial = base64.b64encode(_image_for(plan, k, stage=stage)).decode("ascii")
            # partial_index_not_int: the index as a string, a shape the SDK passes through unvalidated.
            index: Any = f"#{p}" if name == "partial_index_not_int" else p
            yield event("response.image_generation_call.partial_image", output_index=idx, item_id=ig,
                        partial_image_index=index, partial_image_b64=partial, size=plan.size[2],
                        quality=tool.quality,
                        background=tool.background, output_format=tool.output_format)
        item, data = _finish_call(plan, k)
        if item["status"] == "completed":
            yield event("response.image_generation_call.completed", output_index=idx, item_id=ig)
        yield event("response.output_item.done", output_index=idx, item=item)
        output.append(item)
        images.append(data)

    if name in ("stream_error", "stream_error_nested"):  # no image call to interrupt: fail right after the start
        yield from _stream_failure(plan, output, event)
        return

    idx = len(output)
    msg_id = _new_id("msg")
    refusal = name == "refusal"
    kind = "refusal" if refusal else "output_text"
    yield event("response.output_item.added", output_index=idx, item=_message(plan, msg_id, done=False))
    where = {"item_id": msg_id, "output_index": idx, "content_index": 0}
    yield event("response.content_part.added", **where, part=_text_part(plan, ""))
    for delta in re.findall(r"\S+\s*", plan.text):
        yield event(f"response.{kind}.delta", **where, delta=delta, **({} if refusal else {"logprobs": []}))
    if refusal:
        yield event("response.refusal.done", **where, refusal=plan.text)
    else:
        yield event("response.output_text.done", **where, text=plan.text, logprobs=[])
    yield event("response.content_part.done", **where, part=_text_part(plan))
    message = _message(plan, msg_id, done=True)
    yield event("response.output_item.done", output_index=idx, item=message)
    output.append(message)
    _remember(state, plan, output, images)
    if name == "no_completed":
        return  # the stream just ends, as production streams sometimes do
    if name == "incomplete":
        yield event("response.incomplete", response=_response(plan, output, status="incomplete"))
        return
    yield event("response.completed", response=_response(plan, output, status="completed"))


def _stream_failure(plan: _Plan, output: list[dict[str, Any]], event: Any) -> Iterator[bytes]:
    """The in-stream error (flat as the SDK types it, or nested as the live API sent it), then response.failed."""
    if plan.fault and plan.fault.name == "stream_error_nested":
        yield event("error", error={"type": "server_error", "code": "server_error", "message": _SERVER_ERROR,
                                    "param": None})
    else:
        yield event("error", code="server_error", message=_SERVER_ERROR, param=None)
    yield event("response.failed", response=_response(
        plan, output, status="failed", error={"code": "server_error", "message": _SERVER_ERROR}))


def _sse_answer(plan: _Plan, state: State) -> Answer:
    break_after = None
    if plan.fault and plan.fault.name == "broken_stream":
        # created, in_progress, item added, .in_progress, .generating (+ the first partial image)
        break_after = 5 + (1 if plan.calls and plan.tool.partial_images else 0) if plan.calls else 3
    return Answer(sse=_events(plan, state), break_after=break_after)


# -- entry point --------------------------------------------------------------------------------------
def _authorised(req: Request) -> bool:
    auth = req.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return True
    return bool(req.headers.get("api-key", "").strip())


def refused_post(req: Request) -> Answer | None:
    """The answer to a request that is not an authorised POST (405, 401), else ``None``."""
    if req.method != "POST":
        return _error(405, f"Method {req.method} is not supported by the emulator on {req.path}.")
    if not _authorised(req):
        return _error(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                           "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the api-key "
                           "header for Azure.", code="invalid_api_key")
    return None


def moderation_blocked(fault: Fault, req: Request) -> Answer:
    """The input moderation refusal (HTTP 400 ``moderation_blocked``), as image requests get it."""
    return _error(400, fault.message or "Your request was rejected by the safety system. If you believe this "
                  f"is an error, contact us at help.openai.com and include the request ID {req.request_id}.",
                  type_="image_generation_user_error", code="moderation_blocked",
                  extra={"moderation_details": {"moderation_stage": "input", "categories": ["violence"]}})


def handle(req: Request, state: State) -> Answer:
    refused = refused_post(req)
    if refused is not None:
        return refused
    body = req.json if isinstance(req.json, dict) else {}
    # The fault is read before validation so that an injected HTTP error wins over everything else.
    route = "background" if body.get("background") is True else "responses"
    fault = state.fault("openai", _peek_prompt(body.get("input")), route=route)
    if fault and fault.name == "http":
        return _http_fault(fault)
    try:
        parsed = _parse(req, state)
        if parsed.tool is not None and "/openai/" in req.path and not req.headers.get(AZURE_IMAGE_HEADER):
            raise _Reject(400, f"Image generation requires the '{AZURE_IMAGE_HEADER}' header, set to the name of "
                               "your image model deployment (e.g. gpt-image-1).", param=AZURE_IMAGE_HEADER,
                          code="invalid_request")
    except _Reject as exc:
        return exc.answer
    deployment = req.headers.get(AZURE_IMAGE_HEADER)
    if parsed.tool is not None and deployment and not parsed.tool.raw.get("model"):
        # Azure runs the image tool on that deployment; deployments are usually named after their model.
        parsed.tool = dataclasses.replace(parsed.tool, model=deployment)
    if fault and fault.name == "moderation":
        return moderation_blocked(fault, req)
    # Identical requests (-n 4 sends four) get different drawings, as real variants differ.
    plan = _plan(parsed, fault, state.variant("openai:" + hashlib.sha256(req.body).hexdigest()))
    if body.get("background") is True:
        from . import _background

        return _background.create(plan, state)
    return _sse_answer(plan, state) if parsed.stream else _json_answer(plan, state)


def _peek_prompt(raw_input: Any) -> str:
    """The last user text, read leniently (faults are decided before the request is validated)."""
    if isinstance(raw_input, str):
        return raw_input
    text = ""
    for item in raw_input if isinstance(raw_input, list) else []:
        if isinstance(item, dict) and item.get("role", "user") == "user" and "content" in item:
            content = item["content"]
            if isinstance(content, str):
                text = content
            elif isinstance(content, list):
                text = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return text


# -- Chat Completions (text only) ------------------------------------------------------------------------
def handle_chat(req: Request, state: State) -> Answer:
    """``POST …/chat/completions``: a deterministic text answer (the image tool does not exist there)."""
    if req.method != "POST":
        return _error(405, f"Method {req.method} is not supported by the emulator on {req.path}.")
    if not _authorised(req):
        return _error(401, "You didn't provide an API key.", code="invalid_api_key")
    body = req.json if isinstance(req.json, dict) else None
    messages = body.get("messages") if body else None
    if not body or not isinstance(messages, list) or not messages:
        return _error(400, "Missing required parameter: 'messages'.", param="messages",
                      code="missing_required_parameter")
    prompt = ""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            prompt = content if isinstance(content, str) else " ".join(
                str(p.get("text", "")) for p in content or [] if isinstance(p, dict))
    fault = state.fault("openai", prompt, route="chat")
    if fault and fault.name == "http":
        return _http_fault(fault)
    text = f"This is the nbimagine emulator answering: {_clean(prompt) or '(empty prompt)'}"
    chat_id, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), str(body.get("model", ""))
    usage = {"prompt_tokens": 10 + len(prompt) // 4, "completion_tokens": 5 + len(text) // 4}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    head = {"id": chat_id, "created": created, "model": model, "system_fingerprint": "fp_emulator"}
    if not body.get("stream"):
        return Answer(json={**head, "object": "chat.completion", "usage": usage, "choices": [{
            "index": 0, "finish_reason": "stop", "logprobs": None,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []}}]})

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        payload = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def frames() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for delta in re.findall(r"\S+\s*", text):
            yield chunk({"content": delta}, None)
        yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            payload = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            yield b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return Answer(sse=frames(), break_after=3 if fault and fault.name == "broken_stream" else None)

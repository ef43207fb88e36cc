"""Gemini Developer API and Vertex AI ``generateContent`` / ``streamGenerateContent?alt=sse``.

Wire format as the real API (see ``WIRE.md`` section 3): camelCase answers, status exactly 200 on
success, strict SSE framing (only ``data: `` lines and blank lines), errors in Google's
``{"error": {code, message, status, details}}`` envelope. Requests are read in either key casing
(``mimeType``/``mime_type`` ...) and either base64 alphabet.

Behaviour:

* ``generationConfig.responseModalities`` (default TEXT + IMAGE): IMAGE draws an image, TEXT adds text.
* ``imageConfig.aspectRatio`` / ``imageSize``: real pixel sizes per ratio and tier (Gemini 3 tables
  for models named ``gemini-3*``, Gemini 2.5 Flash Image otherwise). Vertex ``imageOutputOptions``
  (mime type, compression quality) is honoured; on the Developer API it is a 400 as on the real one.
* Default format: JPEG for ``gemini-3*`` models, PNG otherwise.
* ``thinkingConfig.includeThoughts``: a thought text part and a thought image (a draft) come first.
* Gemini 3 models sign the first text part and every image part (``thoughtSignature``, an HMAC of the
  part's content); a follow-up whose model turn has an image part without its signature, or with a
  wrong one, is rejected with 400 INVALID_ARGUMENT like the real API.
* Edits: an inline image in the last user turn (else the latest model image in the history) is the
  base of the drawing.
* Faults: see ``_faults.py`` (``finish:REASON`` for any finish reason with its ``finishMessage``,
  ``prompt_blocked[:REASON]``, the safety reasons by name, ``http``, ``broken_stream``, ...).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from .._cost import gemini_image_tokens, gemini_input_image_tokens
from .._images import b64decode_any, image_size, sniff_media_type
from .._providers._inputs import GEMINI, image_count_problem
from ..config import GEMINI_MODALITIES, GEMINI_NEWEST_ONLY_RATIOS
from . import _draw
from ._hostile import HOSTILE_IMAGES, hostile_image
from ._server import VARIANTS, Answer, Fault, Request, State

__all__ = ["handle"]

_PATH = re.compile(
    r"^(?P<prefix>/.*)?/(?P<version>v1|v1beta|v1beta1|v1alpha)/"
    r"(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?"
    r"(?:publishers/(?P<publisher>[^/]+)/)?models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$"
)

STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
    501: "NOT_IMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other "
         "valid authentication credential.",
    403: "The caller does not have permission",
    404: "models/unknown is not found for API version v1beta, or is not supported for generateContent.",
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred. Please retry or report in "
         "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "The request timed out. Please try again.",
}

ASPECT_RATIOS_3 = {  # Gemini 3 image models, 1K tier (2K and 4K are 2x and 4x)
    "1:1": (1024, 1024), "2:3": (848, 1264), "3:2": (1264, 848), "3:4": (896, 1200), "4:3": (1200, 896),
    "4:5": (928, 1152), "5:4": (1152, 928), "9:16": (768, 1376), "16:9": (1376, 768), "21:9": (1584, 672),
    "1:4": (512, 2064), "4:1": (2064, 512), "1:8": (352, 2928), "8:1": (2928, 352),
}
ASPECT_RATIOS_25 = {  # Gemini 2.5 Flash Image (1K only)
    "1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
    "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672),
}
SIZE_TIERS = {"512": 0.5, "1K": 1, "2K": 2, "4K": 4}
_ONLY_31 = set(GEMINI_NEWEST_ONLY_RATIOS)
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
# Faults named after a finish reason (see _faults.py): the candidate ends with that reason.
_FINISH_FAULTS = {
    "image_safety": "IMAGE_SAFETY", "safety": "SAFETY", "prohibited_content": "PROHIBITED_CONTENT",
    "image_prohibited_content": "IMAGE_PROHIBITED_CONTENT", "blocklist": "BLOCKLIST", "spii": "SPII",
    "recitation": "RECITATION", "image_recitation": "IMAGE_RECITATION", "image_other": "IMAGE_OTHER",
    "model_armor": "MODEL_ARMOR", "no_image": "NO_IMAGE",
}
# finishMessage per reason, worded like the live API's (image reasons from recorded answers; the others
# follow the same pattern). Every reason that stops an image carries one, as in production.
_POLICY = ("was filtered out because it violated Google's Generative AI Prohibited Use policy. You will not be "
           "charged for blocked images. Try rephrasing the prompt. If you think this was an error, send feedback.")
_FINISH_MESSAGES = {
    "IMAGE_SAFETY": f"Unable to show the generated image. The image {_POLICY}",
    "IMAGE_PROHIBITED_CONTENT": f"Unable to show the generated image. The image {_POLICY}",
    "IMAGE_RECITATION": "Unable to show the generated image. The image was filtered out because it is too similar "
                        "to existing content. You will not be charged for blocked images.",
    "IMAGE_OTHER": "Unable to show the generated image. The model could not generate the image based on the prompt "
                   "provided. You will not be charged for blocked images. Try rephrasing the prompt.",
    "NO_IMAGE": "Unable to generate an image for this request: the model answered without one. Try asking for an "
                "image explicitly.",
    "MODEL_ARMOR": "Blocked by Model Armor Floor Setting: The prompt violated Responsible AI Safety settings "
                   "(Dangerous), Prompt Injection and Jailbreak filters.",
    "SAFETY": f"The answer {_POLICY}",
    "PROHIBITED_CONTENT": f"The answer {_POLICY}",
    "BLOCKLIST": "The answer was stopped because it contains terms from the terminology blocklist.",
    "SPII": "The answer was stopped because it contains sensitive personally identifiable information.",
    "RECITATION": "The answer was stopped because it recites existing content too closely.",
}
_BLOCK_MESSAGES = {
    "MODEL_ARMOR": "Blocked by Model Armor Floor Setting: The prompt violated Responsible AI Safety settings "
                   "(Dangerous), Prompt Injection and Jailbreak filters.",
    "PROHIBITED_CONTENT": "The prompt was blocked because it may contain prohibited content.",
}


class _Invalid(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- entry point --------------------------------------------------------------------------------------


def handle(request: Request, state: State) -> Answer:
    match = _PATH.match(request.path.rstrip("/"))
    if match is None or request.method != "POST":
        return error(404, f"The emulator has no Gemini route {request.method} {request.path}")
    vertex = match["version"] == "v1beta1" or bool(match["project"] or match["publisher"])
    streaming = match["method"] == "streamGenerateContent"
    model = match["model"]

    auth = request.headers.get("x-goog-api-key") or _bearer(request.headers.get("authorization", ""))
    if not auth:
        if vertex:
            return error(401, _MESSAGES[401])
        return error(403, "Method doesn't allow unregistered callers (callers without established identity). "
                          "Please use API Key or other form of API consumer identity to call this API.")
    if len(request.body) > GEMINI.max_inline_bytes:
        return error(400, f"Request payload size exceeds the limit: {GEMINI.max_inline_bytes} bytes.")
    try:
        turn = _parse(request.json, model=model, vertex=vertex)
    except _Invalid as exc:
        return error(exc.status, exc.message)

    # Real answers differ from call to call unless a seed is given: identical requests get other drawings.
    turn.variant = turn.seed % VARIANTS if turn.seed is not None else state.variant(
        "gemini:" + hashlib.sha256(request.body).hexdigest())
    fault = state.fault("gemini", turn.prompt, route="gemini")
    if fault is not None and fault.name == "http":
        return _http_fault(fault)
    try:
        _check_signatures(turn, state, model)
    except _Invalid as exc:
        return error(exc.status, exc.message)

    response_id = _response_id(request, state)
    chunks = _answer(turn, state, model=model, vertex=vertex, fault=fault, response_id=response_id)
    broken = fault is not None and fault.name == "broken_stream"
    if streaming:
        if request.query.get("alt") != "sse":
            # Without alt=sse the real API streams a JSON array; the SDK always asks for SSE.
            return Answer(json=list(chunks))
        frames = _sse(chunks, stream_error=fault is not None and fault.name == "stream_error")
        return Answer(sse=frames, break_after=1 if broken else None,
                      headers={"content-type": "text/event-stream"})
    return Answer(json=_merge(chunks), break_after=0 if broken else None)


def error(status: int, message: str, details: list[Any] | None = None,
          headers: dict[str, str] | None = None) -> Answer:
    body = {"error": {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}}
    if details:
        body["error"]["details"] = details
    return Answer(status, headers=headers or {}, json=body)


def _bearer(value: str) -> str:
    return value[7:].strip() if value.lower().startswith("bearer ") else ""


def _http_fault(fault: Fault) -> Answer:
    status = fault.status or 500
    message = fault.message or _MESSAGES.get(status, f"HTTP {status} from the emulator")
    details: list[Any] = []
    headers: dict[str, str] = {}
    if status == 429:
        delay = fault.retry_after if fault.retry_after is not None else 0.0
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                             "quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay:g}s"},
        ]
        headers["retry-after"] = f"{delay:g}"
    elif fault.retry_after is not None:
        headers["retry-after"] = f"{fault.retry_after:g}"
    return error(status, message, details, headers)


def rate_limited(wait: float, limit: float) -> Answer:
    """The 429 of a requests-per-minute quota: QuotaFailure (with ``quotaValue``, the limit) and
    RetryInfo (``retryDelay``, a protobuf Duration), as the Gemini API details a RESOURCE_EXHAUSTED."""
    details = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                         "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                         "quotaValue": f"{limit:g}"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait:.3f}s"},
    ]
    message = (f"You exceeded your current quota ({limit:g} requests per minute), please retry in {wait:.3f}s "
               "(emulated).")
    return error(429, message, details)


# --- request parsing ----------------------------------------------------------------------------------


def _get(obj: Any, camel: str, default: Any = None) -> Any:
    """``obj[camel]`` or ``obj[snake_case]`` (Google's JSON parser accepts both)."""
    if not isinstance(obj, dict):
        return default
    if camel in obj:
        return obj[camel]
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return obj.get(snake, default)


def _b64decode_strict(text: Any) -> bytes:
    """``b64decode_any``, but failing like Google's parser on what is not base64 (it would skip the junk)."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*[A-Za-z0-9+/_\-]*=*\s*", text):
        raise binascii.Error("not base64")
    return b64decode_any(text)


class _Turn:
    """The parts of a request the emulator acts on."""

    def __init__(self) -> None:
        # Model-turn parts as (content index, part index, part, image bytes or None, signature or None).
        self.model_parts: list[tuple[int, int, dict[str, Any], bytes | None, bytes | None]] = []
        self.prompt = ""
        self.modalities: list[str] = ["TEXT", "IMAGE"]
        self.aspect_ratio: str | None = None
        self.image_size: str = "1K"
        self.mime_type: str | None = None
        self.quality: int | None = None
        self.thoughts = False
        self.base: bytes | None = None  # image to edit
        self.seed: int | None = None  # generationConfig.seed: the same seed draws the same image
        self.variant = 0
        self.input_images = 0


# Accepted image types whose bytes the emulator cannot check (HEIC/HEIF): taken as they are declared.
_UNSNIFFED = frozenset({"image/heic", "image/heif"})


def _parse(body: Any, *, model: str, vertex: bool) -> _Turn:
    if not isinstance(body, dict):
        raise _Invalid(400, "Invalid JSON payload received. Expected a JSON object.")
    turn = _Turn()
    contents = _get(body, "contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid(400, "* GenerateContentRequest.contents: contents is not specified")
    last_user_images: list[bytes] = []
    history_image: bytes | None = None
    for ci, content in enumerate(contents):
        if not isinstance(content, dict):
            raise _Invalid(400, f"Invalid value at 'contents[{ci}]': expected an object")
        role = content.get("role", "user")
        if role not in ("user", "model"):
            raise _Invalid(400, f"Please use a valid role: user, model. (contents[{ci}].role = {role!r})")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise _Invalid(400, f"* GenerateContentRequest.contents[{ci}].parts: contents.parts must not be empty.")
        texts, images, file_images = [], [], 0
        for pi, part in enumerate(parts):
            data: bytes | None = None
            sig: bytes | None = None
            if not isinstance(part, dict):
                raise _Invalid(400, f"Invalid value at 'contents[{ci}].parts[{pi}]': expected an object")
            where = f"contents[{ci}].parts[{pi}]"
            blob = _get(part, "inlineData")
            if blob is not None:
                mime = _get(blob, "mimeType")
                if not mime:
                    raise _Invalid(400, f"* GenerateContentRequest.{where}.inline_data.mime_type: "
                                        "required field is not set")
                try:
                    data = _b64decode_strict(_get(blob, "data"))
                except (binascii.Error, ValueError):
                    raise _Invalid(400, f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), "
                                        "Base64 decoding failed") from None
                if mime.startswith("image/") and mime not in GEMINI.media_types:
                    raise _Invalid(400, f"Unsupported MIME type: {mime}")  # what the live API answers for GIF
                if mime.startswith("image/") and sniff_media_type(data) is not None and not _draw.is_image(data):
                    raise _Invalid(400, "Unable to process input image. Please retry or report in "
                                        "https://developers.generativeai.google/guide/troubleshooting")
                if mime.startswith("image/") and sniff_media_type(data) is None and mime not in _UNSNIFFED:
                    raise _Invalid(400, "Unable to process input image. Please retry or report in "
                                        "https://developers.generativeai.google/guide/troubleshooting")
                if not part.get("thought"):
                    images.append(data)
            file_data = _get(part, "fileData")
            if file_data is not None and not _get(file_data, "fileUri"):
                raise _Invalid(400, f"* GenerateContentRequest.{where}.file_data.file_uri: required field is not set")
            if file_data is not None and str(_get(file_data, "mimeType") or "image/").startswith("image/"):
                file_images += 1
            signature = _get(part, "thoughtSignature")
            if signature is not None:
                try:
                    sig = _b64decode_strict(signature)
                except (binascii.Error, ValueError):
                    raise _Invalid(400, f"Invalid value at '{where}.thought_signature' (TYPE_BYTES), "
                                        "Base64 decoding failed") from None
            text = part.get("text")
            if isinstance(text, str) and not part.get("thought"):
                texts.append(text)
            if role == "model":
                turn.model_parts.append((ci, pi, part, data, sig))
        if role == "user":
            turn.prompt = " ".join(t for t in texts if t)
            last_user_images = images
            turn.input_images = len(images) + file_images
        elif images:
            history_image = images[-1]
    turn.base = last_user_images[0] if last_user_images else history_image
    problem = image_count_problem(model, turn.input_images, vertex=vertex)
    if problem is not None and problem[1]:
        # The status and envelope are the API's; the live wording is not documented, so the text is ours.
        raise _Invalid(400, problem[0])

    config = _get(body, "generationConfig") or {}
    modalities = _get(config, "responseModalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not modalities:
            raise _Invalid(400, "Invalid value at 'generation_config.response_modalities': expected a list")
        for value in modalities:
            if value not in GEMINI_MODALITIES:
                raise _Invalid(400, f"Invalid value at 'generation_config.response_modalities[0]' "
                                    f"(type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig."
                                    f"Modality), \"{value}\"")
        if "AUDIO" in modalities:
            raise _Invalid(400, "Model does not support the requested response modalities: AUDIO")
        turn.modalities = list(modalities)
    seed = _get(config, "seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        turn.seed = seed
    thinking = _get(config, "thinkingConfig") or {}
    turn.thoughts = bool(_get(thinking, "includeThoughts"))

    image_config = _get(config, "imageConfig") or {}
    ratio = _get(image_config, "aspectRatio")
    if ratio is not None:
        table = ASPECT_RATIOS_3 if "gemini-3" in model else ASPECT_RATIOS_25
        if ratio not in table or (ratio in _ONLY_31 and "3.1" not in model):
            raise _Invalid(400, f"Unsupported aspect ratio {ratio!r} for model {model}. Supported: "
                                f"{', '.join(r for r in table if r not in _ONLY_31 or '3.1' in model)}.")
        turn.aspect_ratio = ratio
    size = _get(image_config, "imageSize")
    if size is not None:
        if size not in SIZE_TIERS:
            raise _Invalid(400, f"Unsupported image size {size!r}. Supported: 1K, 2K, 4K "
                                "(and 512 on Gemini 3.1 Flash Image).")
        turn.image_size = size
    for vertex_only in ("personGeneration", "prominentPeople", "imageOutputOptions"):
        if _get(image_config, vertex_only) is not None and not vertex:
            snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), vertex_only)
            raise _Invalid(400, f"Invalid JSON payload received. Unknown name \"{vertex_only}\" at "
                                f"'generation_config.image_config': Cannot find field. ({snake} is Vertex AI only)")
    options = _get(image_config, "imageOutputOptions") or {}
    mime = _get(options, "mimeType")
    if mime is not None:
        if mime not in _FORMATS:
            raise _Invalid(400, f"Unsupported output mime type {mime!r}. Supported: {', '.join(_FORMATS)}.")
        turn.mime_type = mime
    quality = _get(options, "compressionQuality")
    if quality is not None:
        if not isinstance(quality, int) or not 0 <= quality <= 100:
            raise _Invalid(400, "compression_quality must be between 0 and 100.")
        turn.quality = quality
    return turn


# --- thought signatures -------------------------------------------------------------------------------


def signature(state: State, kind: str, content: bytes) -> bytes:
    """The signature the emulator puts on a part: an HMAC of the part's content."""
    return b"emu-sig\x00" + hmac.new(state.secret, kind.encode() + b"\x00" + content, hashlib.sha256).digest()


def _check_signatures(turn: _Turn, state: State, model: str) -> None:
    if "gemini-3" not in model:
        return
    for ci, pi, part, data, given in turn.model_parts:
        if part.get("thought"):
            continue
        if data is not None:
            if given is None:
                raise _Invalid(400, f"Image part is missing a thought_signature in content position {ci + 1}, "
                                    f"part position {pi + 1}. Please refer to "
                                    "https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
            expected = signature(state, "image", data)
        elif isinstance(part.get("text"), str) and given is not None:
            expected = signature(state, "text", part["text"].encode())
        else:
            continue
        if not hmac.compare_digest(given, expected):
            raise _Invalid(400, f"Corrupted thought signature in content position {ci + 1}, part position {pi + 1}.")


# --- answer -------------------------------------------------------------------------------------------


def _response_id(request: Request, state: State) -> str:
    digest = hashlib.sha256(state.secret + request.request_id.encode()).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode()


def _pixels(turn: _Turn, model: str) -> tuple[int, int]:
    gemini3 = "gemini-3" in model
    table = ASPECT_RATIOS_3 if gemini3 else ASPECT_RATIOS_25
    ratio = turn.aspect_ratio
    if ratio is None and turn.base is not None:  # edits keep the input's shape, as the real models do
        size = image_size(turn.base)
        if size:
            target = size[0] / size[1]
            ratio = min(table, key=lambda r: abs(table[r][0] / table[r][1] - target))
    width, height = table[ratio or "1:1"]
    scale = SIZE_TIERS[turn.image_size]
    return int(width * scale), int(height * scale)


def _answer(turn: _Turn, state: State, *, model: str, vertex: bool, fault: Fault | None,
            response_id: str) -> Iterator[dict[str, Any]]:
    """The answer as the chunks a stream would carry (a JSON answer merges them)."""
    gemini3 = "gemini-3" in model
    name = fault.name if fault is not None else ""
    # Usage as the real API counts it, per model and size tier (figures and sources in nbimagine._cost).
    text_in = max(1, len(turn.prompt.split()))
    dims = image_size(turn.base) if turn.base is not None else None
    image_in = turn.input_images * (gemini_input_image_tokens(model, *(dims or (1024, 1024))) or 258)
    prompt_tokens = text_in + image_in
    details = [{"modality": m, "tokenCount": n} for m, n in (("TEXT", text_in), ("IMAGE", image_in)) if n]
    usage: dict[str, Any] = {"promptTokenCount": prompt_tokens, "promptTokensDetails": details}
    common: dict[str, Any] = {"modelVersion": model, "responseId": response_id}
    if vertex:
        common["createTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

    def chunk(parts: list[dict[str, Any]] | None, finish: str | None = None, message: str | None = None,
              candidates_tokens: int = 0, thoughts_tokens: int = 0,
              details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"} if parts else {}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        if message:
            candidate["finishMessage"] = message
        meta = dict(usage)
        if finish:
            meta["candidatesTokenCount"] = candidates_tokens
            meta["totalTokenCount"] = prompt_tokens + candidates_tokens + thoughts_tokens
            if thoughts_tokens:
                meta["thoughtsTokenCount"] = thoughts_tokens
            if details:
                meta["candidatesTokensDetails"] = details
            if vertex:
                meta["trafficType"] = "ON_DEMAND"
        else:
            meta["totalTokenCount"] = prompt_tokens
        if name == "no_usage":  # an answer without usageMetadata (the client cannot price it)
            return {"candidates": [candidate], **common}
        return {"candidates": [candidate], "usageMetadata": meta, **common}

    # Prompt-level block: no candidates at all.
    if name == "prompt_blocked":
        reason = (fault.argument if fault else None) or "PROHIBITED_CONTENT"
        feedback = {"blockReason": reason,
                    "blockReasonMessage": _BLOCK_MESSAGES.get(reason, f"The prompt was blocked ({reason}).")}
        yield {"promptFeedback": feedback, "usageMetadata": {**usage, "totalTokenCount": prompt_tokens}, **common}
        return

    want_image = "IMAGE" in turn.modalities and name != "text_only"
    want_text = "TEXT" in turn.modalities or name == "text_only"
    finish = "STOP"
    if name == "finish":
        finish = fault.argument if fault and fault.argument else "STOP"
    elif name in _FINISH_FAULTS:
        finish = _FINISH_FAULTS[name]
    if finish not in ("STOP", "MAX_TOKENS"):
        want_image = False  # a blocked / failed candidate carries no final image
        if finish == "NO_IMAGE" or finish in _FINISH_MESSAGES:
            want_text = False
    finish_message = _FINISH_MESSAGES.get(finish)
    if finish_message is None and finish not in ("STOP", "MAX_TOKENS"):
        finish_message = f"The candidate stopped with finish reason {finish} (emulated)."
    width, height = _pixels(turn, model)
    fmt = _FORMATS.get(turn.mime_type or "", "jpeg" if gemini3 else "png")
    mime = f"image/{fmt}"
    # Gemini 3 image models always think (174 to 529 thought tokens in recorded answers); the thought parts
    # themselves are only sent with includeThoughts.
    thoughts_tokens = 180 if gemini3 else 0

    if turn.thoughts:
        thoughts_tokens = 180
        yield chunk([{"text": f"**Planning the image**\n\nI will draw: {turn.prompt[:200]}", "thought": True}])
        if "IMAGE" in turn.modalities:
            draft = state.draw(turn.prompt, width, height, fmt=fmt, base=turn.base, stage=0.5, quality=turn.quality,
                               variant=turn.variant)
            yield chunk([{"inlineData": {"mimeType": mime, "data": _b64(draft)}, "thought": True}])

    text_tokens = 0
    if want_text:
        if want_image:
            text = f"Here is the image you asked for: {turn.prompt[:200]}" if turn.base is None else \
                f"Here is the edited image: {turn.prompt[:200]}"
        elif name == "text_only" or "IMAGE" not in turn.modalities:
            text = f"(text only) You asked: {turn.prompt[:200]}"
        else:
            text = ""
        if text:
            text_tokens = len(text.split())
            part: dict[str, Any] = {"text": text}
            if gemini3:
                part["thoughtSignature"] = _b64(signature(state, "text", text.encode()))
            yield chunk([part])
    image_tokens = 0
    if want_image:
        if name == "undecodable":
            data = b"this is not an image, it only claims to be one" * 4
        elif name in HOSTILE_IMAGES:
            data = hostile_image(name, lambda fmt: state.draw(turn.prompt, width, height, fmt=fmt))
            mime = f"image/{'jpeg' if name == 'truncated_jpeg' else 'png'}"
        else:
            def draw(fmt: str) -> bytes:
                return state.draw(turn.prompt, width, height, fmt=fmt, base=turn.base, quality=turn.quality,
                                  texture=name == "large_image", variant=turn.variant)

            # mime_mismatch: inlineData.mimeType says one format, the bytes are another
            data = draw(("png" if fmt == "jpeg" else "jpeg") if name == "mime_mismatch" else fmt)
        image_tokens = gemini_image_tokens(model, turn.image_size) or 1290
        encoded = base64.urlsafe_b64encode(data).decode() if name == "urlsafe_base64" else _b64(data)
        part = {"inlineData": {"mimeType": mime, "data": encoded}}
        if gemini3:
            part["thoughtSignature"] = _b64(signature(state, "image", data))
        yield chunk([part])
    details = [{"modality": m, "tokenCount": n} for m, n in (("TEXT", text_tokens), ("IMAGE", image_tokens)) if n]
    last_parts = [{"text": ""}] if finish == "STOP" and (want_text or want_image) else None
    yield chunk(last_parts, finish, finish_message, text_tokens + image_tokens, thoughts_tokens,
                details)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _merge(chunks: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """One JSON answer from the stream chunks: parts concatenated, the last chunk's metadata kept."""
    merged: dict[str, Any] = {}
    parts: list[dict[str, Any]] = []
    for item in chunks:
        for candidate in item.get("candidates", []):
            parts.extend(p for p in candidate.get("content", {}).get("parts", []) if p != {"text": ""})
        merged.update(item)
    for candidate in merged.get("candidates", []):
        candidate["content"] = {"parts": parts, "role": "model"} if parts else {}
    return merged


def _sse(chunks: Iterator[dict[str, Any]], *, stream_error: bool) -> Iterator[bytes]:
    for i, item in enumerate(chunks):
        if stream_error and i == 1:
            item = {"error": {"code": 500, "message": "An internal error has occurred mid-stream.",
                              "status": "INTERNAL"}}
            yield b"data: " + json.dumps(item, separators=(",", ":")).encode() + b"\r\n\r\n"
            return
        yield b"data: " + json.dumps(item, separators=(",", ":")).encode() + b"\r\n\r\n"

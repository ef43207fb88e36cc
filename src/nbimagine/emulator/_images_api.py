"""OpenAI Images API: ``POST …/images/generations`` (JSON) and ``POST …/images/edits`` (multipart).

Also as Azure serves it (``/openai/deployments/{deployment}/images/...``, the deployment standing in
for ``model``, and ``/openai/v1/images/...``). The rules come from the client's own table
(``nbimagine._image_models``), so the emulator refuses exactly what the client checks, with the real
status and error envelope; the client's checks are then tested by sending around them (the raw SDK).

Masked edits redraw only the mask's fully transparent region: every other pixel of a PNG answer of
the input's size is the input's own (tests compare pixels). Answers follow WIRE.md §2: an
``ImagesResponse`` (``created``, ``data[].b64_json``, ``size``, ``quality``, ``background``,
``output_format``, ``usage``), or with ``stream`` the ``image_generation.*`` / ``image_edit.*`` SSE
events, partial images first, one ``completed`` event per image.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .._image_models import MASK_MAX_BYTES, ImageModelRules, rules_for
from ..tools import COMPRESSIBLE_FORMATS, INPUT_FIDELITIES
from ._hostile import HOSTILE_IMAGES, hostile_image
from ._openai import (
    _clean,
    _frame,
    _http_fault,
    _Reject,
    image_usage,
    moderation_blocked,
    refused_post,
)
from ._server import Answer, Request, State

__all__ = ["check_mask", "form_summary", "handle", "parse_form"]

_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/images/")
# Real message for a mask without alpha (HTTP 400, type image_generation_user_error, code
# invalid_mask_image_format), as reported by API users in 2025 (help.apiyi.com/?p=2702); the size
# mismatch uses the same envelope.
_MASK_ERROR = "Invalid mask image format - "
_DEFAULT_MODEL = "gpt-image-2"


@dataclass
class _Call:
    action: str  # "generate" | "edit"
    model: str
    rules: ImageModelRules
    prompt: str
    n: int
    size: str
    width: int
    height: int
    quality: str
    background: str
    output_format: str
    compression: int | None
    partial_images: int
    stream: bool
    images: list[bytes] = field(default_factory=list)
    mask: bytes | None = None


def handle(req: Request, state: State) -> Answer:
    refused = refused_post(req)
    if refused is not None:
        return refused
    action = "edit" if req.path.rstrip("/").endswith("/edits") else "generate"
    try:
        fields, files = _form(req) if action == "edit" else (_json_fields(req), {})
        fault = state.fault("openai", str(fields.get("prompt") or ""), route="images")
        if fault and fault.name == "http":
            return _http_fault(fault)
        call = _parse(req, action, fields, files)
    except _Reject as exc:
        return exc.answer
    if fault and fault.name == "moderation":
        return moderation_blocked(fault, req)
    broken = bool(fault and fault.name == "broken_stream")
    name = fault.name if fault else None
    if call.stream:
        return Answer(sse=_events(call, name), break_after=1 if broken else None)
    created = int(time.time())
    data = [] if name == "empty_data" else [{"b64_json": _final(call, k, name)} for k in range(call.n)]
    usage = {} if name == "no_usage" else {"usage": _usage(call, call.n)}
    return Answer(json={"created": created, "data": data, **_echo(call), **usage}, break_after=1 if broken else None)


# -- reading the request -----------------------------------------------------------------------------
def _json_fields(req: Request) -> dict[str, Any]:
    if not isinstance(req.json, dict):
        raise _Reject(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                           "aren't using your HTTP library correctly.)")
    return dict(req.json)


def _form(req: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    ctype = req.headers.get("content-type", "")
    if "multipart/form-data" not in ctype:
        raise _Reject(400, "Invalid Content-Type header (application/json), expected multipart/form-data. "
                           "(HINT: If you're using curl, you can pass -F 'key=value' to set form fields.)")
    return parse_form(ctype, req.body)


def parse_form(ctype: str, body: bytes) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Text fields and files of a multipart/form-data body (numbers and booleans arrive as strings)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            files.setdefault(name, []).append(payload)
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, files


def form_summary(ctype: str, body: bytes) -> dict[str, Any]:
    """What the request log keeps of a multipart body: the text fields, and per file its type and size."""
    fields, files = parse_form(ctype, body)
    return {**fields, "files": {name: [{"media_type": _media_type(data), "bytes": len(data)} for data in datas]
                                for name, datas in files.items()}}


def _integer(fields: dict[str, Any], name: str, low: int, high: int, default: int | None) -> int | None:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise _Reject(400, f"Invalid type for '{name}': expected an integer, but got a string instead.",
                          param=name, code="invalid_type") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Reject(400, f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type")
    if value > high:
        if name == "n" and high == 1:
            raise _Reject(400, "You must provide n=1 for this model.", param="n")
        raise _Reject(400, f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got "
                           f"{value} instead.", param=name, code="integer_above_max_value")
    if value < low:
        raise _Reject(400, f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got "
                           f"{value} instead.", param=name, code="integer_below_min_value")
    return value


def _choice(fields: dict[str, Any], name: str, allowed: tuple[str, ...], family: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not allowed:
        raise _Reject(400, f"Unknown parameter: '{name}'. It is not supported by {family}.", param=name,
                      code="unknown_parameter")
    if value not in allowed:
        listed = ", ".join(f"'{v}'" for v in allowed)
        raise _Reject(400, f"Invalid value: '{value}'. Supported values are: {listed}.", param=name,
                      code="invalid_value")
    return str(value)


def _parse(req: Request, action: str, fields: dict[str, Any], files: dict[str, list[bytes]]) -> _Call:
    from . import _draw

    deployment = _DEPLOYMENT.search(req.path)
    model = str(fields.get("model") or (deployment.group(1) if deployment else _DEFAULT_MODEL))
    rules = rules_for(model)
    prompt = fields.get("prompt")
    if not prompt:
        raise _Reject(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if len(str(prompt)) > rules.max_prompt_chars:
        raise _Reject(400, f"Invalid 'prompt': string too long. Expected a string with maximum length "
                           f"{rules.max_prompt_chars}, but got a string with length {len(str(prompt))} instead.",
                      param="prompt", code="string_above_max_length")
    n = _integer(fields, "n", 1, rules.max_n, 1)
    stream = str(fields.get("stream", "false")).lower() == "true"
    if stream and not rules.streaming:
        raise _Reject(400, f"Streaming is not supported for {rules.family}.", param="stream",
                      code="unsupported_value")
    partials = _integer(fields, "partial_images", 0, 3, 0)
    compression = _integer(fields, "output_compression", 0, 100, None)
    quality = _choice(fields, "quality", rules.qualities, rules.family) or "auto"
    background = _choice(fields, "background", rules.backgrounds, rules.family) or "auto"
    fmt = _choice(fields, "output_format", rules.output_formats, rules.family) or "png"
    _choice(fields, "style", rules.styles, rules.family)
    if action == "generate":
        _choice(fields, "moderation", rules.moderations, rules.family)
    else:
        _choice(fields, "input_fidelity", rules.input_fidelities or INPUT_FIDELITIES, rules.family)
    if background == "transparent" and fmt == "jpeg":
        raise _Reject(400, "Transparent background is not supported for output format 'jpeg'. Use 'png' or "
                           "'webp'.", param="background", code="invalid_value")

    images: list[bytes] = []
    mask = None
    input_size = None
    if action == "edit":
        if not rules.edits:
            raise _Reject(400, f"Image editing is not supported for {rules.family}.", param="model",
                          code="invalid_value")
        images = [*files.get("image", []), *files.get("image[]", [])]
        if not images:
            raise _Reject(400, "Missing required parameter: 'image'.", param="image",
                          code="missing_required_parameter")
        if len(images) > rules.max_input_images:
            raise _Reject(400, f"Too many images provided: {len(images)}. {rules.family} accepts at most "
                               f"{rules.max_input_images}.", param="image", code="invalid_value")
        for k, data in enumerate(images):
            media = _media_type(data)
            if media is None or media not in rules.input_media_types or not _draw.is_image(data):
                allowed = [f"image/{m.split('/')[1]}" for m in rules.input_media_types]
                raise _Reject(400, f"Invalid file 'image': unsupported mimetype ('{media or 'unknown'}'). "
                                   f"Supported file formats are {allowed}.", param=f"image[{k}]" if k else "image",
                              code="invalid_image_format")
            if len(data) >= rules.max_input_bytes:
                raise _Reject(400, f"Invalid file 'image': the file is {len(data)} bytes; the limit is "
                                   f"{rules.max_input_bytes} bytes.", param="image", code="invalid_value")
        input_size = _size_of(images[0])
        if "mask" in files:
            mask = files["mask"][0]
            check_mask(mask, input_size)
    size = str(fields.get("size") or ("auto" if "auto" in rules.sizes else "1024x1024"))
    if rules.size_problem(size):
        listed = ", ".join(f"'{s}'" for s in rules.sizes)
        more = " or 'WIDTHxHEIGHT' where both sides are multiples of 16" if rules.free_sizes else ""
        raise _Reject(400, f"Invalid value: '{size}'. Supported values are: {listed}{more}.", param="size",
                      code="invalid_value")
    width, height = rules.output_size(size, input_size)
    return _Call(action, model, rules, str(prompt), int(n or 1), f"{width}x{height}", width, height,
                 "medium" if quality == "auto" else quality, "opaque" if background == "auto" else background,
                 fmt, compression, int(partials or 0), stream, images, mask)


def check_mask(mask: bytes, input_size: tuple[int, int] | None, *, param: str = "mask") -> None:
    """What the real API refuses in a mask: not a PNG, no alpha channel, another size, 4 MB or more.

    Shared by the Images API's ``mask`` and the image tool's ``input_image_mask``.
    """
    from PIL import Image

    def reject(reason: str) -> _Reject:
        return _Reject(400, _MASK_ERROR + reason, param=param, code="invalid_mask_image_format",
                       type_="image_generation_user_error")

    if _media_type(mask) != "image/png":
        raise reject("mask must be a PNG image")
    if len(mask) >= MASK_MAX_BYTES:
        raise reject(f"mask must be less than {MASK_MAX_BYTES // (1024 * 1024)}MB")
    try:
        with Image.open(io.BytesIO(mask)) as img:
            mode, size, info = img.mode, img.size, dict(img.info)
    except Exception:
        raise reject("mask image cannot be decoded") from None
    if mode not in ("RGBA", "LA", "PA") and "transparency" not in info:
        raise reject("mask image missing alpha channel")
    if input_size is not None and tuple(size) != tuple(input_size):
        raise reject("mask size does not match image size")


def _media_type(data: bytes) -> str | None:
    from .._images import sniff_media_type

    return sniff_media_type(data)


def _size_of(data: bytes) -> tuple[int, int] | None:
    from .._images import image_size

    return image_size(data)


# -- the answer --------------------------------------------------------------------------------------
def _draw(call: _Call, k: int, stage: float = 1.0, *, texture: bool = False) -> bytes:
    from . import _draw as draw

    prompt = _clean(call.prompt) or "an abstract composition"
    if call.n > 1:
        prompt = f"{prompt} (image {k + 1} of {call.n})"
    base = call.images[0] if call.images else None
    quality = call.compression if call.output_format in COMPRESSIBLE_FORMATS else None
    return draw.render(prompt, call.width, call.height, fmt=call.output_format,
                       transparent=call.background == "transparent", base=base, stage=stage, quality=quality,
                       mask=call.mask, texture=texture)


def _final(call: _Call, k: int, fault: str | None) -> str:
    """Image ``k``'s base64; a hostile-image or ``undecodable`` fault replaces the last one only, so that
    the images before it survive (as in the Responses route)."""
    if k == call.n - 1 and (fault == "undecodable" or fault in HOSTILE_IMAGES):
        if fault == "undecodable":
            data = b"nbimagine emulator: these bytes are deliberately not an image"
        else:
            data = hostile_image(fault, lambda fmt: _draw(replace(call, output_format=fmt), k))
    elif fault == "mime_mismatch":  # output_format says one format, the bytes are another
        data = _draw(replace(call, output_format="jpeg" if call.output_format == "png" else "png"), k)
    else:
        data = _draw(call, k, texture=fault == "large_image")
    return base64.b64encode(data).decode("ascii")


def _echo(call: _Call) -> dict[str, Any]:
    return {"background": call.background, "output_format": call.output_format, "quality": call.quality,
            "size": call.size}


def _usage(call: _Call, images: int) -> dict[str, Any]:
    inputs = [*call.images, *([call.mask] if call.mask else [])]
    return image_usage(call.model, call.quality, call.size, call.prompt, inputs, call.partial_images, images)


def _events(call: _Call, fault: str | None = None) -> Iterator[bytes]:
    kind = "image_edit" if call.action == "edit" else "image_generation"
    for k in range(call.n):
        for p in range(call.partial_images):
            stage = (p + 1) / (call.partial_images + 1)
            yield _frame(f"{kind}.partial_image", {
                "type": f"{kind}.partial_image", "b64_json": base64.b64encode(_draw(call, k, stage)).decode("ascii"),
                "partial_image_index": f"#{p}" if fault == "partial_index_not_int" else p,
                "created_at": int(time.time()), **_echo(call)})
        usage = _usage(call, 1)
        usage.pop("output_tokens_details")  # the completed event's usage has no output details (SDK type)
        yield _frame(f"{kind}.completed", {
            "type": f"{kind}.completed", "b64_json": "" if fault == "empty_data" else _final(call, k, fault),
            "created_at": int(time.time()), **_echo(call), **({} if fault == "no_usage" else {"usage": usage})})

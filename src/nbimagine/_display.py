"""How images and replies look in a notebook, and how small they stay.

Embedded base64 images are what makes notebooks huge, so what goes into an output is a reduced
*preview*: the longest side at most 768 px, JPEG (PNG, palette-reduced when needed, when the image
has transparency), re-encoded with falling quality until it fits a byte budget. The
full-resolution file lives in the notebook's history; ``full=True`` embeds it instead.

Each image is stored once in a saved notebook: an image output (``image/*`` with the caption as
``text/plain``, which every frontend renders, from JupyterLab to qtconsole and nbconvert) followed by
its caption as ``text/html`` alone (no second copy of the image inside the HTML). Captions and reply
texts are clipped (the full text stays in the history and on the result). A 1024x1024 image adds
about 45 KB (drawing) to 70 KB (photo) to a saved notebook. Pillow is imported only when an image
really has to be re-encoded, and decodes under the memory budget of :func:`_images.open_reduced`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._images import check_decodable, has_alpha, human_bytes, image_size, looks_complete, sniff_media_type
from .errors import ImageDecodeError

if TYPE_CHECKING:
    from ._agent import Reply
    from .events import BinaryResult

__all__ = [
    "MAX_SIDE",
    "PREVIEW_BUDGET",
    "caption_for",
    "caption_output",
    "clip",
    "grid_bundle",
    "image_bundle",
    "image_output",
    "preview",
    "printable",
    "progress_bundle",
    "progress_preview",
    "reply_bundle",
    "text_output",
    "warning_output",
]

MAX_SIDE = 768
# Raw preview bytes; base64 in the notebook (x4/3): 52 KB of preview costs at most 70 KB of notebook.
PREVIEW_BUDGET = 52_000
# Displayed text is clipped (characters): a 1 MB revised prompt must not become 1 MB of notebook.
CAPTION_TEXT_LIMIT = 300
BODY_TEXT_LIMIT = 2000
_JPEG_QUALITIES = (85, 78, 70, 62, 54)
_PROGRESS_SIDE = 384


# --- previews ------------------------------------------------------------------------------------


def preview(result: BinaryResult | bytes, max_side: int = MAX_SIDE, budget: int | None = PREVIEW_BUDGET
            ) -> tuple[bytes, str]:
    """A reduced copy for display: ``(bytes, media_type)``.

    Longest side <= ``max_side``; JPEG unless the image has transparency (then PNG). The quality,
    then the size, step down until the bytes fit ``budget`` (``None`` = no budget). An image that
    is already small enough in a displayable format is returned unchanged.
    """
    data = result if isinstance(result, bytes) else result.data
    media_type = sniff_media_type(data) or "application/octet-stream"
    size = image_size(data, media_type)
    if (size and max(size) <= max_side and media_type in ("image/jpeg", "image/png", "image/webp", "image/gif")
            and (budget is None or len(data) <= budget) and looks_complete(data, media_type)):
        return data, media_type

    from ._images import open_reduced

    image = open_reduced(data, max_side)  # ImageDecodeError for truncated data, bombs, too many pixels
    alpha = has_alpha(image)
    side = max_side
    while True:
        scaled = _scaled(image, side)
        encoded, encoded_type = (_encode_png(scaled) if alpha else _encode_jpeg(scaled, budget))
        if budget is None or len(encoded) <= budget or side <= 128:
            return encoded, encoded_type
        side = int(side * 0.8)


def _scaled(image: Any, side: int) -> Any:
    width, height = image.size
    if max(width, height) <= side:
        return image
    from PIL import Image

    ratio = side / max(width, height)
    return image.resize((max(1, round(width * ratio)), max(1, round(height * ratio))), Image.Resampling.LANCZOS)


def _encode_jpeg(image: Any, budget: int | None) -> tuple[bytes, str]:
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    encoded = b""
    for quality in _JPEG_QUALITIES:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True)
        encoded = buffer.getvalue()
        if budget is None or len(encoded) <= budget:
            break
    return encoded, "image/jpeg"


def _encode_png(image: Any) -> tuple[bytes, str]:
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    buffer = io.BytesIO()
    # optimize=True costs seconds on a detailed 768 px image for a few percent: not worth it for a preview.
    image.save(buffer, format="PNG", compress_level=6)
    if buffer.tell() > PREVIEW_BUDGET:
        # A 256-colour palette keeps the alpha channel and is usually 3-4x smaller.
        from PIL import Image

        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), "image/png"


# --- captions ------------------------------------------------------------------------------------


# C0 and C1 control characters (but tab and newline) and the bidirectional overrides and isolates: in a
# provider's text or a history row they would recolour or rewrite a terminal (ANSI escapes, which
# JupyterLab also renders in text/plain) or reorder what is shown (U+202E).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character written as its escape (``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m[0])[1:-1], text)


def clip(text: str, limit: int, *, where: str = "") -> str:
    """``text`` cut to ``limit`` characters with a note saying how much was left out and where it is;
    control characters escaped (:func:`printable`)."""
    text = printable(text.strip())
    if len(text) <= limit:
        return text
    rest = f"{len(text) - limit:,} more characters"
    return text[:limit].rstrip() + f"… [{rest}{' in ' + where if where else ''}]"


def caption_for(result: BinaryResult, *, history_id: int | None = None, elapsed: float | None = None,
                provider: str | None = None, model: str | None = None, parents: Sequence[int] = ()) -> str:
    """``#17 · openai/gpt-image-1 · 1024x1024 · PNG · 1.4 MB · 8.2 s · edited from #16 · $0.042`` (+ a clipped
    revised-prompt line)."""
    meta = result.metadata
    history_id = history_id if history_id is not None else meta.get("history_id")
    provider = provider or meta.get("provider")
    model = meta.get("model") or model
    parts = []
    if history_id is not None:
        parts.append(f"#{history_id}")
    who = "/".join(str(p) for p in (provider, model) if p)
    if who:
        parts.append(who)
    if result.width and result.height:
        parts.append(f"{result.width}x{result.height}")
    parts.append(result.extension.upper().replace("JPG", "JPEG"))
    parts.append(human_bytes(len(result.data)))
    if elapsed is not None:
        parts.append(f"{elapsed:.1f} s")
    if parents:
        parts.append("edited from " + ", ".join(f"#{p}" for p in parents))
    cost = cost_label(meta)
    if cost:
        parts.append(cost)
    caption = printable(" · ".join(parts))
    revised = meta.get("revised_prompt")
    if isinstance(revised, str) and revised.strip():
        where = "the history" if history_id is not None else "metadata['revised_prompt']"
        caption += f"\nrevised prompt: {clip(' '.join(revised.split()), CAPTION_TEXT_LIMIT, where=where)}"
    return caption


def cost_label(meta: Any) -> str | None:
    """``$0.042``, ``~$0.042`` (estimated), ``$0.042 simulated`` (the emulator's figure for the real call)."""
    from ._cost import format_usd

    usd = meta.get("cost_usd")
    if not isinstance(usd, (int, float)) or isinstance(usd, bool):
        return None
    try:
        usd = float(usd)
    except OverflowError:  # an int beyond any float (from absurd usage figures): not a price to show
        return None
    if not math.isfinite(usd):
        return None
    label = ("~" if meta.get("cost_estimated") else "") + format_usd(usd)
    return f"{label} simulated" if meta.get("cost_simulated") else label


# --- outputs -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_output(result: BinaryResult, caption: str, *, full: bool = False, max_side: int = MAX_SIDE,
                 width: int | None = None) -> tuple[dict[str, Any], dict[str, Any], ImageDecodeError | None]:
    """One image as ``(data, metadata, problem)`` for a ``display_data`` message.

    ``data`` holds the preview (``image/*``) and the caption (``text/plain``); ``metadata`` the
    displayed width and the image's history id and sha256. An image that cannot be previewed
    (truncated, a bomb, too many pixels) gives a text-only output naming it, and the error as
    ``problem``: the bytes are still the caller's.
    """
    try:
        if full:
            check_decodable(result.data)
            data, media_type = result.data, result.media_type
        else:
            data, media_type = preview(result, max_side=max_side)
    except ImageDecodeError as exc:
        return {"text/plain": f"{caption}\n(no preview: {exc})"}, _ids(result), exc
    size = image_size(data, media_type)
    metadata = _ids(result)
    shown = width or (size[0] if size else None)
    if shown:
        metadata[media_type] = {"width": shown}
    return {media_type: _b64(data), "text/plain": caption}, metadata, None


def _ids(result: BinaryResult) -> dict[str, Any]:
    from ._history import output_ids

    return {"nbimagine": output_ids(result.metadata.get("history_id"), result.sha256, result.extension)}


def caption_output(caption: str, *, width: int | None = None) -> dict[str, Any]:
    """The caption as ``text/html`` only (it follows its image output, whose ``text/plain`` it is)."""
    head, _, rest = caption.partition("\n")
    body = html.escape(head)
    if rest:
        body += "<br/>" + html.escape(rest).replace("\n", "<br/>")
    return {"text/html": f'<div style="font-size:0.85em;opacity:0.85;max-width:{width or MAX_SIDE}px;'
                         f'margin:0 0 10px 0">{body}</div>'}


def text_output(text: str, *, where: str = "") -> dict[str, Any]:
    """A reply's text, clipped to ``BODY_TEXT_LIMIT`` characters."""
    text = clip(text, BODY_TEXT_LIMIT, where=where)
    return {"text/plain": text, "text/html": _text_html(text)}


def warning_output(lines: Sequence[str]) -> dict[str, Any]:
    """One line per warning (``ImagineWarning: ...``), shown beside the images it concerns."""
    lines = [printable(line) for line in lines]
    plain = "\n".join(f"ImagineWarning: {line}" for line in lines)
    rows = "".join(f"<div>⚠ {html.escape(line)}</div>" for line in lines)
    return {"text/plain": plain,
            "text/html": f'<div style="background:#fff3cd;color:#664d03;padding:4px 8px;border-radius:4px;'
                         f'margin:4px 0">{rows}</div>'}


def _figure(data: bytes, media_type: str, caption: str, *, width: int | None = None) -> str:
    head, *more = caption.split("\n")
    caption_html = html.escape(head)
    for line in more:  # each its own line: "revised prompt: ...", "prompt: ..."
        caption_html += f'<br/><span style="opacity:0.8">{html.escape(line)}</span>'
    style = "max-width:100%;height:auto;display:block"
    width_attr = f' width="{width}"' if width else ""
    return (
        '<figure style="display:inline-block;margin:0 8px 8px 0;vertical-align:top">'
        f'<img src="data:{media_type};base64,{_b64(data)}"{width_attr} style="{style}" '
        f'alt="{html.escape(head)}"/>'
        f'<figcaption style="font-size:0.85em;opacity:0.85;max-width:{width or MAX_SIDE}px">{caption_html}'
        "</figcaption></figure>"
    )


def image_bundle(result: BinaryResult, *, caption: str | None = None, full: bool = False) -> dict[str, Any]:
    """The mime bundle of one image (``_repr_mimebundle_``): the preview once, the caption as text.

    An image that cannot be previewed gives its caption and the reason instead of raising.
    """
    data, _, _ = image_output(result, caption if caption is not None else caption_for(result), full=full)
    return data


def grid_bundle(items: Sequence[tuple[BinaryResult, str]], *, text: str = "", full: bool = False,
                columns: int | None = None) -> dict[str, Any]:
    """Several images as one HTML grid (a multi-image ``Reply``'s repr), each preview stored once."""
    cols = columns or min(len(items), 2 if len(items) == 4 else 3) or 1
    # Previews in a grid are shown smaller, so they are made smaller too.
    side = MAX_SIDE if cols == 1 else max(256, MAX_SIDE * 2 // (cols + 1))
    text = clip(text, BODY_TEXT_LIMIT)
    plain = [text] if text else []
    cells = []
    for (data, media_type, problem), (_, caption) in zip(_previews(items, side, full), items, strict=True):
        if problem is not None:
            cells.append(f'<figure style="margin:0"><figcaption>{html.escape(caption)}<br/>(no preview: '
                         f"{html.escape(str(problem))})</figcaption></figure>")
        else:
            cells.append(_figure(data, media_type, caption))
    plain.extend(caption for _, caption in items)
    grid = (f'<div style="display:grid;grid-template-columns:repeat({cols}, minmax(0, {side}px));gap:8px">'
            + "".join(cells) + "</div>")
    return {"text/plain": "\n".join(plain), "text/html": _text_html(text) + grid}


def _previews(items: Sequence[tuple[BinaryResult, str]], side: int, full: bool
              ) -> list[tuple[bytes, str, ImageDecodeError | None]]:
    def one(item: tuple[BinaryResult, str]) -> tuple[bytes, str, ImageDecodeError | None]:
        if full:
            return item[0].data, item[0].media_type, None
        try:
            return (*preview(item[0], max_side=side), None)
        except ImageDecodeError as exc:
            return b"", "", exc

    if len(items) <= 1:
        return [one(item) for item in items]
    # Pillow releases the GIL while decoding, resizing and encoding: variants are previewed in parallel.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), 4)) as pool:
        return list(pool.map(one, items))


def _text_html(text: str) -> str:
    if not text:
        return ""
    return f'<div style="white-space:pre-wrap;margin-bottom:6px">{html.escape(text)}</div>'


def reply_bundle(reply: Reply, *, captions: Sequence[str] | None = None, full: bool = False) -> dict[str, Any]:
    """A reply (its ``_repr_mimebundle_``): its text, then its images (an HTML grid when several)."""
    files = list(reply.files)
    caps = list(captions) if captions is not None else [
        caption_for(f, provider=reply.provider, model=reply.model) for f in files]
    if not files:
        text = clip(reply.body, BODY_TEXT_LIMIT)
        if reply.finish_reason not in (None, "STOP", "completed"):  # stopped short: say why
            why = f": {reply.finish_message}" if reply.finish_message else ""
            text = "\n\n".join(filter(None, [text, f"No image ({reply.finish_reason}){why}"]))
        text = text or "(no text, no images)"
        return {"text/plain": text, "text/html": _text_html(text)}
    if len(files) == 1:
        bundle = image_bundle(files[0], caption=caps[0], full=full)
        if reply.body:
            bundle["text/plain"] = clip(reply.body, BODY_TEXT_LIMIT) + "\n" + bundle["text/plain"]
        return bundle
    return grid_bundle(list(zip(files, caps, strict=True)), text=reply.body, full=full)


def progress_preview(partial: BinaryResult) -> bytes:
    """``partial`` reduced for the progress slot. The slot is redrawn several times a second with every
    variant's latest partial: reduce each once on arrival, and every redraw only reads a header.

    Raises ``ImageDecodeError`` for a partial image that cannot be decoded.
    """
    return preview(partial, max_side=_PROGRESS_SIDE, budget=None)[0]


def progress_bundle(elapsed: float | None, *, label: str = "Generating", partials: Sequence[Any] = (),
                    status: Sequence[str] = (), note: str | None = None) -> dict[str, Any]:
    """The live progress slot: elapsed time, and the latest partial image of each variant when any.

    ``elapsed`` None: the first state, which is all that frontends without display updates ever
    show, so it names no time. ``partials`` holds one image (``BinaryResult``, or bytes from
    :func:`progress_preview`) or ``None`` per variant; ``status`` one short word per variant; ``note``
    what is happening now (``retrying (1/2) after HTTP 503``).
    """
    line = (f"{label}…" if elapsed is None else f"{label}… {elapsed:.1f} s") + (f" · {note}" if note else "")
    cells = []
    for index, partial in enumerate(partials):
        note = status[index] if index < len(status) else ""
        if partial is None:
            cells.append(f'<div style="width:128px;height:128px;display:flex;align-items:center;'
                         f'justify-content:center;border:1px dashed #999;font-size:0.8em">{html.escape(note)}</div>')
        else:
            data, media_type = preview(partial, max_side=_PROGRESS_SIDE, budget=None)
            cells.append(_figure(data, media_type, note or "partial image"))
    body = f'<div style="font-family:monospace;margin-bottom:4px">⏳ {html.escape(line)}</div>'
    if cells:
        body += '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(cells) + "</div>"
    return {"text/plain": line, "text/html": body}

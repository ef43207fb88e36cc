"""How images and replies look in a notebook, and how small they stay.

Embedded base64 images are what makes notebooks huge, so what goes into an output is a reduced
*preview*: the longest side at most 768 px, JPEG (PNG, palette-reduced when needed, when the image
has transparency), re-encoded with falling quality until it fits a byte budget. The
full-resolution file lives in the notebook's history; ``full=True`` embeds it instead.

A bundle carries the preview once as ``image/*`` (for nbconvert, GitHub and other plain renderers)
and once inside a ``text/html`` figure with its caption (what JupyterLab and VS Code show), so the
budget is set for both copies together: a 1024x1024 image adds well under 150 KB to a saved
notebook. Pillow is imported only when an image really has to be re-encoded.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._images import has_alpha, human_bytes, image_size, sniff_media_type

if TYPE_CHECKING:
    from ._agent import Reply
    from .events import BinaryResult

__all__ = [
    "MAX_SIDE",
    "PREVIEW_BUDGET",
    "caption_for",
    "grid_bundle",
    "image_bundle",
    "preview",
    "progress_bundle",
    "progress_preview",
    "reply_bundle",
]

MAX_SIDE = 768
# Raw preview bytes. A bundle holds the preview twice (image/* and the HTML figure), base64-encoded
# (x4/3), so 52 KB of preview costs about 140 KB of notebook.
PREVIEW_BUDGET = 52_000
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
            and (budget is None or len(data) <= budget)):
        return data, media_type

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
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


def caption_for(result: BinaryResult, *, history_id: int | None = None, elapsed: float | None = None,
                provider: str | None = None, model: str | None = None) -> str:
    """``#17 · openai/gpt-image-1 · 1024x1024 · PNG · 1.4 MB · 8.2 s`` (+ a revised-prompt line)."""
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
    caption = " · ".join(parts)
    revised = meta.get("revised_prompt")
    if isinstance(revised, str) and revised.strip():
        caption += f"\nrevised prompt: {revised.strip()}"
    return caption


# --- bundles -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _figure(data: bytes, media_type: str, caption: str, *, width: int | None = None) -> str:
    head, _, revised = caption.partition("\n")
    caption_html = html.escape(head)
    if revised:
        caption_html += f'<br/><span style="opacity:0.8">{html.escape(revised)}</span>'
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
    """The mime bundle of one image: ``image/*`` preview, an HTML figure with caption, and text."""
    caption = caption if caption is not None else caption_for(result)
    if full:
        data, media_type = result.data, result.media_type
    else:
        data, media_type = preview(result)
    size = image_size(data, media_type)
    bundle: dict[str, Any] = {
        "text/plain": caption,
        "text/html": _figure(data, media_type, caption, width=size[0] if size else None),
    }
    if media_type.startswith("image/"):
        bundle[media_type] = _b64(data)
    return bundle


def grid_bundle(items: Sequence[tuple[BinaryResult, str]], *, text: str = "", full: bool = False,
                columns: int | None = None) -> dict[str, Any]:
    """Several images as a grid (variants), with optional text above."""
    cols = columns or min(len(items), 2 if len(items) == 4 else 3) or 1
    # Previews in a grid are shown smaller, so they are made smaller too.
    side = MAX_SIDE if cols == 1 else max(256, MAX_SIDE * 2 // (cols + 1))
    plain = [text] if text else []
    if full:
        encoded = [(result.data, result.media_type) for result, _ in items]
    else:
        # Pillow releases the GIL while decoding, resizing and encoding: variants are previewed in parallel.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(items), 4) or 1) as pool:
            encoded = list(pool.map(lambda item: preview(item[0], max_side=side), items))
    cells = [_figure(data, media_type, caption) for (data, media_type), (_, caption) in zip(encoded, items,
                                                                                                strict=True)]
    plain.extend(caption for _, caption in items)
    body = _text_html(text)
    grid = (f'<div style="display:grid;grid-template-columns:repeat({cols}, minmax(0, {side}px));gap:8px">'
            + "".join(cells) + "</div>")
    bundle: dict[str, Any] = {"text/plain": "\n".join(plain), "text/html": body + grid}
    return bundle


def _text_html(text: str) -> str:
    if not text:
        return ""
    return f'<div style="white-space:pre-wrap;margin-bottom:6px">{html.escape(text)}</div>'


def reply_bundle(reply: Reply, *, captions: Sequence[str] | None = None, full: bool = False) -> dict[str, Any]:
    """A reply: its text above, then its images (a grid when there are several)."""
    files = list(reply.files)
    caps = list(captions) if captions is not None else [
        caption_for(f, provider=reply.provider, model=reply.model) for f in files]
    if not files:
        return {"text/plain": reply.body or "(no text, no images)",
                "text/html": _text_html(reply.body or "(no text, no images)")}
    if len(files) == 1:
        bundle = image_bundle(files[0], caption=caps[0], full=full)
        if reply.body:
            bundle["text/html"] = _text_html(reply.body) + bundle["text/html"]
            bundle["text/plain"] = reply.body + "\n" + bundle["text/plain"]
        return bundle
    return grid_bundle(list(zip(files, caps, strict=True)), text=reply.body, full=full)


def progress_preview(partial: BinaryResult) -> bytes:
    """``partial`` reduced for the progress slot. The slot is redrawn several times a second with every
    variant's latest partial: reduce each once on arrival, and every redraw only reads a header."""
    return preview(partial, max_side=_PROGRESS_SIDE, budget=None)[0]


def progress_bundle(elapsed: float, *, label: str = "Generating", partials: Sequence[Any] = (),
                    status: Sequence[str] = ()) -> dict[str, Any]:
    """The live progress slot: elapsed time, and the latest partial image of each variant when any.

    ``partials`` holds one image (``BinaryResult``, or bytes from :func:`progress_preview`) or ``None`` per
    variant; ``status`` one short word per variant.
    """
    line = f"{label}… {elapsed:.1f} s"
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

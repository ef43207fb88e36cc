"""Fetching ``ImageInput(url=...)`` for APIs that do not fetch URLs themselves (Gemini, Vertex AI, and the
Images API, which uploads its input images).

One GET per request, bounded: http(s) only (redirects too), at most ``MAX_REDIRECTS`` redirects, a
timeout, a size cap checked before and while reading, and the answer must be an image (by its
Content-Type and by its bytes). Proxies come from the environment as for the SDKs (loopback bypasses them).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .._images import human_bytes, sniff_media_type
from ..errors import InputError
from ..events import MAX_INPUT_BYTES, ImageInput

if TYPE_CHECKING:
    from ._base import Turn

__all__ = ["fetch_image", "inline_urls", "inline_urls_async"]

TIMEOUT = 30.0  # seconds, for the connection and for each read
MAX_REDIRECTS = 5
_CHUNK = 256 * 1024


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise InputError(f"The image URL redirects to {urlsplit(newurl).scheme}:, not http(s); not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, *, max_bytes: int = MAX_INPUT_BYTES, timeout: float | None = None) -> ImageInput:
    """Download ``url`` once and return it as ``ImageInput(data=...)``; ``InputError`` says what went wrong."""
    from ..config import _masked_url  # URLs may carry signatures or tokens: never shown whole

    shown = _masked_url(url, None)[:200]
    if urlsplit(url).scheme not in ("http", "https"):
        raise InputError(f"Cannot fetch {shown!r}: only http and https image URLs can be fetched")
    opener = urllib.request.build_opener(_Redirects)
    request = urllib.request.Request(url, headers={"User-Agent": "nbimagine", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=TIMEOUT if timeout is None else timeout) as answer:
            kind = answer.headers.get_content_type() if answer.headers.get("content-type") else ""
            if kind and not kind.startswith("image/") and kind != "application/octet-stream":
                raise InputError(f"{shown!r} is not an image: the server says {kind}")
            length = answer.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"{shown!r} is {human_bytes(int(length))}; the limit is {human_bytes(max_bytes)}")
            chunks: list[bytes] = []
            size = 0
            while chunk := answer.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{shown!r} is larger than the {human_bytes(max_bytes)} limit")
                chunks.append(chunk)
    except InputError:
        raise
    except urllib.error.HTTPError as exc:
        raise InputError(f"Cannot fetch {shown!r}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"Cannot fetch {shown!r}: {reason}") from None
    data = b"".join(chunks)
    if sniff_media_type(data) is None:
        raise InputError(f"{shown!r} did not return a PNG, JPEG, WebP or GIF image ({human_bytes(len(data))})")
    return ImageInput(data=data)


def _fetchable(item: Any, keep: Callable[[str], bool] | None) -> bool:
    return isinstance(item, ImageInput) and item.url is not None \
        and item.url.startswith(("http://", "https://")) and not (keep is not None and keep(item.url))



def inline_urls(turn: Turn, *, keep: Callable[[str], bool] | None = None) -> Turn:
    """``turn`` with each http(s) image URL (inputs and mask) fetched once and sent as bytes; ``keep(url)``
    names URLs the API reads itself, left as they are."""
    def inline(item: Any) -> Any:
        return ImageInput(data=fetch_image(item.url).data, detail=item.detail) if _fetchable(item, keep) else item

    return replace(turn, inputs=[inline(item) for item in turn.inputs],
                   mask=inline(turn.mask) if turn.mask is not None else None)


async def inline_urls_async(turn: Turn, *, keep: Callable[[str], bool] | None = None) -> Turn:
    """:func:`inline_urls` off the event loop (only when there is a URL to fetch)."""
    if any(_fetchable(item, keep) for item in [*turn.inputs, turn.mask]):
        return await asyncio.to_thread(inline_urls, turn, keep=keep)
    return turn

"""The mask painter: paint over an image in the notebook to mark the region an edit may change.

An anywidget (its ES module and CSS ship in ``nbimagine/static``; no build step). The image is shown
reduced; the paint layer has the image's full pixel size, so the mask always fits the image. Brush and
eraser, adjustable size, undo, invert and clear run in the browser; after each change the mask reaches
the kernel as a PNG in OpenAI's form (opaque where the image stays, fully transparent where it
changes), read as :attr:`MaskPainter.mask`.

``%imagine mask REF`` opens one and binds it to a variable (``mask`` unless ``-o NAME``), so
``%%imagine -e REF --mask mask`` edits with whatever is painted when the cell runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anywidget
import traitlets

from ._images import b64decode_any, data_url
from .errors import InputError
from .events import BinaryResult

__all__ = ["MaskPainter"]

_STATIC = Path(__file__).parent / "static"
_PREFIX = "data:image/png;base64,"
# The paint layer is a canvas of the image's full size, read back after each stroke: 4096x4096 is 64 MB in the
# browser. OpenAI's models work at 3840x2160 at most, so a larger image is better resized before an edit anyway.
MAX_PAINT_PIXELS = 4096 * 4096


class MaskPainter(anywidget.AnyWidget):
    """Paint the region of ``image`` to change. ``mask`` is the painted mask (``None`` until something is).

    ``brush`` is the brush diameter in image pixels; ``tool`` is ``"brush"`` or ``"eraser"``.
    ``initial`` (a mask in OpenAI's form) is loaded onto the paint layer to continue from it.
    """

    _esm = _STATIC / "mask_painter.js"
    _css = _STATIC / "mask_painter.css"

    image = traitlets.Unicode("").tag(sync=True)  # a reduced copy for display (data URL)
    natural_width = traitlets.Int(0).tag(sync=True)
    natural_height = traitlets.Int(0).tag(sync=True)
    label = traitlets.Unicode("").tag(sync=True)
    brush = traitlets.Int(48).tag(sync=True)
    tool = traitlets.Unicode("brush").tag(sync=True)
    initial_mask = traitlets.Unicode("").tag(sync=True)
    mask_url = traitlets.Unicode("").tag(sync=True)  # set by the front end: PNG data URL, "" = nothing painted
    painted = traitlets.Int(0).tag(sync=True)  # painted pixels (at full size)

    def __init__(self, image: BinaryResult, *, brush: int | None = None, initial: BinaryResult | None = None,
                 label: str = "", **kwargs: Any) -> None:
        from ._display import preview

        if not isinstance(image, BinaryResult):
            raise InputError(f"MaskPainter needs a BinaryResult image, not {type(image).__name__}")
        width, height = image.width, image.height
        if not width or not height:
            raise InputError("The image's size cannot be read from its header; save it as PNG or JPEG first")
        if width * height > MAX_PAINT_PIXELS:
            raise InputError(f"The image is {width}x{height} ({width * height / 1e6:.0f} megapixels); the mask painter "
                             f"paints at full size up to {MAX_PAINT_PIXELS / 1e6:.1f} MP (4096x4096). Resize it first: "
                             "OpenAI's models work at 3840x2160 at most")
        shown, media_type = preview(image)
        if brush is None:  # a sixteenth of the long side, within what the brush takes (1 to the long side)
            brush = min(max(width, height), max(4, round(max(width, height) / 16)))
        super().__init__(image=data_url(shown, media_type), natural_width=width, natural_height=height,
                         brush=brush, label=label, **kwargs)
        self.source = image
        if initial is not None:
            self.initial_mask = data_url(initial.data, "image/png")

    @traitlets.validate("brush")
    def _check_brush(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 1 <= value <= max(self.natural_width, self.natural_height, 1):
            raise traitlets.TraitError(f"brush is a diameter in image pixels, from 1 to the image's long side, "
                                       f"not {value}")
        return value

    @traitlets.validate("tool")
    def _check_tool(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] not in ("brush", "eraser"):
            raise traitlets.TraitError(f"tool is 'brush' or 'eraser', not {proposal['value']!r}")
        return proposal["value"]

    @property
    def mask(self) -> BinaryResult | None:
        """The painted mask (PNG, the image's size, transparent where it should change), or ``None``."""
        url = self.mask_url
        if not url.startswith(_PREFIX):
            return None
        meta: dict[str, Any] = {"kind": "mask"}
        painted_on = self.source.metadata.get("history_id")
        if painted_on is not None:
            meta["painted_on"] = painted_on
        return BinaryResult(b64decode_any(url[len(_PREFIX):]), meta)

    def __repr__(self) -> str:
        state = f"{self.painted} px painted" if self.painted else "nothing painted"
        return f"MaskPainter({self.natural_width}x{self.natural_height}, {state})"

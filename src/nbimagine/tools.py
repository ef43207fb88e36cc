"""Tools an agent can be given. Parameters are validated at construction, before any request."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError, InputWarning
from .events import ImageInput

__all__ = ["ImageGenerationTool"]

QUALITIES = ("low", "medium", "high", "auto", "xhigh", "max")
BACKGROUNDS = ("transparent", "opaque", "auto")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MODERATIONS = ("auto", "low")
INPUT_FIDELITIES = ("high", "low")
ACTIONS = ("generate", "edit", "auto")
STANDARD_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
# The formats output_compression applies to (the SDK's output_compression: "for jpeg or webp").
COMPRESSIBLE_FORMATS = ("jpeg", "webp")
MAX_SIDE = 3840
MAX_RATIO = 3.0
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ImageGenerationTool:
    """OpenAI's server-side image tool (Responses API; also Azure OpenAI / Foundry).

    Only the parameters you set are sent; the API fills in the rest.
    """

    quality: str | None = None
    size: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    moderation: str | None = None
    input_fidelity: str | None = None
    action: str | None = None
    model: str | None = None
    input_image_mask: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.output_format == "jpg":
            object.__setattr__(self, "output_format", "jpeg")
        _one_of("quality", self.quality, QUALITIES)
        _one_of("background", self.background, BACKGROUNDS)
        _one_of("output_format", self.output_format, OUTPUT_FORMATS)
        _one_of("moderation", self.moderation, MODERATIONS)
        _one_of("input_fidelity", self.input_fidelity, INPUT_FIDELITIES)
        _one_of("action", self.action, ACTIONS)
        if self.size is not None:
            validate_size(self.size)
        if self.output_compression is not None:
            _integer("output_compression", self.output_compression, 0, 100)
            if self.output_format not in COMPRESSIBLE_FORMATS:
                # Accepted by the API (pydantic-ai's recorded cassette: png with output_compression 100 -> 200,
                # echoed back), so not an error: it simply changes nothing.
                warnings.warn(
                    f"output_compression={self.output_compression} has no effect with "
                    f"output_format={self.output_format or 'png (the default)'!s}; it applies to jpeg and webp",
                    InputWarning, stacklevel=3,
                )
        if self.partial_images is not None:
            _integer("partial_images", self.partial_images, 0, 3)
        # OpenAI docs (the tool's ``background``): transparency needs png or webp; the API answers 400.
        if self.background == "transparent" and self.output_format == "jpeg":
            raise ConfigError(
                "JPEG has no transparency: use output_format='png' or 'webp' with a transparent background"
            )
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ConfigError("ImageGenerationTool model must be a non-empty string such as 'gpt-image-1'")
        if self.input_image_mask is not None and not isinstance(self.input_image_mask, ImageInput):
            raise ConfigError("input_image_mask must be an ImageInput (a PNG with an alpha channel, or a file_id)")

    def params(self) -> dict[str, Any]:
        """The parameters that were set, by their API names (the mask excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None and f.name != "input_image_mask"
        }


def validate_size(size: str) -> str:
    """Check an OpenAI size: a standard one, or WxH within the newest models' limits.

    Source: the SDK's ``ImageGeneration.size`` docs (gpt-image-2 and later take any WxH with both sides
    multiples of 16, the long side at most 3840 and at most 3x the short side).
    """
    if size in STANDARD_SIZES:
        return size
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if not match:
        raise ConfigError(
            f"size must be 'auto', one of {', '.join(STANDARD_SIZES[1:])}, or 'WIDTHxHEIGHT' (e.g. '2048x1152'), "
            f"not {size!r}"
        )
    width, height = int(match[1]), int(match[2])
    problems = []
    if width % 16 or height % 16:
        problems.append("both sides must be multiples of 16")
    if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
        problems.append(f"each side must be between 16 and {MAX_SIDE} pixels")
    if max(width, height) / max(min(width, height), 1) > MAX_RATIO:
        problems.append("the long side can be at most 3 times the short side")
    if problems:
        raise ConfigError(f"size {size!r} is not allowed: {'; '.join(problems)}")
    return size


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")


def _integer(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")

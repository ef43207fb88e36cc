"""What each OpenAI image model accepts on the Images API: sizes, ``n``, qualities, formats, inputs, masks.

One table, read by :class:`~nbimagine.config.OpenAIImagesConfig` (checks before any request), the
Images API provider (input and mask checks) and the emulator (which refuses the same requests with
the real status and error shape). Each rule names its source. "SDK" is the ``openai`` package's
generated parameter docs (``openai/types/image_generate_params.py``, ``image_edit_params.py``), which
are OpenAI's API reference (https://platform.openai.com/docs/api-reference/images).

Model names churn (gpt-image-1 was shut down on 2026-10-23, DALL-E on 2026-05-12), so a model is
matched to a family by its name prefix and an unknown name gets the newest family's rules: the API
itself then says whether the model exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .tools import BACKGROUNDS, INPUT_FIDELITIES, MODERATIONS, OUTPUT_FORMATS, QUALITIES, STANDARD_SIZES

__all__ = ["MASK_MAX_BYTES", "MAX_N", "ImageModelRules", "rules_for"]

MB = 1024 * 1024
# SDK image_edit_params.mask: "Must be a valid PNG file, less than 4MB, and have the same dimensions as image."
MASK_MAX_BYTES = 4 * MB
MAX_N = 10  # SDK n: "The number of images to generate. Must be between 1 and 10."
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ImageModelRules:
    """The Images API rules of one model family. Empty tuples mean "parameter not supported"."""

    family: str
    sizes: tuple[str, ...]  # the fixed sizes (with "auto" where allowed); free-form sizes see below
    free_sizes: bool  # any WxH: multiples of 16, ratio <= 3:1, long edge <= max_edge, <= max_pixels
    max_n: int
    qualities: tuple[str, ...]
    output_formats: tuple[str, ...]
    backgrounds: tuple[str, ...]
    moderations: tuple[str, ...]
    input_fidelities: tuple[str, ...]
    styles: tuple[str, ...]
    streaming: bool  # stream=True and partial_images 0-3
    edits: bool
    max_input_images: int
    input_media_types: tuple[str, ...]
    max_input_bytes: int
    square_inputs: bool
    max_prompt_chars: int
    b64_by_default: bool  # False: the legacy models answer URLs unless response_format="b64_json"
    max_edge: int = 3840
    max_pixels: int = 3840 * 2160

    def size_problem(self, size: str) -> str | None:
        """Why ``size`` is refused by this family, or ``None`` when it is accepted."""
        if size in self.sizes:
            return None
        match = _SIZE.match(size) if isinstance(size, str) else None
        listed = ", ".join(repr(s) for s in self.sizes)
        if not self.free_sizes or not match:
            extra = " or 'WIDTHxHEIGHT' (multiples of 16)" if self.free_sizes else ""
            return f"{self.family} sizes are {listed}{extra}; {size!r} is not one of them"
        width, height = int(match[1]), int(match[2])
        problems = []
        if width % 16 or height % 16 or not width or not height:
            problems.append("both sides must be multiples of 16")
        elif max(width, height) > 3 * min(width, height):
            problems.append("the aspect ratio must be between 1:3 and 3:1")
        if max(width, height) > self.max_edge:
            problems.append(f"the long side can be at most {self.max_edge} pixels")
        if width * height > self.max_pixels:
            problems.append(f"at most {self.max_pixels:,} pixels (3840x2160)")
        return f"size {size!r} is not allowed for {self.family}: {'; '.join(problems)}" if problems else None

    def output_size(self, size: str | None, input_size: tuple[int, int] | None) -> tuple[int, int]:
        """The pixel size an answer has for a requested ``size`` (``auto`` follows the input's shape)."""
        if size and size != "auto":
            match = _SIZE.match(size)
            assert match, size
            return int(match[1]), int(match[2])
        if input_size is None:
            return 1024, 1024
        width, height = input_size
        if self.free_sizes:
            scale = min(1.0, self.max_edge / max(width, height), (self.max_pixels / (width * height)) ** 0.5)
            w, h = max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)
            if max(w, h) <= 3 * min(w, h):
                return w, h
        fixed = [tuple(map(int, s.split("x"))) for s in self.sizes if s != "auto"]
        ratio = width / height
        return min(fixed, key=lambda wh: abs(wh[0] / wh[1] - ratio))  # type: ignore[return-value]


_GPT_IMAGE_1 = ImageModelRules(
    family="gpt-image-1",
    # SDK size: "The standard sizes 1024x1024, 1536x1024 and 1024x1536 are supported by the GPT image models".
    sizes=STANDARD_SIZES,
    free_sizes=False,
    max_n=MAX_N,
    # SDK quality: "The GPT image models support low, medium, high" (xhigh and max: gpt-image-2.5 below)
    qualities=tuple(q for q in QUALITIES if q not in ("xhigh", "max")),
    output_formats=OUTPUT_FORMATS,  # SDK output_format (gif/svg need preview access: not offered)
    backgrounds=BACKGROUNDS,
    moderations=MODERATIONS,  # SDK moderation
    # SDK input_fidelity: "Supports high and low on gpt-image-1.5; gpt-image-1-mini supports only low."
    input_fidelities=INPUT_FIDELITIES,
    styles=(),
    streaming=True,
    edits=True,
    max_input_images=16,  # SDK image: "You can provide up to 16 images."
    input_media_types=("image/png", "image/jpeg", "image/webp"),  # SDK image: "a png, webp, or jpg file"
    max_input_bytes=50 * MB,  # SDK image: "less than 50MB"
    square_inputs=False,
    max_prompt_chars=32000,  # SDK prompt: "32000 characters for the GPT image models"
    b64_by_default=True,
)
_GPT_IMAGE_1_MINI = ImageModelRules(**{**_GPT_IMAGE_1.__dict__, "family": "gpt-image-1-mini",
                                       "input_fidelities": ("low",)})
_GPT_IMAGE_2 = ImageModelRules(**{
    **_GPT_IMAGE_1.__dict__,
    "family": "gpt-image-2",
    # SDK size: "arbitrary resolutions ... divisible by 16 ... aspect ratio between 1:3 and 3:1 ... the
    # maximum supported resolution is 3840x2160."
    "free_sizes": True,
    # SDK input_fidelity: "For gpt-image-2, omit this parameter." (checked in config: warned, not sent)
    "input_fidelities": (),
})
_GPT_IMAGE_25 = ImageModelRules(**{
    **_GPT_IMAGE_2.__dict__,
    "family": "gpt-image-2.5",
    # SDK quality: "gpt-image-2.5-sunburst and gpt-image-2.5-flare ... also support xhigh and max."
    "qualities": QUALITIES,
    # SDK background: sunburst and flare "support opaque and transparent backgrounds".
    "backgrounds": BACKGROUNDS,
})
_DALL_E_2 = ImageModelRules(
    family="dall-e-2",
    # OpenAI API reference (dall-e-2): "Must be one of 256x256, 512x512, or 1024x1024."
    sizes=("256x256", "512x512", "1024x1024"),
    free_sizes=False,
    max_n=10,
    qualities=("standard",),  # "dall-e-2 only supports standard quality"
    output_formats=(),
    backgrounds=(),
    moderations=(),
    input_fidelities=(),
    styles=(),
    streaming=False,
    # "For dall-e-2, you can only provide one image, and it should be a square png file less than 4MB."
    edits=True,
    max_input_images=1,
    input_media_types=("image/png",),
    max_input_bytes=4 * MB,
    square_inputs=True,
    max_prompt_chars=1000,  # "The maximum length is 1000 characters for dall-e-2"
    b64_by_default=False,
)
_DALL_E_3 = ImageModelRules(
    family="dall-e-3",
    sizes=("1024x1024", "1792x1024", "1024x1792"),  # "For dall-e-3, must be one of 1024x1024, 1792x1024, 1024x1792."
    free_sizes=False,
    max_n=1,  # "For dall-e-3, only n=1 is supported."
    qualities=("standard", "hd"),  # "hd and standard are supported for dall-e-3"
    output_formats=(),
    backgrounds=(),
    moderations=(),
    input_fidelities=(),
    styles=("vivid", "natural"),  # SDK style: "only supported for dall-e-3"
    streaming=False,
    edits=False,  # the edits endpoint takes dall-e-2 and the GPT image models only
    max_input_images=0,
    input_media_types=(),
    max_input_bytes=0,
    square_inputs=False,
    max_prompt_chars=4000,  # "4000 characters for dall-e-3"
    b64_by_default=False,
)

# Longest prefix first: "gpt-image-1-mini" before "gpt-image-1".
_FAMILIES: tuple[tuple[str, ImageModelRules], ...] = (
    ("gpt-image-2.5", _GPT_IMAGE_25),
    ("gpt-image-2.6", _GPT_IMAGE_25),
    ("gpt-image-2", _GPT_IMAGE_2),
    ("gpt-image-1-mini", _GPT_IMAGE_1_MINI),
    ("gpt-image-1", _GPT_IMAGE_1),  # gpt-image-1 and gpt-image-1.5
    ("chatgpt-image", _GPT_IMAGE_1),  # SDK: "chatgpt-image-latest follows the same input constraints"
    ("dall-e-2", _DALL_E_2),
    ("dall-e-3", _DALL_E_3),
)


def rules_for(model: str) -> ImageModelRules:
    """The rules of ``model`` (an Azure deployment name is matched the same way; unknown: the newest)."""
    name = (model or "").lower().strip()
    for prefix, rules in _FAMILIES:
        if name.startswith(prefix):
            return rules
    return _GPT_IMAGE_25

"""OpenAI Images API (``images.generate`` / ``images.edit``), also as Azure OpenAI serves it.

A turn without images is a generation; a turn with images (or a follow-up of a reply, which edits
that reply's first image) is an edit, sent as multipart: one image as the ``image`` field, several
as repeated ``image[]`` fields, plus ``mask``. ``n`` images come back from one call. Everything the
model's rules forbid (``nbimagine._image_models``) fails before the request.

Streaming (``stream()``, or ``partial_images`` set) yields the ``image_generation.partial_image`` /
``image_edit.partial_image`` events as partial images and each ``*.completed`` event as an image.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .._agent import Reply
from .._cost import Usage, openai_usage
from .._image_models import ImageModelRules, rules_for
from .._images import EXTENSIONS, human_bytes
from .._masks import PreparedMask, prepare_mask
from ..config import AzureOpenAIImagesConfig, OpenAIImagesConfig
from ..errors import ConfigError, ImagineError, InputError, InputWarning, ProviderError, UnsupportedToolError
from ..events import BinaryResult, ImageEvent, ImageInput, PartialImageEvent, ReplyEvent, StreamEvent
from ._base import Provider, Turn, kept, result, undecodable_error
from ._fetch import inline_urls, inline_urls_async
from .openai import (
    OpenAIBatchMixin,
    _AzureClientMixin,
    _decode_image,
    _OpenAIClientMixin,
    _transport_errors,
    answered_bytes,
    sdk_error,
)

__all__ = ["AzureOpenAIImagesProvider", "OpenAIImagesProvider"]

# Parameters the edits endpoint does not take (absent from the SDK's image_edit_params.py).
_GENERATE_ONLY = ("moderation", "style")
# Parameters that only mean something when there are input images.
_EDIT_ONLY = ("input_fidelity",)
_RESPONSE_FIELDS = ("size", "quality", "background", "output_format")


class OpenAIImagesProvider(OpenAIBatchMixin, _OpenAIClientMixin, Provider[OpenAIImagesConfig]):
    name = "openai"

    def check_tools(self) -> None:
        for tool in self.tools:
            raise UnsupportedToolError(
                f"{type(self.config).__name__} takes no tools ({type(tool).__name__} given): set size, quality, "
                "n... on the config itself. ImageGenerationTool belongs to OpenAIResponsesConfig."
            )

    @property
    def rules(self) -> ImageModelRules:
        return rules_for(self.config.model)

    # --- request ------------------------------------------------------------------------------

    def build_request(self, turn: Turn) -> tuple[str, dict[str, Any], PreparedMask | None]:
        """``("generate" | "edit", keyword arguments for the SDK call, the checked mask)``."""
        rules = self.rules
        prompt = turn.text.strip()
        if turn.instructions:  # the Images API has no instructions field: they lead the prompt
            prompt = f"{turn.instructions.strip()}\n\n{prompt}".strip()
        if not prompt:
            raise InputError("The Images API needs a text prompt, e.g. ask('Make the sky pink', image)")
        if len(prompt) > rules.max_prompt_chars:
            raise InputError(f"The prompt is {len(prompt):,} characters; {rules.family} takes at most "
                             f"{rules.max_prompt_chars:,} (OpenAI API reference)")
        images = turn.images or [ImageInput.from_result(f) for f in (turn.history or [])[:1]]
        action = "edit" if images else "generate"
        params = self.config.params()
        for name, reason in self.config.ignored_params().items():
            warnings.warn(f"{name} not sent: {reason}", InputWarning, stacklevel=2)
            params.pop(name, None)
        mask = None
        if action == "edit":
            images = self._check_images(images, rules)
            for name in _GENERATE_ONLY:
                if params.pop(name, None) is not None:
                    warnings.warn(f"{name} applies to generations only (the edits endpoint has no {name}); "
                                  "not sent with this edit", InputWarning, stacklevel=2)
            if turn.mask is not None:
                mask = prepare_mask(turn.mask, images[0])
                if mask.input.data is None:
                    raise InputError("The Images API takes the mask as a file: pass ImageInput(data=...), "
                                     "ImageInput(path=...) or ImageInput(url=...), not a file_id")
            files = [(f"image_{i}.{EXTENSIONS[im.media_type or 'image/png']}", im.data, im.media_type)
                     for i, im in enumerate(images)]
            request: dict[str, Any] = {"image": files[0] if len(files) == 1 else files}
            if mask is not None:
                request["mask"] = ("mask.png", mask.input.data, "image/png")
        else:
            if turn.mask is not None:
                raise InputError("A mask needs an image to edit: pass the image too, e.g. ask(prompt, image, mask=m)")
            for name in _EDIT_ONLY:
                params.pop(name, None)
            request = {}
        request.update(prompt=prompt, model=self.config.model, **params)
        if not rules.b64_by_default:
            request["response_format"] = "b64_json"  # the legacy models answer short-lived URLs otherwise
        if self.config.extra_body:
            request["extra_body"] = dict(self.config.extra_body)
        return action, request, mask

    def _check_images(self, images: Sequence[ImageInput], rules: ImageModelRules) -> list[ImageInput]:
        """The input images as the model takes them: a type it does not take (a GIF; a JPEG for dall-e-2) is
        converted to PNG, with an ``InputWarning``; whatever cannot be sent is an ``InputError``."""
        if not rules.edits:
            raise ConfigError(f"{rules.family} cannot edit images; use a GPT image model such as gpt-image-2")
        if len(images) > rules.max_input_images:
            raise InputError(f"{len(images)} input images; {rules.family} edits take at most "
                             f"{rules.max_input_images} (OpenAI API reference: image)")
        for k, image in enumerate(images):
            where = "the image to edit" if k == 0 else f"reference image {k}"
            if image.data is None:
                raise InputError(
                    f"The Images API uploads its input images, so {where} ({image!r}) must be bytes or a URL: "
                    "pass ImageInput(path=...), ImageInput(data=...) or ImageInput(url=...), or use "
                    "OpenAIResponsesConfig for file ids"
                )
            if image.media_type not in rules.input_media_types:
                image = _as_png(image, where, rules)
                images = [*images[:k], image, *images[k + 1:]]
            if len(image.data) >= rules.max_input_bytes:
                raise InputError(f"{where} is {human_bytes(len(image.data))}; {rules.family} takes images under "
                                 f"{human_bytes(rules.max_input_bytes)}")
            if rules.square_inputs and image.media_type:
                from .._images import image_size

                size = image_size(image.data, image.media_type)
                if size and size[0] != size[1]:
                    raise InputError(f"{rules.family} edits square images only; {where} is {size[0]}x{size[1]}")
        return list(images)

    # --- run ----------------------------------------------------------------------------------

    async def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        import openai

        action, request, mask = self.build_request(await inline_urls_async(turn))  # it uploads images: no URLs
        stream = self.rules.streaming and (turn.stream or bool(self.config.partial_images))
        parser = _ImagesParser(self.name, self.config.model, action, mask)
        client = self.client()
        call = client.images.edit if action == "edit" else client.images.generate
        try:
            if stream:
                events = await call(**request, stream=True)
                try:
                    async for event in events:
                        for out in parser.feed(event):
                            yield out
                finally:
                    await events.close()
            else:
                for out in parser.whole(await call(**request)):
                    yield out
        except (openai.APIError, *_transport_errors()) as exc:
            raise sdk_error(exc, self.name, parser.files, self.config.timeout) from None
        if stream and not parser.completed:
            raise ProviderError("The stream ended before any image was complete", provider=self.name,
                                files=parser.files)
        yield ReplyEvent(self._reply(parser))

    def _reply(self, parser: _ImagesParser) -> Reply:
        """The reply of a whole answer, or ``ProviderError(undecodable_image)`` carrying every image."""
        undecodable = undecodable_error(parser.files, provider=self.name)
        if undecodable is not None:
            raise undecodable
        if not parser.files:  # n is at least 1: an answer without an image and without an error is a failure
            raise ProviderError("The Images API answered without any image and without an error (empty data); "
                                "nothing was made. Try again, or check base_url if a gateway is in between",
                                provider=self.name, code="no_image")
        usage = openai_usage(parser.usage, self.config.model, image_model=True)
        if usage is not None:
            usage = Usage.combine([usage], images=len(parser.files))
        return Reply(files=list(parser.files), usage=usage, finish_reason="completed", provider=self.name,
                     model=self.config.model, history=list(parser.files)[:1])


    # --- batch (Files + Batches API, "/v1/images/generations" lines) ----------------------------

    batch_endpoint = "/v1/images/generations"

    def batch_request(self, custom_id: str, turn: Turn) -> dict[str, Any]:
        """One JSONL line of ``images.generate`` parameters (Batch API guide: ``/v1/images/generations``)."""
        action, request, _ = self.build_request(inline_urls(turn))
        if action != "generate":  # the set's prompts are text; edits upload their images as multipart
            raise ConfigError("a batch of the Images API generates from text prompts; edit images with "
                              "generate_many() (%%imagine --each -e REF) instead")
        request.update(request.pop("extra_body", None) or {})
        request.pop("partial_images", None)  # partial images only exist on a stream; batch lines never stream
        return {"custom_id": custom_id, "method": "POST", "url": self.batch_endpoint, "body": request}

    def batch_reply(self, body: dict[str, Any]) -> Reply:
        from openai.types import ImagesResponse

        parser = _ImagesParser(self.name, self.config.model, "generate", None)
        try:
            parser.whole(ImagesResponse.construct(**body))  # leniently, as the SDK reads answers
        except ProviderError:
            raise
        except Exception as exc:  # a malformed line must not hide the others
            raise ProviderError(f"unreadable batch result line ({exc!r})", provider=self.name,
                                files=parser.files) from None
        return self._reply(parser)


class AzureOpenAIImagesProvider(_AzureClientMixin, OpenAIImagesProvider):
    name = "azure"
    config: AzureOpenAIImagesConfig
    # Azure serves the Images API on its deployment routes, /openai/deployments/{deployment}/images/...
    # (Microsoft Learn, "How to use image generation models": api-version=2025-04-01-preview).
    default_api_version = "2025-04-01-preview"


class _ImagesParser:
    """Images API answers (whole, or streamed event by event) as results with their metadata."""

    def __init__(self, provider: str, model: str, action: str, mask: PreparedMask | None) -> None:
        self.provider, self.model, self.action = provider, model, action
        self.mask = mask
        self.files: list[BinaryResult] = []
        self.usage: dict[str, Any] | None = None
        self.completed = 0
        self._partials = 0

    def _result(self, b64: str | None, meta: dict[str, Any], *, partial: bool = False,
                **extra: Any) -> BinaryResult | None:
        """The image of ``b64``; None for none (or a partial image that is not one, which is only skipped).
        A final image whose bytes are not an image is kept as it came and named at the end of the answer."""
        data = _decode_image(b64)
        if data is None and (partial or not b64):
            return None
        mask = {"mask": "native"} if self.mask is not None else {}
        fields = {"provider": self.provider, "model": self.model, "api": "images", "action": self.action,
                  **mask, **meta, **extra, **({"partial": True} if partial else {})}
        if data is None:
            return kept(answered_bytes(b64), declared_media_type=_declared(meta.get("output_format")), **fields)
        return result(data, **fields)

    def whole(self, response: Any) -> list[StreamEvent]:
        meta = {name: getattr(response, name, None) for name in _RESPONSE_FIELDS}
        meta["created"] = response.created
        self.usage = response.usage.model_dump(exclude_none=True) if response.usage else None
        events: list[StreamEvent] = []
        for index, item in enumerate(response.data or []):
            if item.b64_json is None and item.url:
                raise ProviderError("The Images API answered a URL instead of image data; nbimagine asks for "
                                    "b64_json, so check the model and base_url", provider=self.provider,
                                    files=self.files)
            image = self._result(item.b64_json, meta, index=index, revised_prompt=item.revised_prompt,
                                 usage=self.usage if len(response.data or []) == 1 else None)
            if image is not None:
                self.files.append(image)
                events.append(ImageEvent(image))
        return events

    def feed(self, event: Any) -> list[StreamEvent]:
        kind = getattr(event, "type", "")
        meta = {name: getattr(event, name, None) for name in _RESPONSE_FIELDS}
        meta["created"] = getattr(event, "created_at", None)
        if kind.endswith(".partial_image"):
            partial = self._result(event.b64_json, meta, partial=True, partial_index=event.partial_image_index,
                                   index=self.completed)
            if partial is None:
                return []
            self._partials += 1
            return [PartialImageEvent(self._partials - 1, partial)]
        if kind.endswith(".completed"):
            usage = event.usage.model_dump(exclude_none=True) if getattr(event, "usage", None) else None
            image = self._result(event.b64_json, meta, index=self.completed, usage=usage)
            self.completed += 1
            if usage:
                self.usage = _add_usage(self.usage, usage)
            if image is None:
                return []
            self.files.append(image)
            return [ImageEvent(image)]
        return []


def _as_png(image: ImageInput, where: str, rules: ImageModelRules) -> ImageInput:
    """``image`` (a type ``rules`` does not take) as a PNG of the same pixels (a GIF's first frame), said with an
    ``InputWarning``; ``InputError`` when the model takes no PNG or the bytes cannot be decoded."""
    import io

    from .._images import open_full

    kinds = ", ".join(EXTENSIONS[m] for m in rules.input_media_types)
    if "image/png" not in rules.input_media_types or image.data is None:
        raise InputError(f"{where} is {image.media_type}; {rules.family} edits take {kinds} images")
    try:
        decoded = open_full(image.data)
    except ImagineError as exc:
        raise InputError(f"{where} cannot be converted to PNG for {rules.family} ({exc})") from None
    out = io.BytesIO()
    decoded.save(out, "PNG")
    warnings.warn(f"{where} was {image.media_type}, which {rules.family} edits do not take ({kinds}): sent as PNG",
                  InputWarning, stacklevel=4)
    return ImageInput(data=out.getvalue(), media_type="image/png", detail=image.detail)


def _declared(output_format: Any) -> str | None:
    return f"image/{output_format}" if isinstance(output_format, str) and output_format else None


def _add_usage(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """Sum token counts (nested dicts too): a stream reports usage per image."""
    if total is None:
        return dict(more)
    out = dict(total)
    for key, value in more.items():
        if isinstance(value, dict):
            out[key] = _add_usage(out.get(key) if isinstance(out.get(key), dict) else None, value)
        elif isinstance(value, int) and isinstance(out.get(key), int):
            out[key] += value
        else:
            out.setdefault(key, value)
    return out

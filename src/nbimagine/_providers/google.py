"""Gemini Developer API and Vertex AI: images from the IMAGE response modality (``google-genai``).

The SDK is imported inside methods only, so ``import nbimagine`` stays cheap.

History is a list of ``google.genai.types.Content``: the user turns and the model's turns with
their parts intact (inline images and ``thought_signature`` bytes included), because Gemini 3
image models reject a follow-up whose earlier image parts lost their signatures. Thought parts
(interim drafts) are left out of the history unless they carry a signature; the API only checks
the signatures of the final parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import os
import re
import warnings
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .._cost import Usage, gemini_usage
from .._images import sniff_media_type
from ..config import GEMINI_BATCH_MAX_BYTES, GeminiConfig, VertexAIConfig, image_config_fields
from ..errors import (
    ConfigError,
    ContentPolicyError,
    ImagineError,
    InputError,
    InputWarning,
    ProviderError,
    UnsupportedToolError,
    register_secret,
)
from ..events import BinaryResult, ImageEvent, ImageInput, PartialImageEvent, ReplyEvent, StreamEvent, TextDeltaEvent
from ._base import (
    BatchLine,
    BatchStatus,
    Provider,
    Turn,
    http_event_hooks,
    json_line,
    kept,
    result,
    status_hint,
    transport_failure,
    undecodable_error,
)
from ._fetch import inline_urls, inline_urls_async
from ._inputs import GEMINI, check_image_count, check_inputs

if TYPE_CHECKING:
    from google.genai import types

__all__ = ["GeminiProvider", "VertexAIProvider"]

# What a finish reason means (the values are google-genai's ``types.FinishReason``; prompt blocks are
# ``types.BlockedReason`` and always a ContentPolicyError). STOP is the only success. These two end an answer
# without (all of) its images and are not errors: the reply says why (finish_reason, finish_message).
NOT_AN_ERROR = frozenset({"NO_IMAGE", "MAX_TOKENS"})
# The safety family, by name, so that a reason added to the API later (IMAGE_SAFETY_V2...) is one too.
_POLICY_NAME = re.compile(r"SAFETY|PROHIBITED|BLOCKLIST|SPII|RECITATION|ARMOR|JAILBREAK")
# Every other reason, including FINISH_REASON_UNSPECIFIED, OTHER, IMAGE_OTHER and reasons this release has
# never heard of, is a ProviderError: a refusal is never a silent empty success.


def finish_outcome(reason: str | None) -> str:
    """``"success"``, ``"no_image"`` (a visible non-error outcome), ``"policy"`` or ``"failure"``."""
    if reason == "STOP":
        return "success"
    if reason in NOT_AN_ERROR:
        return "no_image"
    if reason is not None and _POLICY_NAME.search(reason):
        return "policy"
    return "failure"


_API_KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's own order: GOOGLE_API_KEY wins
_FILES_API = re.compile(r"^(?:https://generativelanguage\.googleapis\.com/[^/]+/)?(files/[A-Za-z0-9_\-]+)$")
_EXT_MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
              ".gif": "image/gif", ".heic": "image/heic", ".heif": "image/heif"}


def _env_api_key() -> str | None:
    return next((os.environ[v] for v in _API_KEY_VARS if os.environ.get(v)), None)


def _enum(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


class GeminiProvider(Provider[GeminiConfig]):
    """``GeminiConfig``: the Gemini Developer API (``generativelanguage.googleapis.com``)."""

    name: ClassVar[str] = "gemini"
    vertex: ClassVar[bool] = False

    def __init__(self, config: GeminiConfig, tools: Sequence[object]) -> None:
        super().__init__(config, tools)
        self._generate_config: Any = None
        fields = image_config_fields(config.image_config)
        self._aspect_ratio = fields.get("aspect_ratio")
        self._image_size = fields.get("image_size")

    # --- setup ---------------------------------------------------------------------------------

    def check_tools(self) -> None:
        for tool in self.tools:
            raise UnsupportedToolError(
                f"{type(self.config).__name__} cannot run {type(tool).__name__}: Gemini makes images "
                "through the IMAGE response modality, not a tool. Drop the tool and set "
                "response_modalities=['TEXT', 'IMAGE'] on an image model such as gemini-3.1-flash-image."
            )

    def _api_key(self) -> str | None:
        return self.config.api_key or _env_api_key()

    def check_credentials(self) -> None:
        key = self._api_key()
        if not key:
            raise ConfigError(
                "Gemini needs an API key: set the GEMINI_API_KEY (or GOOGLE_API_KEY) environment variable, "
                "or pass GeminiConfig(api_key=...). Keys: https://aistudio.google.com/apikey"
            )
        register_secret(key)

    def _http_options(self, transport: Any = None) -> types.HttpOptions:
        from google.genai import types

        retries = self.config.max_retries
        retry = types.HttpRetryOptions(attempts=retries + 1) if retries > 0 else None
        return types.HttpOptions(
            base_url=self.config.base_url,
            api_version=self.config.api_version,
            headers=dict(self.config.headers) if self.config.headers else None,
            timeout=int(self.config.timeout * 1000),  # HttpOptions.timeout is in milliseconds
            retry_options=retry,
            async_client_args={"event_hooks": http_event_hooks(),
                               **({"transport": transport} if transport is not None else {})},
        )

    def endpoint(self) -> str:
        return (self.config.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL")
                or "https://generativelanguage.googleapis.com/")

    def new_client(self, transport: Any = None) -> Any:
        from google import genai

        try:
            client = genai.Client(api_key=self._api_key(), http_options=self._http_options(transport))
        except ValueError as exc:
            raise ConfigError(f"Cannot create the Gemini client: {exc}") from None
        _keep_finish_messages(client)
        return client

    def _config(self) -> Any:
        """The ``GenerateContentConfig`` (built once, before the first request)."""
        if self._generate_config is None:
            from google.genai import types
            from pydantic import ValidationError

            cfg = self.config
            fields: dict[str, Any] = dict(cfg.extra_config or {})
            if cfg.response_modalities is not None:
                fields["response_modalities"] = list(cfg.response_modalities)
            if cfg.image_config is not None:
                image_config = cfg.image_config
                if not isinstance(image_config, types.ImageConfig):
                    raw = (image_config if isinstance(image_config, dict)
                           else image_config.model_dump(exclude_none=True))
                    try:
                        image_config = types.ImageConfig.model_validate(raw)
                    except ValidationError as exc:
                        known = ", ".join(types.ImageConfig.model_fields)
                        raise ConfigError(
                            f"image_config is not a valid google.genai ImageConfig ({_first_error(exc)}); "
                            f"its fields are: {known}"
                        ) from None
                fields["image_config"] = image_config
            if cfg.include_thoughts is not None:
                thinking = fields.get("thinking_config")
                thinking = dict(thinking) if isinstance(thinking, dict) else (
                    thinking.model_dump(exclude_none=True) if thinking is not None else {})
                thinking["include_thoughts"] = cfg.include_thoughts
                fields["thinking_config"] = thinking
            try:
                self._generate_config = types.GenerateContentConfig.model_validate(fields)
            except ValidationError as exc:
                raise ConfigError(f"Invalid Gemini generation config: {_first_error(exc)}") from None
        return self._generate_config

    # --- request -------------------------------------------------------------------------------

    def _part_for(self, item: str | ImageInput) -> Any:
        from google.genai import types

        if isinstance(item, str):
            return types.Part(text=item)
        if item.data is not None:
            return types.Part(inline_data=types.Blob(data=item.data, mime_type=item.media_type))
        uri = item.url or item.file_id or ""
        files_api = _FILES_API.match(uri)
        if files_api and self.vertex:
            raise InputError(
                f"{item!r} names a Gemini Developer API file; Vertex AI has no Files API. Use a gs:// URI, "
                "or pass the image as ImageInput(path=...) / ImageInput(data=...)"
            )
        if item.file_id is not None:
            if files_api:
                uri = f"https://generativelanguage.googleapis.com/v1beta/{files_api[1]}"
            elif not uri.startswith("gs://"):
                where = ("a gs:// URI" if self.vertex
                         else "a Files API name such as 'files/abc123' or a gs:// URI")
                raise InputError(
                    f"ImageInput(file_id={uri!r}) is not a Gemini file: use {where}, or pass the image as "
                    "ImageInput(path=...) / ImageInput(data=...)"
                )
        elif not (uri.startswith("gs://") or files_api):  # http(s) URLs were fetched (inline_urls)
            raise InputError(f"Gemini cannot use the image URL {uri[:80]!r}: use http(s), gs:// or a Files API name")
        media_type = item.media_type or _EXT_MEDIA.get(os.path.splitext(uri.split("?")[0])[1].lower())
        return types.Part(file_data=types.FileData(file_uri=uri, mime_type=media_type))

    @staticmethod
    def _reads_itself(url: str) -> bool:
        """Gemini fetches no http(s) URL itself, only Files API names (gs:// URIs are not http)."""
        return bool(_FILES_API.match(url))

    def _contents(self, turn: Turn) -> tuple[list[Any], Any]:
        from google.genai import types

        history = list(turn.history or [])
        earlier = [part.inline_data.data or b"" for content in history for part in (content.parts or [])
                   if part.inline_data is not None]
        inputs = check_inputs(turn.inputs, GEMINI, earlier_inline_bytes=sum((len(d) + 2) // 3 * 4 for d in earlier),
                              earlier_images=len(earlier))
        parts = [self._part_for(item) for item in inputs]
        if turn.mask is not None:
            parts = self._with_mask_guide(turn, inputs, parts)
        check_image_count(self.config.model, sum(1 for p in parts if p.inline_data or p.file_data),
                          vertex=self.vertex)
        user = types.Content(role="user", parts=parts)
        return [*history, user], user

    def _with_mask_guide(self, turn: Turn, inputs: Sequence[str | ImageInput], parts: list[Any]) -> list[Any]:
        """Gemini has no mask parameter: the documented fallback draws the mask on a copy of the image
        (the region to change tinted and outlined in magenta), sends it right after the image, and
        appends an instruction saying what the marking means. Results say so: ``metadata["mask"] == "guide"``.
        """
        from google.genai import types

        from .._masks import GUIDE_INSTRUCTION, guide_image, prepare_mask

        # ``inputs`` as checked (a GIF converted to PNG): the parts follow that list.
        target = next((item for item in inputs if isinstance(item, ImageInput)), None)
        prepared = prepare_mask(turn.mask, target)  # type: ignore[arg-type]
        if target is None or target.data is None or prepared.input.data is None:
            raise InputError("For Gemini the mask is drawn onto the image as a guide, so both must be bytes: pass "
                             "ImageInput(path=...), ImageInput(data=...) or ImageInput(url=...), not a file id")
        warnings.warn("Gemini has no mask parameter: the mask was drawn onto a copy of the image as a visible "
                      "guide, with an instruction to change only that region; the model may still change other "
                      "areas (results carry metadata['mask'] == 'guide').", InputWarning, stacklevel=2)
        guide = types.Part(inline_data=types.Blob(data=guide_image(target.data, prepared.input.data),
                                                  mime_type="image/png"))
        at = next(i for i, item in enumerate(inputs) if item is target) + 1
        return [*parts[:at], guide, *parts[at:], types.Part(text=GUIDE_INSTRUCTION)]

    # --- response ------------------------------------------------------------------------------

    def _image(self, part: Any, *, model: str, response_id: str | None, finish_reason: str | None,
               index: int, thought: bool = False, mask: str | None = None) -> BinaryResult | None:
        blob = part.inline_data
        data = blob.data if blob is not None else None
        if not data:
            return None
        declared = blob.mime_type
        make = result
        if sniff_media_type(data) is None:
            if (declared and not declared.startswith("image/")) or thought:
                return None  # audio or another non-image payload; a draft is only a progress picture
            make = kept  # an answer's image that is not one is kept as it came, and named by run()'s error
        return make(
            data,
            provider=self.name,
            model=model,
            finish_reason=finish_reason,
            response_id=response_id,
            aspect_ratio=self._aspect_ratio,
            image_size=self._image_size,
            declared_media_type=declared,
            index=index,
            thought=True if thought else None,
            mask=mask,
        )

    def _policy_error(self, reason: str, message: str | None, files: list[BinaryResult],
                      response_id: str | None, *, prompt: bool) -> ContentPolicyError:
        what = "the prompt" if prompt else "the answer"
        detail = f": {message}" if message else ""
        return ContentPolicyError(
            f"Gemini's safety system blocked {what} ({reason}){detail}. Rephrase the request"
            f"{'' if prompt else ' or relax safety_settings in extra_config'}.",
            reason=reason, provider=self.name, code=reason, request_id=response_id, files=files,
        )

    def warm_up(self) -> None:
        # The SDK completes its pydantic models the first time a request is built and an answer read
        # (most of a second); one request config and one answer of the usual shape do it here.
        from google.genai import models, types  # noqa: F401 - models: imported by the first request

        self._config()
        types.GenerateContentResponse._from_response(response=_WARM_UP_RESPONSE, kwargs={})

    def _refusal(self, state: _Collected) -> None:
        """Raise the error a whole answer calls for, if any: ``ContentPolicyError`` for a blocked prompt or a
        safety stop, ``ProviderError`` for any other stop that is not a success (see :func:`finish_outcome`)."""
        if state.block_reason:
            raise self._policy_error(state.block_reason, state.block_message, state.final_files(self),
                                     state.response_id, prompt=True)
        outcome = finish_outcome(state.finish_reason)
        if state.finish_reason is None and (state.images or state.text):
            outcome = "success"  # an answer without a final chunk, but with content: keep what was made
        if outcome == "policy":
            raise self._policy_error(state.finish_reason, state.finish_message, state.final_files(self),
                                     state.response_id, prompt=False)
        if outcome == "failure":
            reason = state.finish_reason or "no finish reason"
            detail = f": {state.finish_message}" if state.finish_message else ""
            raise ProviderError(
                f"Gemini stopped without finishing the answer ({reason}){detail}",
                provider=self.name, code=state.finish_reason, request_id=state.response_id,
                files=state.final_files(self),
            )

    async def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        turn = await inline_urls_async(turn, keep=self._reads_itself)
        contents, user = self._contents(turn)
        config = self._config()
        if turn.instructions:
            config = config.model_copy(update={"system_instruction": turn.instructions})
        state = _Collected(self.config.model, mask="guide" if turn.mask is not None else None)
        holder = self.client()
        raw_messages: list[str] = []
        token = _FINISH_MESSAGES.set(raw_messages)
        if len(contents) == 1:
            # One Content, not a list of one: the SDK's list handling duck-types every item (~0.2 ms each).
            contents = contents[0]
        try:
            if turn.stream:
                stream = await holder.aio.models.generate_content_stream(
                    model=self.config.model, contents=contents, config=config
                )
                async for chunk in _read_in_task(stream):
                    for event in self._absorb(chunk, state, streaming=True):
                        yield event
            else:
                response = await holder.aio.models.generate_content(
                    model=self.config.model, contents=contents, config=config
                )
                for _ in self._absorb(response, state, streaming=False):
                    pass
        except ImagineError:
            raise
        except Exception as exc:  # every SDK/transport failure: typed
            raise self._map_error(exc, state) from exc
        finally:
            with contextlib.suppress(ValueError):  # a stream closed later, from another context
                _FINISH_MESSAGES.reset(token)

        if state.finish_message is None and raw_messages:
            state.finish_message = raw_messages[-1]
        self._refusal(state)
        files = state.final_files(self)
        for image in files:
            yield ImageEvent(image)
        undecodable = undecodable_error(files, provider=self.name, request_id=state.response_id)
        if undecodable is not None:
            raise undecodable
        from google.genai import types

        history = [*(turn.history or []), user]
        if state.kept_parts:
            history.append(types.Content(role="model", parts=state.kept_parts))
        from .._agent import Reply

        yield ReplyEvent(Reply(
            body="".join(state.text),
            files=files,
            usage=_usage(state, len(files)),
            finish_reason=state.finish_reason,
            finish_message=state.finish_message,
            response_id=state.response_id,
            provider=self.name,
            model=state.model,
            history=history,
        ))

    def _absorb(self, response: Any, state: _Collected, *, streaming: bool) -> list[StreamEvent]:
        """Fold one response (or stream chunk) into ``state``; return the live events it gives."""
        events: list[StreamEvent] = []
        state.response_id = response.response_id or state.response_id
        state.model = response.model_version or state.model
        if response.usage_metadata is not None:  # a stream's last chunk carries the final figures
            state.usage = response.usage_metadata.model_dump(mode="json", by_alias=True, exclude_none=True)
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            state.block_reason = _enum(feedback.block_reason)
            state.block_message = feedback.block_reason_message
        for candidate in (response.candidates or [])[:1]:
            if candidate.finish_reason is not None:
                state.finish_reason = _enum(candidate.finish_reason)
                state.finish_message = candidate.finish_message
            parts = candidate.content.parts if candidate.content is not None else None
            for part in parts or []:
                if part.thought:
                    if part.thought_signature:
                        state.kept_parts.append(part)
                    if part.inline_data is not None and streaming:
                        draft = self._image(part, model=state.model, response_id=state.response_id,
                                            finish_reason=None, index=state.partials, thought=True,
                                            mask=state.mask)
                        if draft is not None:
                            events.append(PartialImageEvent(state.partials, draft))
                            state.partials += 1
                    continue
                if part.inline_data is not None:
                    state.kept_parts.append(part)
                    state.images.append(part)
                elif part.text is not None:
                    if part.text or part.thought_signature:
                        state.kept_parts.append(part)
                    if part.text:
                        state.text.append(part.text)
                        if streaming:
                            events.append(TextDeltaEvent(part.text))
                else:
                    state.kept_parts.append(part)
        return events

    def _map_error(self, exc: Exception, state: _Collected) -> ImagineError:
        from google.genai import errors

        files = state.safe_files(self)
        if isinstance(exc, errors.APIError):
            hint = ""
            if exc.code in (401, 403):
                hint = " Check the API key / credentials and that the API is enabled for the project."
            elif status_hint(exc.code):
                hint = f" ({status_hint(exc.code)})"
            return ProviderError(
                f"{exc.message or exc.status or 'request failed'}{hint}",
                provider=self.name, status=exc.code, code=exc.status, files=files,
                request_id=state.response_id, **_retry_info(exc),
            )
        name = type(exc).__name__
        if name in ("DefaultCredentialsError", "RefreshError", "TransportError") and "google.auth" in type(
                exc).__module__:
            return ConfigError(
                f"Vertex AI credentials are not usable ({exc}). Pass VertexAIConfig(credentials=...), run "
                "'gcloud auth application-default login', or use express mode with "
                "VertexAIConfig(api_key=...)."
            )
        if isinstance(exc, ValueError) and "only supported in" in str(exc):
            return ConfigError(f"{exc} Use VertexAIConfig for this field.")
        dropped = transport_failure(exc)
        if dropped is not None:
            return ProviderError(dropped, provider=self.name, files=files, request_id=state.response_id)
        return ProviderError(
            f"The Gemini request failed before a complete answer arrived ({name}: {exc})",
            provider=self.name, code=name, files=files, request_id=state.response_id,
        )


    # --- batch (batchGenerateContent with a JSONL file from the Files API) -----------------------

    def batch_request(self, custom_id: str, turn: Turn) -> dict[str, Any]:
        """One JSONL line: ``{"key", "request": GenerateContentRequest}`` in REST (camelCase) form.

        Always a file, never inline requests: image answers make inline results huge, and Google
        recommends the file for anything but small batches (Batch API guide, "Input file").
        """
        if self.vertex:
            raise ConfigError("Vertex AI batch prediction reads and writes Cloud Storage or BigQuery, which "
                              "nbimagine does not drive; use generate_many() (%%imagine --each), or the Gemini "
                              "Developer API (GeminiConfig) for a batch")
        contents, _ = self._contents(inline_urls(turn, keep=self._reads_itself))
        request: dict[str, Any] = {
            "contents": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in contents]}
        config = self._config().model_dump(mode="json", by_alias=True, exclude_none=True)
        config.pop("httpOptions", None)
        # These GenerateContentConfig fields sit beside generationConfig in a REST request.
        for name in ("safetySettings", "tools", "toolConfig", "cachedContent", "labels"):
            if name in config:
                request[name] = config.pop(name)
        instructions = config.pop("systemInstruction", None) or turn.instructions
        if instructions:
            request["systemInstruction"] = ({"parts": [{"text": instructions}]} if isinstance(instructions, str)
                                            else instructions)
        if config:
            request["generationConfig"] = config
        return {"key": custom_id, "request": request}

    batch_limits = (None, GEMINI_BATCH_MAX_BYTES)

    async def batch_upload(self, data: bytes, *, name: str) -> str:
        try:
            uploaded = await self.client().aio.files.upload(
                file=io.BytesIO(data), config={"mime_type": "application/jsonl", "display_name": name})
        except ImagineError:
            raise
        except Exception as exc:
            raise self._map_error(exc, _Collected(self.config.model)) from exc
        return str(uploaded.name)

    async def batch_create(self, file_id: str, *, name: str) -> BatchStatus:
        try:
            job = await self.client().aio.batches.create(model=self.config.model, src=file_id,
                                                         config={"display_name": name})
        except ImagineError:
            raise
        except Exception as exc:
            raise self._map_error(exc, _Collected(self.config.model)) from exc
        return _batch_status(job)

    async def batch_find(self, name: str, since: float) -> BatchStatus | None:
        # The display name set at creation names the job (the list is newest first).
        try:
            async for job in await self.client().aio.batches.list(config={"page_size": 100}):
                if job.display_name == name:
                    return _batch_status(job)
                created = job.create_time.timestamp() if job.create_time else None
                if created is not None and created < since - 300:  # five minutes of clock skew allowed
                    return None
        except Exception as exc:
            raise self._map_error(exc, _Collected(self.config.model)) from exc
        return None

    async def batch_status(self, job_id: str) -> BatchStatus:
        try:
            return _batch_status(await self.client().aio.batches.get(name=job_id))
        except Exception as exc:
            raise self._map_error(exc, _Collected(self.config.model)) from exc

    async def batch_cancel(self, job_id: str) -> BatchStatus:
        try:
            await self.client().aio.batches.cancel(name=job_id)
        except Exception as exc:
            raise self._map_error(exc, _Collected(self.config.model)) from exc
        return await self.batch_status(job_id)

    async def batch_results(self, status: BatchStatus) -> AsyncIterator[BatchLine]:
        from google.genai import types

        dest = status.output
        if dest is None:
            return
        if dest.file_name:
            try:
                data = await self.client().aio.files.download(file=dest.file_name)
            except Exception as exc:
                raise self._map_error(exc, _Collected(self.config.model)) from exc
            for raw in data.splitlines():
                record = json_line(raw)
                if record is not None:
                    yield self._batch_line(str(record.get("key")), record.get("response"), record.get("error"),
                                           types)
        for index, inlined in enumerate(dest.inlined_responses or []):
            key = (inlined.metadata or {}).get("key", str(index))
            yield self._batch_line(str(key), inlined.response, inlined.error, types)

    def _batch_line(self, key: str, response: Any, error: Any, types: Any) -> BatchLine:
        if response is None:
            error = error.model_dump(exclude_none=True) if hasattr(error, "model_dump") else (error or {})
            code = error.get("code")
            return BatchLine(key, error=ProviderError(error.get("message") or "the request failed",
                                                      provider=self.name, status=code if isinstance(code, int)
                                                      else None, code=str(code) if code is not None else None))
        state = _Collected(self.config.model)
        try:
            if isinstance(response, dict):
                response = types.GenerateContentResponse.model_validate(response)
            self._absorb(response, state, streaming=False)
            self._refusal(state)
            files = state.final_files(self)
            undecodable = undecodable_error(files, provider=self.name, request_id=state.response_id)
            if undecodable is not None:
                raise undecodable
            from .._agent import Reply

            return BatchLine(key, reply=Reply(body="".join(state.text), files=files,
                                              usage=_usage(state, len(files)), finish_reason=state.finish_reason,
                                              finish_message=state.finish_message, response_id=state.response_id,
                                              provider=self.name, model=state.model))
        except ProviderError as exc:
            return BatchLine(key, error=exc)
        except Exception as exc:  # a malformed line must not hide the others
            return BatchLine(key, error=ProviderError(f"unreadable batch result line ({exc!r})", provider=self.name,
                                                      files=state.safe_files(self)))


_GEMINI_BATCH_STATES = {"JOB_STATE_PENDING": "validating", "JOB_STATE_QUEUED": "validating",
                        "JOB_STATE_RUNNING": "in_progress", "JOB_STATE_SUCCEEDED": "completed",
                        "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLING": "cancelling",
                        "JOB_STATE_CANCELLED": "cancelled", "JOB_STATE_EXPIRED": "expired",
                        "JOB_STATE_PARTIALLY_SUCCEEDED": "completed"}


def _batch_status(job: Any) -> BatchStatus:
    raw = _enum(job.state) or "JOB_STATE_UNSPECIFIED"
    stats = getattr(job, "completion_stats", None)
    total = completed = failed = None
    if stats is not None:
        completed = stats.successful_count
        failed = stats.failed_count
        total = sum(n or 0 for n in (completed, failed, stats.incomplete_count)) or None
    errors = (job.error.message,) if getattr(job, "error", None) is not None and job.error.message else ()
    return BatchStatus(job_id=job.name, state=_GEMINI_BATCH_STATES.get(raw, "in_progress"), raw=raw, total=total,
                       completed=completed, failed=failed, errors=errors, output=job.dest)


def _retry_info(exc: Any) -> dict[str, float]:
    """``retry_after`` from Google's RetryInfo (or a ``retry-after`` header) and ``rate_limit`` from a
    per-minute QuotaFailure's ``quotaValue`` (google.rpc error details of a RESOURCE_EXHAUSTED)."""
    out: dict[str, float] = {}
    details = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else {}
    for detail in details.get("details") or [] if isinstance(details, dict) else []:
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            match = re.fullmatch(r"\s*([\d.]+)s\s*", str(detail.get("retryDelay", "")))
            if match:
                out["retry_after"] = float(match[1])
        elif kind.endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                if "PerMinute" in str(violation.get("quotaId", "")) and violation.get("quotaValue"):
                    with contextlib.suppress(TypeError, ValueError):
                        out["rate_limit"] = float(violation["quotaValue"])
    if "retry_after" not in out:
        headers = getattr(getattr(exc, "response", None), "headers", None)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out["retry_after"] = float(headers["retry-after"])  # type: ignore[index]
    return out


class VertexAIProvider(GeminiProvider):
    """``VertexAIConfig``: Gemini on Vertex AI (project + location + credentials, or express mode)."""

    name: ClassVar[str] = "vertex"
    vertex: ClassVar[bool] = True
    config: VertexAIConfig

    def _mode(self) -> tuple[str | None, str | None, str | None]:
        """(api_key, project, location): express mode has only a key; project mode has no key."""
        cfg = self.config
        if cfg.api_key:
            return cfg.api_key, None, None
        project = cfg.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if project:
            return None, project, cfg.location or os.environ.get("GOOGLE_CLOUD_LOCATION") or "global"
        key = _env_api_key() if cfg.credentials is None else None
        return key, None, None

    def check_credentials(self) -> None:
        key, project, _ = self._mode()
        if not key and not project:
            raise ConfigError(
                "Vertex AI needs a project: set GOOGLE_CLOUD_PROJECT (and GOOGLE_CLOUD_LOCATION, "
                "default 'global') or pass VertexAIConfig(project=..., location=...) with credentials= "
                "(or Application Default Credentials from 'gcloud auth application-default login');"
                " for express mode pass "
                "VertexAIConfig(api_key=...) or set GOOGLE_API_KEY."
            )
        register_secret(key)

    def endpoint(self) -> str:
        _, _, location = self._mode()
        region = "" if location in (None, "global") else f"{location}-"
        return (self.config.base_url or os.environ.get("GOOGLE_VERTEX_BASE_URL")
                or f"https://{region}aiplatform.googleapis.com/")

    def new_client(self, transport: Any = None) -> Any:
        from google import genai

        key, project, location = self._mode()
        options = self._http_options(transport)
        try:
            if key:
                return genai.Client(vertexai=True, api_key=key, http_options=options)
            return genai.Client(vertexai=True, project=project, location=location,
                                credentials=self.config.credentials, http_options=options)
        except ValueError as exc:
            raise ConfigError(f"Cannot create the Vertex AI client: {exc}") from None
        except Exception as exc:  # google.auth errors while looking for credentials
            raise self._map_error(exc, _Collected(self.config.model)) from None


class _Collected:
    """What a response (or all chunks of a stream) said so far."""

    def __init__(self, model: str, mask: str | None = None) -> None:
        self.model = model
        self.mask = mask
        self.response_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.finish_message: str | None = None
        self.block_reason: str | None = None
        self.block_message: str | None = None
        self.text: list[str] = []
        self.images: list[Any] = []
        self.kept_parts: list[Any] = []
        self.partials = 0

    def final_files(self, provider: GeminiProvider) -> list[BinaryResult]:
        files = []
        for part in self.images:
            image = provider._image(part, model=self.model, response_id=self.response_id,
                                    finish_reason=self.finish_reason, index=len(files), mask=self.mask)
            if image is not None:
                files.append(image)
        return files

    def safe_files(self, provider: GeminiProvider) -> list[BinaryResult]:
        try:
            return self.final_files(provider)
        except ProviderError:
            return []


def _usage(state: _Collected, images: int) -> Usage | None:
    usage = gemini_usage(state.usage, state.model)
    return None if usage is None else Usage.combine([usage], images=images)


# finishMessage values read from the raw answers of the request in progress (see _keep_finish_messages).
_FINISH_MESSAGES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("_FINISH_MESSAGES",
                                                                                     default=None)
_FINISH_MESSAGE = re.compile(r'"finishMessage"\s*:\s*("(?:[^"\\]|\\.)*")')


def _keep_finish_messages(client: Any) -> None:
    """Read ``candidates[].finishMessage`` from the Developer API's raw answers.

    google-genai turns a Developer API answer into its types through ``models._Candidate_from_mldev``, which
    copies no ``finishMessage`` (Vertex answers keep it), so Google's explanation of a refusal would be lost.
    The client's raw-answer methods are wrapped to note the message for the request in progress.
    """
    api = getattr(client, "_api_client", None)
    if api is None or getattr(api, "vertexai", False) or not hasattr(api, "async_request_streamed"):
        return
    request, streamed = api.async_request, api.async_request_streamed

    def note(response: Any) -> None:
        found = _FINISH_MESSAGES.get()
        body = getattr(response, "body", None)
        if found is not None and isinstance(body, str) and '"finishMessage"' in body:
            match = _FINISH_MESSAGE.search(body)
            if match:
                found.append(json.loads(match[1]))

    async def async_request(*args: Any, **kwargs: Any) -> Any:
        response = await request(*args, **kwargs)
        note(response)
        return response

    async def async_request_streamed(*args: Any, **kwargs: Any) -> Any:
        responses = await streamed(*args, **kwargs)

        async def noted() -> AsyncIterator[Any]:
            async for response in responses:
                note(response)
                yield response

        return noted()

    api.async_request, api.async_request_streamed = async_request, async_request_streamed


async def _read_in_task(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``stream``'s chunks, read by a task of its own that is cancelled when this generator closes.

    Closing the SDK's stream does not end the HTTP request: its nested generators form a reference
    cycle, so the response stays open until the garbage collector runs. Cancelling a task that is
    waiting on the network unwinds those generators, and their ``finally`` closes the response.
    """
    queue: asyncio.Queue[tuple[Any, Exception | None]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((chunk, None))
        except Exception as exc:
            queue.put_nowait((None, exc))
        else:
            queue.put_nowait((_END, None))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is _END:
                return
            yield chunk
    finally:
        task.cancel()
        await asyncio.wait({task})


_END = object()


# An answer of the usual shape (an image and a text part), as the Developer API sends it (recorded fixtures).
_WARM_UP_RESPONSE: dict[str, Any] = {
    "candidates": [{"content": {"role": "model", "parts": [
        {"text": ""}, {"inlineData": {"mimeType": "image/png", "data": ""}}]},
        "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
    "modelVersion": "gemini-warm-up", "responseId": "warm-up",
}


def _first_error(exc: Any) -> str:
    try:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    except Exception:
        return str(exc).splitlines()[0]

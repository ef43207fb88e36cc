"""OpenAI Responses API (server-side image tool), Azure OpenAI / Foundry, and Chat Completions.

The ``openai`` SDK is imported inside methods, on first use, so ``import nbimagine`` stays fast.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from .._agent import Reply
from .._cost import Usage, openai_usage
from .._images import b64decode_any, data_url, sniff_media_type
from .._masks import prepare_mask
from ..config import (
    OPENAI_BATCH_MAX_BYTES,
    OPENAI_BATCH_MAX_REQUESTS,
    AzureOpenAIResponsesConfig,
    OpenAIConfig,
    OpenAIResponsesConfig,
)
from ..errors import (
    ConfigError,
    ContentPolicyError,
    InputError,
    ProviderError,
    UnsupportedToolError,
    register_secret,
)
from ..events import (
    BinaryResult,
    ImageEvent,
    ImageInput,
    PartialImageEvent,
    ReplyEvent,
    StreamEvent,
    TextDeltaEvent,
)
from ..tools import ImageGenerationTool
from ._background import RESULT_MISSING, BackgroundRun
from ._base import (
    BatchLine,
    BatchStatus,
    Input,
    Provider,
    Turn,
    http_event_hooks,
    json_line,
    kept,
    rate_headers,
    result,
    status_hint,
    transport_failure,
    undecodable_error,
)
from ._inputs import OPENAI, check_inputs

# Error codes OpenAI and Azure use when a safety system blocked a prompt or an image.
_POLICY_CODES = frozenset({
    "moderation_blocked", "content_filter", "content_policy_violation", "image_content_policy_violation",
    "responsible_ai_policy_violation",
})
_IMAGE_FIELDS = ("revised_prompt", "size", "quality", "background", "output_format", "action")
_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"


@dataclass
class _History:
    """What a Responses reply needs to continue its conversation.

    With ``store=True`` the server keeps the conversation: only ``response_id`` is sent back.
    With ``store=False`` nothing is kept server-side, so earlier turns travel as ``items`` and the
    images made in the last turn go back as input images (references by item id would fail).
    """

    response_id: str | None
    items: list[dict[str, Any]] = field(default_factory=list)
    images: list[BinaryResult] = field(default_factory=list)


class _OpenAIClientMixin:
    config: Any
    name: str
    key_env = "OPENAI_API_KEY"
    states_rate_limit = True  # x-ratelimit-limit-requests on every answer (rate-limits guide)

    def _api_key(self) -> str | None:
        return self.config.api_key or os.environ.get(self.key_env) or None

    def check_credentials(self) -> None:
        key = self._api_key()
        if not key:
            raise ConfigError(
                f"No API key for {type(self.config).__name__}: set the {self.key_env} environment variable "
                "(in a notebook: os.environ[...] = getpass.getpass()) or pass api_key=..."
            )
        register_secret(key)

    def endpoint(self) -> str:
        return self.config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"

    def new_client(self, transport: Any = None) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            api_key=self._api_key(),
            base_url=self.config.base_url,
            organization=self.config.organization,
            project=self.config.project,
            timeout=self.config.timeout,
            max_retries=self.config.max_retries,
            default_headers=dict(self.config.headers or {}),
            http_client=_http_client(transport),
        )


class OpenAIBatchMixin:
    """The Batch API (Files + Batches) for a provider whose request lines go to ``batch_endpoint``.

    The provider builds its lines (``batch_request``) and reads one successful line's body
    (``batch_reply``); uploading, creating, polling, cancelling and reading the output and error
    files are the same for every endpoint (OpenAI Batch API guide).
    """

    name: str
    config: Any
    batch_endpoint: str

    batch_limits = (OPENAI_BATCH_MAX_REQUESTS, OPENAI_BATCH_MAX_BYTES)

    def batch_reply(self, body: dict[str, Any]) -> Reply:
        raise NotImplementedError

    async def batch_upload(self, data: bytes, *, name: str) -> str:
        async with self._mapped_errors():
            uploaded = await self.client().files.create(file=(f"{name}.jsonl", data, "application/jsonl"),
                                                        purpose="batch")
        return uploaded.id

    async def batch_create(self, file_id: str, *, name: str) -> BatchStatus:
        async with self._mapped_errors():
            batch = await self.client().batches.create(input_file_id=file_id, endpoint=self.batch_endpoint,
                                                       completion_window="24h", metadata={"nbimagine": name})
        return _batch_status(batch)

    async def batch_find(self, name: str, since: float) -> BatchStatus | None:
        # The metadata set at creation names the job; the list is newest first, so it stops at older jobs.
        async with self._mapped_errors():
            async for batch in self.client().batches.list(limit=100):
                if (batch.metadata or {}).get("nbimagine") == name:
                    return _batch_status(batch)
                if batch.created_at < since - 300:  # five minutes of clock skew allowed
                    return None
        return None

    async def batch_status(self, job_id: str) -> BatchStatus:
        async with self._mapped_errors():
            return _batch_status(await self.client().batches.retrieve(job_id))

    async def batch_cancel(self, job_id: str) -> BatchStatus:
        async with self._mapped_errors():
            return _batch_status(await self.client().batches.cancel(job_id))

    async def batch_results(self, status: BatchStatus) -> AsyncIterator[BatchLine]:
        client = self.client()
        for file_id in status.output or ():
            async with self._mapped_errors(), client.files.with_streaming_response.content(file_id) as stream:
                async for raw in stream.iter_lines():
                    record = json_line(raw)
                    if record is not None:  # a line that cannot be read names no request: it shows as missing
                        yield self._batch_line(record)

    def _batch_line(self, record: dict[str, Any]) -> BatchLine:
        custom_id = str(record.get("custom_id"))
        answer = record.get("response") or {}
        error = record.get("error")
        if error:  # never executed: batch_expired, batch_cancelled...
            return BatchLine(custom_id, error=ProviderError(error.get("message") or "the request was not executed",
                                                            provider=self.name, code=error.get("code")))
        body = answer.get("body") or {}
        status = answer.get("status_code")
        if status != 200:
            detail = body.get("error") if isinstance(body, dict) else None
            detail = detail if isinstance(detail, dict) else {}
            code = detail.get("code")
            message = detail.get("message") or f"the request failed with HTTP {status}"
            kwargs: dict[str, Any] = {"provider": self.name, "status": status, "code": code,
                                      "request_id": answer.get("request_id")}
            if code in _POLICY_CODES:
                return BatchLine(custom_id, error=ContentPolicyError(message, reason=code, **kwargs))
            return BatchLine(custom_id, error=ProviderError(message, **kwargs))
        try:
            return BatchLine(custom_id, reply=self.batch_reply(body))
        except ProviderError as exc:
            return BatchLine(custom_id, error=exc)

    def _mapped_errors(self) -> Any:
        return _MappedErrors(self.name, self.config.timeout)


class _MappedErrors:
    """``async with``: the SDK's errors as ours (``sdk_error``, the same mapping as a generation request)."""

    def __init__(self, provider: str, timeout: float) -> None:
        self.provider = provider
        self.timeout = timeout

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        import openai

        if isinstance(exc, (openai.APIError, *_transport_errors())):
            raise sdk_error(exc, self.provider, (), self.timeout) from None
        return False


class OpenAIResponsesProvider(OpenAIBatchMixin, _OpenAIClientMixin, Provider[OpenAIResponsesConfig]):
    name = "openai"

    def check_tools(self) -> None:
        for tool in self.tools:
            if not isinstance(tool, ImageGenerationTool):
                raise UnsupportedToolError(
                    f"{type(self.config).__name__} supports ImageGenerationTool only, not {type(tool).__name__}"
                )
        # Observed: OpenAI answers 400 "Tool choice 'image_generation' not found in 'tools' parameter."
        if self.config.tool_choice == "image_generation" and self._image_tool is None:
            raise ConfigError(
                "tool_choice='image_generation' forces the image tool, but there is none: pass "
                "tools=[ImageGenerationTool(...)] to the Agent, or drop tool_choice"
            )

    @property
    def _image_tool(self) -> ImageGenerationTool | None:
        return next((t for t in self.tools if isinstance(t, ImageGenerationTool)), None)

    def extra_headers(self) -> dict[str, str]:
        return {}

    def _image_model(self) -> str | None:
        """The image model as configured (the answer's echo of the tool, when present, wins)."""
        tool = self._image_tool
        return tool.model if tool else None

    def cost(self, reply: Any) -> Any:
        """Like every provider's, plus: when an answer does not report the image tool's tokens (``tool_usage``
        came in 2026), each image's tokens come from OpenAI's documented table for its size and quality."""
        from .._cost import is_emulated, price

        usage: Usage | None = reply.usage
        if usage is None:
            return None  # no usage at all: the chat model's part is unknown, and a partial sum is no bill
        reported = usage.output_image_tokens is not None
        estimated = [] if reported or not reply.files else _documented_image_usage(reply.files, self._image_tool)
        if estimated is None:
            return None
        cost = price(usage, self.name, simulated=is_emulated(self.endpoint()), estimated_parts=estimated)
        unnamed = [f for f in reply.files if not f.metadata.get("image_model")]
        if cost is not None and estimated and unnamed:
            assumed = estimated[reply.files.index(unnamed[0])].model
            cost = dataclasses.replace(cost, note=f"{cost.note}; the answer does not name its image model: "
                                                  f"{assumed} assumed")
        return cost

    # --- request ------------------------------------------------------------------------------

    def build_request(self, turn: Turn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The ``responses.create`` arguments, and the input items (kept for store=False history)."""
        history: _History | None = turn.history
        earlier = history.images if history and not self.config.store else []
        inputs = check_inputs([*map(ImageInput.from_result, earlier), *turn.inputs], OPENAI)
        message = {"role": "user", "content": _content(inputs)}
        items = [*(history.items if history and not self.config.store else []), message]
        request: dict[str, Any] = {"model": self.config.model, "input": items}
        if turn.instructions:
            request["instructions"] = turn.instructions
        if self.tools:
            mask = self._mask(turn, history)
            request["tools"] = [_tool_param(tool, mask) for tool in self.tools]
        elif turn.mask is not None:
            raise ConfigError("A mask needs the image tool: give the agent tools=[ImageGenerationTool()]")
        if self.config.tool_choice == "image_generation":
            request["tool_choice"] = {"type": "image_generation"}
        elif self.config.tool_choice:
            request["tool_choice"] = self.config.tool_choice
        if not self.config.store:
            request["store"] = False
        elif history and history.response_id:
            request["previous_response_id"] = history.response_id
        headers = self.extra_headers()
        if headers:
            request["extra_headers"] = headers
        if self.config.extra_body:
            request["extra_body"] = dict(self.config.extra_body)
        return request, items

    def _mask(self, turn: Turn, history: _History | None) -> ImageInput | None:
        """The checked mask of this turn (``ask(mask=...)`` wins over the tool's ``input_image_mask``)."""
        tool = self._image_tool
        mask = turn.mask or (tool.input_image_mask if tool else None)
        if mask is None:
            return None
        earlier = [ImageInput.from_result(image) for image in (history.images if history else [])]
        target = (turn.images or earlier or [None])[0]
        if target is None and (turn.mask is None or (history is not None and history.response_id)):
            # No image here to check against: the tool's own mask on a plain prompt, or the stored
            # conversation's last image (the server checks that one).
            return mask
        return prepare_mask(mask, target).input

    # --- run ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        # The SDK builds a pydantic adapter for each union it meets in an answer, the first time it meets
        # it (about a second); one answer of the usual shape builds them all here.
        from openai.resources.responses import AsyncResponses  # noqa: F401 - imported by the first create()
        from openai.types.responses import Response, response_create_params

        Response.construct(**_WARM_UP_RESPONSE)
        # And the request side: the SDK reads the type hints of every parameter it sends, once.
        with contextlib.suppress(Exception):  # best effort: openai._utils is not a public API
            from openai._utils import maybe_transform

            request, _ = self.build_request(Turn(inputs=["warm-up"], history=None, instructions=None, stream=False))
            maybe_transform(request, response_create_params.ResponseCreateParamsNonStreaming)

    async def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        import openai

        request, items = self.build_request(turn)
        tool = self._image_tool
        # Partial images only exist on a stream, so a plain ask() streams too when they were requested.
        streaming = turn.stream or bool(tool and tool.partial_images)
        masked = any("input_image_mask" in t for t in request.get("tools", []))
        parser = _ResponseParser(self.name, self.config.model, self._image_model(), mask="native" if masked else None)
        client = self.client()
        background = None
        try:
            if self.config.background:
                background = BackgroundRun(client, parser, provider=self.name, poll_interval=self.config.poll_interval)
                async with aclosing(background.events(request, stream=streaming)) as events:
                    async for out in events:
                        yield out
                response = background.response
            elif streaming:
                stream = await client.responses.create(**request, stream=True)
                try:
                    async for event in stream:
                        for out in parser.feed(event):
                            yield out
                finally:
                    await stream.close()
                response = parser.final_response()
            else:
                response = await client.responses.create(**request)
                parser.begin(response)
                for out in parser.parse_output(response.output):
                    yield out
        except (openai.APIError, *_transport_errors()) as exc:
            raise sdk_error(exc, self.name, parser.files, self.config.timeout) from None
        yield ReplyEvent(parser.reply(response, items, store=self.config.store))

    # --- batch (Files + Batches API, "/v1/responses" lines) ------------------------------------

    batch_endpoint = "/v1/responses"

    def batch_request(self, custom_id: str, turn: Turn) -> dict[str, Any]:
        """One JSONL line: ``{"custom_id", "method": "POST", "url": "/v1/responses", "body"}`` (Batch API guide)."""
        request, _ = self.build_request(turn)
        if request.pop("extra_headers", None):
            raise ConfigError(f"{type(self.config).__name__} needs a request header for the image tool, which a "
                              "batch line cannot carry; use generate_many() (%%imagine --each) instead")
        request.update(request.pop("extra_body", None) or {})
        for tool in request.get("tools", []):
            tool.pop("partial_images", None)  # partial images only exist on a stream; batch lines never stream
        return {"custom_id": custom_id, "method": "POST", "url": self.batch_endpoint, "body": request}

    def batch_reply(self, body: dict[str, Any]) -> Reply:
        from openai.types.responses import Response

        parser = _ResponseParser(self.name, self.config.model, self._image_model())
        try:
            # construct(), not model_validate(): as the SDK itself reads answers, leniently (a field the
            # installed SDK does not know yet, or one the service left out, must not lose the image).
            response = Response.construct(**body)
            parser.begin(response)
            parser.parse_output(response.output)
            return parser.reply(response, [], store=self.config.store)
        except ProviderError:
            raise
        except Exception as exc:  # a malformed line must not hide the others
            raise ProviderError(f"unreadable batch result line ({exc!r})", provider=self.name,
                                files=parser.files) from None


# An answer of the usual shape (an image call and a message), as OpenAI sends it (recorded fixtures).
_WARM_UP_RESPONSE: dict[str, Any] = {
    "id": "resp_warm_up", "object": "response", "created_at": 0, "status": "completed", "model": "gpt-5",
    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [{"type": "image_generation"}],
    "output": [
        {"type": "image_generation_call", "id": "ig_warm_up", "status": "completed", "result": "",
         "size": "1024x1024", "quality": "low", "background": "opaque", "output_format": "png"},
        {"type": "message", "id": "msg_warm_up", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "", "annotations": []}]},
    ],
    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
              "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
}


def _batch_status(batch: Any) -> BatchStatus:
    counts = batch.request_counts
    errors = tuple(f"line {e.line}: {e.message}" if e.line else str(e.message)
                   for e in ((batch.errors.data or []) if batch.errors else []))
    return BatchStatus(
        job_id=batch.id, state=batch.status, raw=batch.status, total=counts.total if counts else None,
        completed=counts.completed if counts else None, failed=counts.failed if counts else None, errors=errors,
        output=tuple(f for f in (batch.output_file_id, batch.error_file_id) if f),
    )


class _AzureClientMixin(_OpenAIClientMixin):
    """Azure credentials, endpoint and client, shared by the Responses and the Images API providers."""

    states_rate_limit = False  # Azure sends the remaining count, not the limit

    def batch_request(self, custom_id: str, turn: Turn) -> dict[str, Any]:
        # Azure runs batches on a Global-Batch deployment of its own (Microsoft Learn, "Azure OpenAI
        # batch"), which this config does not name.
        raise ConfigError(f"{type(self).__name__.removesuffix('Provider')}: nbimagine does not drive Azure OpenAI "
                          "batch jobs (they need a Global-Batch deployment); use generate_many() "
                          "(%%imagine --each) to run the set now")

    key_env = "AZURE_OPENAI_API_KEY"
    # None: the v1 surface (/openai/v1/...); a dated version: the deployment routes (/openai/deployments/...).
    default_api_version: str | None = None

    def _ad_token(self) -> str | None:
        return self.config.azure_ad_token or os.environ.get("AZURE_OPENAI_AD_TOKEN") or None

    def _endpoint(self) -> str | None:
        return self.config.base_url or self.config.azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")

    def check_credentials(self) -> None:
        if not (self._api_key() or self._ad_token()):
            raise ConfigError(
                "No Azure OpenAI credentials: set AZURE_OPENAI_API_KEY (or AZURE_OPENAI_AD_TOKEN), "
                f"or pass api_key=... to {type(self.config).__name__}"
            )
        register_secret(self._api_key())
        register_secret(self._ad_token())
        if not self._endpoint():
            raise ConfigError(
                "No Azure OpenAI endpoint: set AZURE_OPENAI_ENDPOINT (https://<resource>.openai.azure.com) "
                "or pass azure_endpoint=... (or base_url=.../openai/v1/)"
            )

    def endpoint(self) -> str:
        return self._endpoint() or ""

    def new_client(self, transport: Any = None) -> Any:
        from openai import AsyncAzureOpenAI

        version = self.config.api_version or os.environ.get("OPENAI_API_VERSION") or self.default_api_version
        endpoint = self._endpoint() or ""
        common: dict[str, Any] = {
            "api_key": self._api_key(),
            "azure_ad_token": self._ad_token(),
            "timeout": self.config.timeout,
            "max_retries": self.config.max_retries,
            "default_headers": dict(self.config.headers or {}),
            "http_client": _http_client(transport),
        }
        if self.config.base_url:
            return AsyncAzureOpenAI(base_url=self.config.base_url, api_version=version or "preview", **common)
        if version in (None, "preview", "latest", "v1"):
            # The v1 surface Microsoft's Responses guide uses: {endpoint}/openai/v1/responses?api-version=preview
            return AsyncAzureOpenAI(
                base_url=endpoint.rstrip("/") + "/openai/v1/", api_version=version or "preview", **common
            )
        return AsyncAzureOpenAI(azure_endpoint=endpoint, api_version=version, **common)


class AzureOpenAIResponsesProvider(_AzureClientMixin, OpenAIResponsesProvider):
    name = "azure"
    config: AzureOpenAIResponsesConfig

    def _image_deployment(self) -> str | None:
        return self.config.image_deployment or os.environ.get("AZURE_OPENAI_IMAGE_DEPLOYMENT") or None

    def _image_model(self) -> str | None:
        # Azure names deployments freely; the usual practice, and the emulator's, is the model's own name.
        return super()._image_model() or self._image_deployment()

    def check_credentials(self) -> None:
        super().check_credentials()
        if self._image_tool and not self._image_deployment():
            raise ConfigError(
                "Azure needs the name of your gpt-image deployment for the image tool: pass "
                "image_deployment='gpt-image-1' (or set AZURE_OPENAI_IMAGE_DEPLOYMENT)"
            )

    def extra_headers(self) -> dict[str, str]:
        deployment = self._image_deployment()
        return {_DEPLOYMENT_HEADER: deployment} if self._image_tool and deployment else {}


class ChatCompletionsProvider(_OpenAIClientMixin, Provider[OpenAIConfig]):
    """Text answers (image inputs allowed). The image tool needs the Responses API."""

    name = "openai"

    def check_tools(self) -> None:
        for tool in self.tools:
            hint = (
                " ImageGenerationTool requires the Responses API: use OpenAIResponsesConfig instead of OpenAIConfig."
                if isinstance(tool, ImageGenerationTool) else ""
            )
            raise UnsupportedToolError(f"OpenAIConfig (Chat Completions) cannot run {type(tool).__name__}.{hint}")

    async def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        import openai

        messages: list[dict[str, Any]] = list(turn.history or [])
        if turn.instructions and not messages:
            messages.append({"role": "system", "content": turn.instructions})
        messages.append({"role": "user", "content": _chat_content(turn.inputs)})
        client = self.client()
        try:
            if turn.stream:
                parts: list[str] = []
                finish = response_id = model = None
                raw_usage = None
                stream = await client.chat.completions.create(
                    model=self.config.model, messages=messages, stream=True, stream_options={"include_usage": True}
                )
                async for chunk in stream:
                    response_id, model = chunk.id, chunk.model
                    if chunk.usage is not None:  # the last chunk, with no choices
                        raw_usage = chunk.usage.model_dump(exclude_none=True)
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            parts.append(choice.delta.content)
                            yield TextDeltaEvent(choice.delta.content)
                        finish = choice.finish_reason or finish
                body, usage = "".join(parts), openai_usage(raw_usage, model)
            else:
                completion = await client.chat.completions.create(model=self.config.model, messages=messages)
                choice = completion.choices[0]
                body, finish = choice.message.content or "", choice.finish_reason
                response_id, model = completion.id, completion.model
                usage = openai_usage(_dump(completion.usage), model)
        except openai.APIError as exc:
            raise _api_error(exc, self.name, ()) from None
        history = [*messages, {"role": "assistant", "content": body}]
        yield ReplyEvent(Reply(body=body, usage=usage, finish_reason=finish, response_id=response_id,
                               provider=self.name, model=model, history=history))


# --- parsing ----------------------------------------------------------------------------------


class _ResponseParser:
    """Turns Responses output items (whole or streamed) into events, keeping every image made."""

    def __init__(self, provider: str, model: str, image_model: str | None = None, *, mask: str | None = None) -> None:
        self.provider = provider
        self.model = model
        self.image_model = image_model
        self.mask = mask
        self.response_id: str | None = None
        self.files: list[BinaryResult] = []
        self.failures: list[tuple[str | None, str, str | None]] = []  # (code, message, call id)
        self.text: list[str] = []
        self.refusals: list[str] = []
        self._completed: Any = None
        self._seen_items: set[str] = set()
        self._partials: dict[str, int] = {}  # partial images seen per image call

    def begin(self, response: Any) -> None:
        self.response_id = response.id
        self.model = response.model or self.model
        # The answer echoes the image tool with its defaults filled in, the model included (2026 on).
        echoed = next((_get(t, "model") for t in response.tools or () if _get(t, "type") == "image_generation"), None)
        self.image_model = echoed or self.image_model

    # Non-streaming: the whole output at once.
    def parse_output(self, output: Sequence[Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for item in output:
            events.extend(self._item_done(item))
        return events

    def _item_done(self, item: Any) -> list[StreamEvent]:
        # A stream announces items twice (output_item.done, then response.completed): count each once.
        if item.id in self._seen_items:
            return []
        self._seen_items.add(item.id)
        if item.type == "image_generation_call":
            image = self._image(item)
            return [ImageEvent(image)] if image else []
        if item.type == "message":
            for part in item.content or []:
                if part.type == "output_text" and part.text:
                    self.text.append(part.text)
                elif part.type == "refusal":
                    self.refusals.append(part.refusal or "the model refused without a reason")
        return []

    def _image(self, item: Any) -> BinaryResult | None:
        error = getattr(item, "error", None)
        if item.status == "completed" and not item.result and error is None:
            self.failures.append((RESULT_MISSING, "the image call completed but the answer holds no image bytes",
                                  item.id))
            return None
        if item.status == "failed" or not item.result:
            code = _get(error, "code")
            message = _get(error, "message") or f"the image call ended with status {item.status!r} and no image"
            self.failures.append((code, message, item.id))
            return None
        data = answered_bytes(item.result)
        meta = {"provider": self.provider, "model": self.model, "image_model": self.image_model, "call_id": item.id,
                "response_id": self.response_id, "mask": self.mask,
                **{name: getattr(item, name, None) for name in _IMAGE_FIELDS}}
        # Bytes that are not an image are still what was paid for: kept, and named by reply()'s error.
        image = result(data, **meta) if sniff_media_type(data) else kept(data, **meta)
        self.files.append(image)
        return image

    # Streaming: one event at a time.
    def feed(self, event: Any) -> list[StreamEvent]:
        kind = event.type
        if kind in ("response.created", "response.queued", "response.in_progress"):
            self.begin(event.response)
        elif kind == "response.image_generation_call.partial_image":
            data = _decode_image(event.partial_image_b64)
            if data is not None:
                # The SDK builds stream events without validation: an index that is not an int (seen
                # as a string) must not break the consumer. Partial images are numbered by arrival then.
                index = event.partial_image_index
                count = self._partials.get(event.item_id, 0)
                self._partials[event.item_id] = count + 1
                if not isinstance(index, int) or isinstance(index, bool):
                    index = count
                partial = result(data, provider=self.provider, model=self.model, call_id=event.item_id,
                                 partial=True, partial_index=index,
                                 size=getattr(event, "size", None), output_format=getattr(event, "output_format", None))
                return [PartialImageEvent(index, partial)]
        elif kind == "response.output_text.delta":
            return [TextDeltaEvent(event.delta)] if event.delta else []
        elif kind == "response.output_item.done":
            return self._item_done(event.item)
        elif kind in ("response.completed", "response.incomplete"):
            self._completed = event.response
            # Items the stream did not announce individually still count.
            return self.parse_output(event.response.output or [])
        elif kind == "response.failed":
            error = event.response.error
            self.failures.append((_get(error, "code"), _get(error, "message") or "the response failed", None))
            self._completed = event.response
        elif kind == "error":
            self.failures.append((getattr(event, "code", None), getattr(event, "message", "stream error"), None))
        return []

    def final_response(self) -> Any:
        if self._completed is None and not self.failures:
            raise ProviderError(
                "The stream ended before the response was complete", provider=self.provider, files=self.files
            )
        return self._completed

    def reply(self, response: Any, items: list[dict[str, Any]], *, store: bool) -> Reply:
        """The final reply; every outcome other than ``completed`` is an error or says why it stopped."""
        if self.failures:
            raise self._failure_error()
        undecodable = undecodable_error(self.files, provider=self.provider, request_id=self.response_id)
        if undecodable is not None:
            raise undecodable
        kept = {"provider": self.provider, "files": self.files, "request_id": self.response_id}
        if self.refusals:
            raise ContentPolicyError(f"The model refused: {' '.join(self.refusals)}", reason="refusal",
                                     code="refusal", **kept)
        status = getattr(response, "status", None)
        finish, finish_message = status, None
        if status in ("failed", "cancelled"):
            error = getattr(response, "error", None)
            code = _get(error, "code") or status
            message = _get(error, "message") or f"the response ended with status {status!r}"
            raise ProviderError(f"The response {status}: {message}", code=code, **kept)
        if status == "incomplete":
            reason = _get(getattr(response, "incomplete_details", None), "reason") or "unknown"
            if reason == "content_filter":
                raise ContentPolicyError("The response was stopped by the content filter", reason=reason,
                                         code=reason, **kept)
            finish = f"incomplete: {reason}"
            finish_message = (f"The response stopped early ({reason})"
                              + ("." if self.files else " before any image was made."))
        elif status != "completed" and not self.files and not self.text:
            raise ProviderError(f"The response ended with status {status!r} and no output", code=status, **kept)
        body = "".join(self.text)
        usage = self.usage(response)
        history_items = [*items, {"role": "assistant", "content": body}] if body else list(items)
        history = _History(self.response_id if store else None, [] if store else history_items, list(self.files))
        return Reply(body=body, files=list(self.files), usage=usage, finish_reason=finish,
                     finish_message=finish_message, response_id=self.response_id, provider=self.provider,
                     model=self.model, history=history)

    def usage(self, response: Any) -> Usage | None:
        """``usage`` (the chat model) and ``tool_usage.image_gen`` (the image model), as one record."""
        main_raw = _dump(getattr(response, "usage", None))
        tool_raw = _dump(_get(getattr(response, "tool_usage", None), "image_gen"))
        parts = [openai_usage(main_raw, self.model)]
        if tool_raw:
            from .._cost import default_image_model

            parts.append(openai_usage(tool_raw, self.image_model or default_image_model(), image_model=True))
        raw = {"usage": main_raw, "tool_usage": {"image_gen": tool_raw}} if tool_raw else (main_raw or {})
        found = [p for p in parts if p is not None]
        return Usage.combine(found, images=len(self.files), raw=raw) if found else None

    def _failure_error(self) -> ProviderError:
        code, message, call_id = self.failures[0]
        where = f" (image call {call_id})" if call_id else ""
        if code in _POLICY_CODES:
            return ContentPolicyError(f"The safety system blocked the image{where}: {message}", reason=code,
                                      provider=self.provider, code=code, files=self.files)
        return ProviderError(f"Image generation failed{where}: {message}", provider=self.provider, code=code,
                             files=self.files)


def _dump(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj
    return obj.model_dump(exclude_none=True)


def _documented_image_usage(files: Sequence[BinaryResult], tool: ImageGenerationTool | None) -> list[Usage] | None:
    """Per-image usage from OpenAI's documented tokens per size and quality (answers without ``tool_usage``)."""
    from .._cost import PARTIAL_IMAGE_TOKENS, default_image_model, openai_image_tokens

    usages = []
    partial = (tool.partial_images or 0) * PARTIAL_IMAGE_TOKENS if tool else 0
    for image in files:
        meta = image.metadata
        model = meta.get("image_model") or default_image_model()
        rule = openai_image_tokens(model, meta.get("quality") or "", meta.get("size") or "")
        if rule is None:
            return None  # one image that cannot be priced makes the whole reply's cost unknown
        prompt = meta.get("revised_prompt") or ""
        text = max(1, len(prompt) // 4)
        usages.append(Usage(model, text, rule[0] + partial, input_text_tokens=text,
                            output_image_tokens=rule[0] + partial))
    return usages


def answered_bytes(text: Any) -> bytes:
    """The bytes of a base64 image field (either alphabet); text that is not base64 at all is kept as
    its own UTF-8 bytes (what the provider sent, to be named, never dropped)."""
    if not isinstance(text, str):  # the SDK builds stream events unvalidated: any JSON value may be here
        text = str(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            return b64decode_any(text)
        except (binascii.Error, ValueError):
            return text.encode("utf-8", "backslashreplace")


def _decode_image(text: str | None) -> bytes | None:
    """An image's bytes, or None for an empty field or bytes that are not an image (partial images)."""
    if not text:
        return None
    data = answered_bytes(text)
    return data if sniff_media_type(data) else None


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


# --- request helpers --------------------------------------------------------------------------


def _content(inputs: Sequence[Input]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    for item in inputs:
        if isinstance(item, str):
            content.append({"type": "input_text", "text": item})
        elif item.file_id:
            content.append({"type": "input_image", "file_id": item.file_id, "detail": item.detail or "auto"})
        elif item.url:
            content.append({"type": "input_image", "image_url": item.url, "detail": item.detail or "auto"})
        else:
            assert item.data is not None and item.media_type is not None
            content.append({"type": "input_image", "image_url": data_url(item.data, item.media_type),
                            "detail": item.detail or "auto"})
    return content


def _chat_content(inputs: Sequence[Input]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    for item in inputs:
        if isinstance(item, str):
            content.append({"type": "text", "text": item})
        elif item.file_id:
            raise InputError("Chat Completions cannot take ImageInput(file_id=...); use OpenAIResponsesConfig")
        else:
            url = item.url or data_url(item.data or b"", item.media_type or "image/png")
            content.append({"type": "image_url", "image_url": {"url": url, "detail": item.detail or "auto"}})
    return content


def _tool_param(tool: ImageGenerationTool, mask: ImageInput | None) -> dict[str, Any]:
    param: dict[str, Any] = {"type": "image_generation", **tool.params()}
    if mask is not None:
        param["input_image_mask"] = mask_param(mask)
    return param


def mask_param(mask: ImageInput) -> dict[str, str]:
    """The image tool's ``input_image_mask``: a file id, or an image URL (a data URL for bytes)."""
    if mask.file_id:
        return {"file_id": mask.file_id}
    return {"image_url": mask.url or data_url(mask.data or b"", mask.media_type or "")}


def _http_client(transport: Any = None) -> Any:
    from openai import DefaultAsyncHttpxClient

    # The SDK's own defaults (timeouts, connection limits), plus the hook that reports retries; a dry run's
    # recording transport (Provider.describe_request) when given.
    extra = {"transport": transport} if transport is not None else {}
    return DefaultAsyncHttpxClient(event_hooks=http_event_hooks(), **extra)


# --- errors -----------------------------------------------------------------------------------

_HINTS = {
    401: "check the API key",
    403: "the key has no access to this model or resource",
    404: "check the model (or deployment) name and the base URL",
}
# Foundry signs in with Microsoft Entra ID and names agents, not deployments.
_FOUNDRY_HINTS = {
    401: "check the credential: az login, or credential= / api_key= in FoundryAgentConfig",
    403: "the identity needs the Foundry User role on the project",
    404: "check the agent name and version, and the project endpoint",
}


def _api_error(exc: Any, provider: str, files: Sequence[BinaryResult]) -> ProviderError:
    """An SDK error (HTTP status or in-stream error event) as ours, policy blocks as ContentPolicyError."""
    body = exc.body if isinstance(exc.body, dict) else {}
    code = body.get("code") or getattr(exc, "code", None)
    message = body.get("message") or (exc.body if isinstance(exc.body, str) else "") or exc.message
    status = getattr(exc, "status_code", None)
    hint = (_FOUNDRY_HINTS if provider == "foundry" else _HINTS).get(status) or status_hint(status)
    if hint and code not in _POLICY_CODES:
        message = f"{message} ({hint})"
    kwargs = {"provider": provider, "status": status, "code": code, "request_id": getattr(exc, "request_id", None),
              "files": files, **_rate_headers(getattr(exc, "response", None))}
    if code in _POLICY_CODES:
        return ContentPolicyError(message, reason=code, **kwargs)
    return ProviderError(message, **kwargs)


def sdk_error(exc: BaseException, provider: str, files: Sequence[BinaryResult], timeout: float) -> ProviderError:
    """Any failure the ``openai`` SDK raises (status, timeout, connection, stream, transport) as ours."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return _api_error(exc, provider, files)
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(f"No answer within {timeout:g} s; raise timeout= in the config or try again",
                             provider=provider, files=files)
    if isinstance(exc, openai.APIConnectionError):
        message = (transport_failure(exc, provider)
                   or f"Could not reach the API ({exc}); check the endpoint and the network")
        return ProviderError(message, provider=provider, files=files)
    if isinstance(exc, openai.APIError):  # e.g. an error event inside a stream
        return _api_error(exc, provider, files)
    message = transport_failure(exc, provider) or f"The connection dropped mid-answer ({exc}); run it again"
    return ProviderError(message, provider=provider, files=files)


def _rate_headers(response: Any) -> dict[str, float]:
    """``retry_after`` (seconds) and ``rate_limit`` (requests per minute) from a response's headers.

    ``retry-after-ms`` before ``retry-after`` (seconds; an HTTP date is left to the SDK), as the SDK
    reads them; ``x-ratelimit-limit-requests`` per OpenAI's rate-limits guide.
    """
    headers = getattr(response, "headers", None)
    if headers is None:
        return {}
    out: dict[str, float] = {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            out["retry_after"] = float(headers[name]) * scale
            break
        except (KeyError, TypeError, ValueError):
            continue
    stated = rate_headers(headers)
    if stated is not None and stated.limit:
        out["rate_limit"] = stated.limit
    return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    """HTTP transport exceptions the SDK may let through while a stream is being read."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)

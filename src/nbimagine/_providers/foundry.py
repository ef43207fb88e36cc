"""Microsoft Foundry Agent Service: agent versions with the image tool, asked by agent reference.

Management goes through the official ``azure-ai-projects`` SDK (``AIProjectClient.agents``:
``get`` to find the latest version, ``create_version`` with a ``PromptAgentDefinition`` carrying an
``ImageGenTool``); requests go through the project's OpenAI client (``get_openai_client()``, the
``{endpoint}/openai/v1`` route) with the agent reference in the body and the image deployment in the
``x-ms-oai-image-generation-deployment`` header, as Microsoft's image-generation how-to does. Everything
after the request (streaming, partial images, edits, multi-turn, background responses, errors) is the
Responses provider's own, reused from :mod:`.openai`.

Rules of the service encoded here (and in the emulator's Foundry routes):

- the body key is ``agent_reference``; ``agent`` is refused with HTTP 400 "The 'agent' property is
  deprecated. Use 'agent_reference' instead." (azure-sdk-for-js #39083, promptfoo #8959, 2026);
- with an agent reference the request may not carry ``tools``/``tool_choice`` (HTTP 400
  ``invalid_payload`` "Not allowed when agent is specified.", microsoft/agent-framework #6644), nor a
  ``model`` other than the agent's (agent-framework #7283): the agent's definition supplies them;
- ``ImageGenTool`` takes the ``image_generation`` tool's parameters, with quality ``low``, ``medium``,
  ``high`` or ``auto`` only and sizes up to 3840x2160 pixels (its field types and docstring in
  ``azure.ai.projects.models``); other values are refused before any request.

``azure-ai-projects`` and ``azure-identity`` are imported on first use only.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import json
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from ..config import LOOPBACK_HOSTS, FoundryAgentConfig, check_project_endpoint
from ..errors import ConfigError, ProviderError, register_secret
from ..events import StreamEvent
from ..tools import ImageGenerationTool
from ._base import Turn
from .openai import _DEPLOYMENT_HEADER, OpenAIResponsesProvider, _http_client, mask_param

# The Entra ID scope of Foundry projects (AIProjectClient's own default, and get_openai_client's).
SCOPE = "https://ai.azure.com/.default"
# ImageGenerationTool field -> allowed values of azure.ai.projects.models.ImageGenTool (None: any value the
# tool itself accepts). tests/test_foundry.py checks this table against the installed SDK's model.
IMAGE_GEN_TOOL_FIELDS: dict[str, tuple[str, ...] | None] = {
    "model": None,
    "quality": ("low", "medium", "high", "auto"),
    "size": None,
    "output_format": ("png", "webp", "jpeg"),
    "output_compression": None,
    "moderation": ("auto", "low"),
    "background": ("transparent", "opaque", "auto"),
    "input_fidelity": None,
    "input_image_mask": None,
    "partial_images": None,
    "action": None,
}
# "the maximum supported resolution is 3840x2160" (ImageGenTool.size docstring).
MAX_PIXELS = 3840 * 2160
# Marks the agent versions nbimagine made, so that an unchanged definition is recognised exactly.
DEFINITION_KEY = "nbimagine_definition"
_ENV_ENDPOINT = "AZURE_AI_PROJECT_ENDPOINT"
_ENV_MODEL = "AZURE_AI_MODEL_DEPLOYMENT_NAME"
_ENV_IMAGE_DEPLOYMENT = "IMAGE_GENERATION_MODEL_DEPLOYMENT_NAME"
_TOKEN_MARGIN = 300.0  # seconds before expiry when a cached token is renewed


class FoundryAgentProvider(OpenAIResponsesProvider):
    name = "foundry"
    config: FoundryAgentConfig
    states_rate_limit = False  # an Azure service: the remaining count at most, not the limit

    def __init__(self, config: FoundryAgentConfig, tools: Any) -> None:
        super().__init__(config, tools)
        self._versions: dict[str, str] = {}  # definition fingerprint -> agent version made or found
        self._reference: dict[str, str] | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._describing = False  # a dry run: no agent version is looked up or made

    # --- checks (no network) -------------------------------------------------------------------

    def check_tools(self) -> None:
        super().check_tools()
        for tool in self.tools:
            foundry_tool_params(tool)
        if self.tools and self.config.agent_version:
            raise ConfigError(
                "agent_version pins an existing version, while tools= makes nbimagine create (or reuse) the version "
                "that carries these tools: drop agent_version, or drop tools to use that version as it is"
            )
        if not self.tools and self.config.tool_choice:
            raise ConfigError(
                "tool_choice is part of an agent's definition and cannot be sent with an agent reference: set it "
                "on the agent in Foundry, or give tools= so that nbimagine creates a version with it"
            )

    def _endpoint(self) -> str | None:
        return self.config.project_endpoint or os.environ.get(_ENV_ENDPOINT) or None

    def _model(self) -> str | None:
        return self.config.model or os.environ.get(_ENV_MODEL) or None

    def endpoint(self) -> str:
        return self._endpoint() or self.config.base_url or ""

    def _image_model(self) -> str | None:
        # Deployments are usually named after their model (the emulator's are).
        return super()._image_model() or self._image_deployment()

    def describe_request(self, turn: Turn) -> dict[str, Any]:
        self._describing = True
        try:
            return super().describe_request(turn)
        finally:
            self._describing = False

    def _image_deployment(self) -> str | None:
        tool = self._image_tool
        return (self.config.image_deployment or (tool.model if tool else None)
                or os.environ.get(_ENV_IMAGE_DEPLOYMENT) or None)

    def check_credentials(self) -> None:
        register_secret(self.config.api_key)
        if not (self._endpoint() or self.config.base_url):
            raise ConfigError(
                f"No Foundry project endpoint: set {_ENV_ENDPOINT} or pass project_endpoint="
                "'https://<resource>.services.ai.azure.com/api/projects/<project>'"
            )
        if not self.config.project_endpoint and not self.config.base_url:
            try:
                check_project_endpoint(self._endpoint() or "")
            except ConfigError as exc:
                raise ConfigError(f"{_ENV_ENDPOINT}: {exc}") from None
        if self.tools and not self._model():
            raise ConfigError(
                "Creating an agent version needs the orchestrator deployment: pass model='gpt-4.1' (a chat model "
                f"deployed in the project) or set {_ENV_MODEL}"
            )
        if self._image_tool and not self._image_deployment():
            raise ConfigError(
                "Foundry needs the name of your gpt-image deployment for the image tool: pass "
                f"image_deployment='gpt-image-1' (or set {_ENV_IMAGE_DEPLOYMENT})"
            )

    # --- clients -------------------------------------------------------------------------------

    def new_client(self, transport: Any = None) -> _FoundryClients:
        from azure.ai.projects.aio import AIProjectClient

        credential = _AsyncCredential(self.config.credential)
        options: dict[str, Any] = {"retry_total": self.config.max_retries, "connection_timeout": self.config.timeout,
                                   "read_timeout": self.config.timeout}
        project_transport = _transport()
        if project_transport is not None:
            options["transport"] = project_transport
        endpoint = self._endpoint() or (self.config.base_url or "").rstrip("/").removesuffix("/openai/v1")
        project = AIProjectClient(endpoint=endpoint, credential=credential, **options)
        # A key travels as the bearer token, as on Azure OpenAI's v1 route (OpenAI(base_url=.../openai/v1/,
        # api_key=<key>)); otherwise the credential's Entra ID token does.
        openai_client = project.get_openai_client(
            api_key=self.config.api_key or credential.bearer, timeout=self.config.timeout,
            max_retries=self.config.max_retries, default_headers=dict(self.config.headers or {}),
            **({"base_url": self.config.base_url} if self.config.base_url else {}),
            # The hook that shows retries in the progress line, as on OpenAI and Azure (and a dry run's transport).
            http_client=_http_client(transport),
        )
        return _FoundryClients(openai_client, project, credential)

    # --- the agent -----------------------------------------------------------------------------

    async def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        if turn.mask is not None:
            # A request with an agent reference carries no tools, so no per-request mask either.
            raise ConfigError("Foundry takes the mask in the agent's definition: give the agent "
                              "tools=[ImageGenerationTool(input_image_mask=...)] instead of ask(mask=...)")
        self._reference = await self._agent_reference(turn)
        answered = False
        try:
            async for event in super().run(turn):
                answered = True
                yield event
            return
        except ProviderError as exc:
            version = self._reference.get("version")
            made = [key for key, value in self._versions.items() if value == version]
            if answered or exc.status != 404 or not made:
                raise
        # The version nbimagine made or found for these tools is gone (deleted in the portal or by a script
        # since): nothing was generated, so look it up or make it again, once.
        for key in made:
            self._versions.pop(key, None)
        self._reference = await self._agent_reference(turn)
        async for event in super().run(turn):
            yield event

    async def _agent_reference(self, turn: Turn) -> dict[str, str]:
        reference = {"type": "agent_reference", "name": str(self.config.agent_name)}
        if not self.tools:
            if self.config.agent_version:
                reference["version"] = self.config.agent_version
            return reference
        definition = self._definition(turn)
        fingerprint = _fingerprint(definition)
        if self._describing and fingerprint not in self._versions:
            reference["version"] = "(the version with these tools, made or reused when sent)"
            return reference
        if fingerprint not in self._versions:
            loop = asyncio.get_running_loop()
            lock = self._locks.setdefault(loop, asyncio.Lock())
            async with lock:  # n concurrent variants make one version, not n
                if fingerprint not in self._versions:
                    self._versions[fingerprint] = await self._find_or_create(definition, fingerprint)
        reference["version"] = self._versions[fingerprint]
        return reference

    def _definition(self, turn: Turn) -> dict[str, Any]:
        """The agent definition for these tools, as the service's JSON (``PromptAgentDefinition``)."""
        from azure.ai.projects.models import ImageGenTool, ImageGenToolInputImageMask, PromptAgentDefinition

        tools = []
        for tool in self.tools:
            params = foundry_tool_params(tool)
            params.setdefault("model", self._image_deployment())
            mask = params.pop("input_image_mask", None)
            if mask is not None:
                params["input_image_mask"] = ImageGenToolInputImageMask(**mask)
            tools.append(ImageGenTool(**params))
        fields: dict[str, Any] = {"model": self._model(), "tools": tools}
        instructions = self.config.instructions or turn.instructions
        if instructions:
            fields["instructions"] = instructions
        if self.config.tool_choice == "image_generation":
            fields["tool_choice"] = {"type": "image_generation"}
        elif self.config.tool_choice:
            fields["tool_choice"] = self.config.tool_choice
        return PromptAgentDefinition(**fields).as_dict()

    async def _find_or_create(self, definition: dict[str, Any], fingerprint: str) -> str:
        from azure.ai.projects.models import PromptAgentDefinition
        from azure.core.exceptions import ResourceNotFoundError

        agents = self.client().project.agents
        name = str(self.config.agent_name)
        options = _loopback_options(self._endpoint() or self.config.base_url or "")
        error = None
        try:
            try:
                latest = (await agents.get(name, **options)).versions.latest
            except ResourceNotFoundError:
                latest = None
            if latest is not None and _unchanged(latest, definition, fingerprint):
                return str(latest.version)
            created = await agents.create_version(
                name, definition=PromptAgentDefinition(definition), metadata={DEFINITION_KEY: fingerprint},
                description="Image generation agent made by nbimagine", **options,
            )
            return str(created.version)
        except Exception as exc:  # mapped outside this block: no SDK error (request headers!) in the chain
            error = _management_error(exc, name)
            if error is None:
                raise
        raise error

    # --- the request ---------------------------------------------------------------------------

    def build_request(self, turn: Turn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        request, items = super().build_request(turn)
        # The agent's definition supplies the model, tools and tool choice; the service refuses them here.
        for key in ("model", "tools", "tool_choice"):
            request.pop(key, None)
        if self.tools:
            request.pop("instructions", None)  # part of the version nbimagine made
        elif self.config.instructions:
            request["instructions"] = self.config.instructions  # added to the existing agent's own
        assert self._reference is not None, "run() resolves the agent first"
        request["extra_body"] = {**request.get("extra_body", {}), "agent_reference": dict(self._reference)}
        deployment = self._image_deployment()
        if deployment:
            request["extra_headers"] = {**request.get("extra_headers", {}), _DEPLOYMENT_HEADER: deployment}
        return request, items

    def extra_headers(self) -> dict[str, str]:
        return {}


def foundry_tool_params(tool: Any) -> dict[str, Any]:
    """``ImageGenerationTool`` parameters as ``ImageGenTool`` takes them; ``ConfigError`` for what it lacks."""
    if not isinstance(tool, ImageGenerationTool):
        return {}
    params = tool.params()
    for name, value in params.items():
        if name not in IMAGE_GEN_TOOL_FIELDS:
            raise ConfigError(f"Foundry's image tool (ImageGenTool) has no {name!r} parameter; drop it")
        allowed = IMAGE_GEN_TOOL_FIELDS[name]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"Foundry's image tool takes {name} {', '.join(map(repr, allowed))}, not {value!r}")
    size = params.get("size")
    if size and size != "auto":
        width, height = map(int, size.split("x"))
        if width * height > MAX_PIXELS:
            raise ConfigError(f"Foundry's image tool makes at most 3840x2160 pixels; size {size!r} is larger")
    if tool.input_image_mask is not None:
        params["input_image_mask"] = mask_param(tool.input_image_mask)
    return params


def _loopback_options(endpoint: str) -> dict[str, Any]:
    """azure-core sends bearer tokens over https only; plain http is allowed to this machine (the emulator)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return {"enforce_https": False}
    return {}


def _fingerprint(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _unchanged(latest: Any, definition: dict[str, Any], fingerprint: str) -> bool:
    """Whether the latest version already has this definition: nbimagine's mark, or the same JSON."""
    if (latest.metadata or {}).get(DEFINITION_KEY) == fingerprint:
        return True
    current = latest.definition.as_dict() if hasattr(latest.definition, "as_dict") else dict(latest.definition)
    return _without_nulls(current) == _without_nulls(definition)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _management_error(exc: Exception, name: str) -> Exception | None:
    """An ``azure-core``/``azure-identity`` error as ours (``None``: not one of theirs)."""
    from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError, ServiceRequestError

    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "response", None) is None:
        from ._base import SIGN_IN_ADVICE

        return ConfigError(f"No usable Azure credential for the Foundry project ({_first_line(exc)}). Sign in with "
                           "`az login`, set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET, or "
                           f"{SIGN_IN_ADVICE.get()}")
    if isinstance(exc, HttpResponseError):
        error = getattr(getattr(exc, "model", None), "error", None)
        message = getattr(error, "message", None) or _first_line(exc)
        status = exc.status_code
        hint = {401: "check the credential", 403: "the identity needs the Foundry User role on the project",
                404: "check the project endpoint"}.get(status or 0)
        return ProviderError(f"Managing agent {name!r} failed: {message}" + (f" ({hint})" if hint else ""),
                             provider="foundry", status=status, code=getattr(error, "code", None))
    if isinstance(exc, (ServiceRequestError, AzureError)):
        return ProviderError(f"Could not reach the Foundry project ({_first_line(exc)}); check project_endpoint "
                             "and the network", provider="foundry")
    if isinstance(exc, ConfigError):
        return exc
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _transport() -> Any:
    """``azure-core``'s asyncio transport over ``requests`` unless ``aiohttp`` (its default) is installed."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        from azure.core.pipeline.transport import AsyncioRequestsTransport

        return AsyncioRequestsTransport()
    return None


# True while nbimagine's own DefaultAzureCredential asks for a token: its "failed to retrieve a token" warning
# (a dozen lines, on stderr in a notebook without logging set up) is then dropped, since the ConfigError that
# follows says the same in one line with what to do. A credential the user passes logs as they configured.
_OWN_DEFAULT: contextvars.ContextVar[bool] = contextvars.ContextVar("nbimagine_own_default_credential",
                                                                    default=False)


class _OnlyTheirs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _OWN_DEFAULT.get()


def _quiet_default_credential() -> None:
    chained = logging.getLogger("azure.identity._credentials.chained")
    if not any(isinstance(f, _OnlyTheirs) for f in chained.filters):
        chained.addFilter(_OnlyTheirs())


class _AsyncCredential:
    """Any ``TokenCredential`` / ``AsyncTokenCredential`` as an ``AsyncTokenCredential``.

    Tokens are cached until five minutes before they expire, and every token is registered as a secret,
    so that it is masked wherever it could be echoed. The default ``DefaultAzureCredential`` is the
    synchronous one (it needs no ``aiohttp``); its blocking calls run in a worker thread.
    """

    def __init__(self, credential: Any) -> None:
        self._owned = credential is None
        self.inner = credential
        self._tokens: dict[tuple[str, ...], Any] = {}

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        key = tuple(scopes)
        cached = self._tokens.get(key)
        if cached is not None and not kwargs and cached.expires_on - _TOKEN_MARGIN > time.time():
            return cached
        if self.inner is None:  # made on first use: an api_key-only setup never needs it
            from azure.identity import DefaultAzureCredential

            self.inner = DefaultAzureCredential()
            _quiet_default_credential()
        quiet = _OWN_DEFAULT.set(self._owned)  # copied into the worker thread by to_thread
        try:
            if inspect.iscoroutinefunction(self.inner.get_token):
                token = await self.inner.get_token(*scopes, **kwargs)
            else:
                token = await asyncio.to_thread(self.inner.get_token, *scopes, **kwargs)
        except Exception as exc:
            error = _management_error(exc, "")
            if error is None or not isinstance(error, ConfigError):
                raise
            failure = error
        else:
            register_secret(token.token)
            self._tokens[key] = token
            return token
        finally:
            _OWN_DEFAULT.reset(quiet)
        raise failure

    async def bearer(self) -> str:
        """The OpenAI client's ``api_key`` provider: a fresh-enough token for the project's scope."""
        return (await self.get_token(SCOPE)).token

    async def close(self) -> None:
        if self._owned and self.inner is not None:
            close = getattr(self.inner, "close", None)
            if close is not None:
                outcome = close()
                if inspect.isawaitable(outcome):
                    await outcome

    async def __aenter__(self) -> _AsyncCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _FoundryClients:
    """The project client and its OpenAI client, closed together (``Provider.client()`` keeps one per loop)."""

    def __init__(self, openai_client: Any, project: Any, credential: _AsyncCredential) -> None:
        self.openai = openai_client
        self.project = project
        self.credential = credential

    @property
    def responses(self) -> Any:
        return self.openai.responses

    async def close(self) -> None:
        await self.openai.close()
        await self.project.close()
        await self.credential.close()

"""Provider configurations. Plain data: no SDK is imported until a request is made.

Every config takes ``model``, ``api_key=None`` (then the SDK's usual environment variables apply),
``base_url=None``, ``timeout`` (seconds) and ``max_retries``. Keys never appear in reprs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .errors import ConfigError

__all__ = [
    "AzureOpenAIImagesConfig",
    "AzureOpenAIResponsesConfig",
    "FoundryAgentConfig",
    "GeminiConfig",
    "OpenAIConfig",
    "OpenAIImagesConfig",
    "OpenAIResponsesConfig",
    "ProviderConfig",
    "VertexAIConfig",
]

_SECRET_FIELDS = frozenset({"api_key", "azure_ad_token", "credentials", "credential"})
# Header names whose values are credentials (Authorization, api-key, x-goog-api-key, X-Auth-Token...).
_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie", re.IGNORECASE)
# URL query parameters that carry credentials (signed URLs: X-Amz-Signature, sig, X-Goog-Credential...).
_SECRET_PARAM = re.compile(r"signature|^sig$|credential|password|^code$", re.IGNORECASE)
_TOOL_CHOICES = ("auto", "none", "required", "image_generation")


@dataclass(frozen=True, repr=False)
class ProviderConfig:
    """Fields every provider shares."""

    model: str
    _: KW_ONLY
    api_key: str | None = None
    base_url: str | None = None
    timeout: float = 600.0
    max_retries: int = 2

    # "module:Class" of the provider implementation, imported on first use.
    _implementation: ClassVar[str] = ""
    # The short name used in metadata, history and the notebook ("openai", "azure", "gemini", "vertex").
    provider: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_model()
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, not {self.max_retries!r}")

    def _check_model(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"{type(self).__name__} needs a model name, e.g. model='gpt-4.1'")

    def replace(self, **changes: Any) -> ProviderConfig:
        """A copy with some fields changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS:
                if value is not None:
                    # A credential object's type is no secret and says which one is in use.
                    kind = type(value).__name__ if f.name == "credential" else "set"
                    shown.append(f"{f.name}=<{kind}>")
            elif value != f.default:
                shown.append(f"{f.name}={_masked(value)!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def secrets(self) -> list[str]:
        """Every credential this config holds, wherever it sits (keys and tokens, credential headers,
        ``user:password@`` and ``?api_key=`` in URLs, credential entries of ``extra_body``...)."""
        found: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS:
                if isinstance(value, str):
                    found.append(value)
                token = getattr(value, "token", None)  # google.oauth2 Credentials carry a bearer token
                if isinstance(token, str):
                    found.append(token)
            else:
                _masked(value, found)
        return [s for s in found if s]


def _masked(value: Any, found: list[str] | None = None) -> Any:
    """``value`` with credentials replaced by ``***`` (collected into ``found``): recursively through
    mappings (by key name) and sequences, and inside URLs (user info, credential query parameters)."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and _SECRET_HEADER.search(key) and isinstance(item, (str, bytes)):
                if found is not None:
                    found.append(item if isinstance(item, str) else item.decode("latin-1"))
                out[key] = "***"
            else:
                out[key] = _masked(item, found)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(item, found) for item in value)
    if isinstance(value, str) and "://" in value:
        return _masked_url(value, found)
    return value


def _masked_url(url: str, found: list[str] | None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        if found is not None:
            found.extend(x for x in (unquote(password), password) if x)
        netloc = f"{user}:***@{host}" if password else f"***@{host}"
        if not password and found is not None:
            found.append(unquote(user))
    query = []
    for key, item in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_HEADER.search(key) or _SECRET_PARAM.search(key):
            if found is not None and item:
                found.append(item)
            item = "***"
        query.append((key, item))
    masked = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*") if query else parts.query,
                         parts.fragment))
    return masked


@dataclass(frozen=True, repr=False)
class _OpenAIBase(ProviderConfig):
    _: KW_ONLY
    headers: Mapping[str, str] | None = None
    organization: str | None = None
    project: str | None = None


@dataclass(frozen=True, repr=False)
class OpenAIResponsesConfig(_OpenAIBase):
    """OpenAI Responses API; runs :class:`~nbimagine.tools.ImageGenerationTool` server-side.

    ``store=True`` keeps conversations on OpenAI's side (``previous_response_id``); with
    ``store=False`` nbimagine sends earlier images back itself. ``tool_choice="image_generation"``
    forces the image tool instead of letting the model decide.

    ``background=True`` runs each request as a background response (OpenAI's background mode, also
    on Azure and Foundry): the request returns at once, nbimagine checks the status (first after
    ``poll_interval / 4`` seconds, doubling up to ``poll_interval``) until it ends, and reports it as
    :class:`~nbimagine.events.StatusEvent` s. A streamed background response that drops is resumed
    after the last event received, so a job outlives client timeouts and broken connections.
    Cancelling the ask (Ctrl-C, task cancellation, leaving a stream early) cancels the response on
    the server.
    """

    _: KW_ONLY
    store: bool = True
    tool_choice: str | None = None
    extra_body: Mapping[str, Any] | None = None
    background: bool = False
    poll_interval: float = 1.0

    _implementation: ClassVar[str] = "nbimagine._providers.openai:OpenAIResponsesProvider"
    provider: ClassVar[str] = "openai"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tool_choice is not None and self.tool_choice not in _TOOL_CHOICES:
            raise ConfigError(f"tool_choice must be one of {', '.join(_TOOL_CHOICES)}, not {self.tool_choice!r}")
        if not isinstance(self.background, bool):
            raise ConfigError(f"background must be True or False, not {self.background!r}")
        if (not isinstance(self.poll_interval, (int, float)) or isinstance(self.poll_interval, bool)
                or not 0 < self.poll_interval <= 60):
            raise ConfigError(f"poll_interval must be a number of seconds above 0 and at most 60, "
                              f"not {self.poll_interval!r}")


@dataclass(frozen=True, repr=False)
class AzureOpenAIResponsesConfig(OpenAIResponsesConfig):
    """Azure OpenAI / Microsoft Foundry, Responses API.

    ``model`` is the chat deployment; ``image_deployment`` the gpt-image deployment, sent in the
    ``x-ms-oai-image-generation-deployment`` header that Azure requires for the image tool.
    Environment: ``AZURE_OPENAI_API_KEY`` (or ``AZURE_OPENAI_AD_TOKEN``), ``AZURE_OPENAI_ENDPOINT``,
    ``AZURE_OPENAI_IMAGE_DEPLOYMENT``, ``OPENAI_API_VERSION``.
    """

    _: KW_ONLY
    azure_endpoint: str | None = None
    api_version: str | None = None
    image_deployment: str | None = None
    azure_ad_token: str | None = None

    _implementation: ClassVar[str] = "nbimagine._providers.openai:AzureOpenAIResponsesProvider"
    provider: ClassVar[str] = "azure"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_url and self.azure_endpoint:
            raise ConfigError("Pass either base_url= or azure_endpoint=, not both")


# Foundry agent names: "Must start and end with alphanumeric characters, can contain hyphens in the
# middle, must not exceed 63 characters" (azure-ai-projects, AgentsOperations.create_version).
_FOUNDRY_AGENT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_agent_name(name: Any) -> str:
    """``name`` if Foundry takes it as an agent name, else ``ConfigError`` with the rule."""
    if not isinstance(name, str) or not _FOUNDRY_AGENT_NAME.match(name):
        raise ConfigError("an agent's name is 1 to 63 letters, digits and hyphens, starting and ending with a "
                          f"letter or digit, not {name!r}")
    return name


def check_project_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is a Foundry project endpoint, else ``ConfigError`` saying what one looks like.

    A project endpoint is ``https://<resource>.services.ai.azure.com/api/projects/<project>`` (the
    project's Overview page in the Foundry portal; ``AIProjectClient(endpoint=...)``). The resource's
    own endpoint (without ``/api/projects/<project>``) reaches no project route, and azure-core refuses
    to send a bearer token over plain http (``enforce_https``) except to this machine (the emulator).
    """
    from urllib.parse import urlsplit

    example = "https://<resource>.services.ai.azure.com/api/projects/<project>"
    text = endpoint.strip() if isinstance(endpoint, str) else ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"The Foundry project endpoint is a URL such as {example}, not {endpoint!r}")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ConfigError(f"The Foundry project endpoint must use https (tokens are never sent over http): {example}")
    if not re.fullmatch(r"/api/projects/[^/]+/?", parts.path):
        raise ConfigError(f"{endpoint!r} is not a Foundry project endpoint: it ends with /api/projects/<project> "
                          f"({example}; the project's Overview page shows it)")
    return text


@dataclass(frozen=True, repr=False)
class FoundryAgentConfig(OpenAIResponsesConfig):
    """Microsoft Foundry Agent Service: a project's agent, asked through the project's OpenAI client.

    ``project_endpoint`` is ``https://<resource>.services.ai.azure.com/api/projects/<project>``;
    ``agent_name`` the agent (1-63 letters, digits and inner hyphens). With
    ``Agent(..., tools=[ImageGenerationTool(...)])`` nbimagine creates a version of that agent whose
    definition carries the image tool (``PromptAgentDefinition(model, instructions, tools=[ImageGenTool])``
    through ``azure-ai-projects``), or reuses the latest version when its definition is the same; then
    ``model`` (the orchestrator deployment, e.g. ``gpt-4.1``) is required. Without tools it asks the
    existing agent ``agent_name`` as it is, at ``agent_version`` (default: the latest).

    ``image_deployment`` (the gpt-image deployment) is sent in the ``x-ms-oai-image-generation-deployment``
    header and becomes the image tool's ``model``. ``credential`` is any ``azure.core`` ``TokenCredential``
    or ``AsyncTokenCredential`` (default: ``azure.identity.DefaultAzureCredential``); ``api_key``, when set,
    authenticates the Responses requests instead (agent versions are always managed with the credential).
    ``instructions`` become the created version's instructions (else the ``Agent``'s); for an existing
    agent they are sent with each request. ``store``, ``background``, ``poll_interval`` and streaming
    behave as for :class:`OpenAIResponsesConfig`; ``tool_choice`` is part of a created version's
    definition. Environment: ``AZURE_AI_PROJECT_ENDPOINT``, ``AZURE_AI_MODEL_DEPLOYMENT_NAME``,
    ``IMAGE_GENERATION_MODEL_DEPLOYMENT_NAME`` (the names Microsoft's samples use).
    """

    model: str | None = None  # type: ignore[assignment]
    _: KW_ONLY
    project_endpoint: str | None = None
    agent_name: str | None = None
    agent_version: str | None = None
    instructions: str | None = None
    image_deployment: str | None = None
    credential: Any = None

    _implementation: ClassVar[str] = "nbimagine._providers.foundry:FoundryAgentProvider"
    provider: ClassVar[str] = "foundry"

    def _check_model(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ConfigError("FoundryAgentConfig model is the orchestrator deployment, e.g. model='gpt-4.1'")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_agent_name(self.agent_name)
        except ConfigError as exc:
            raise ConfigError(f"FoundryAgentConfig needs agent_name=, the agent's name in the project: {exc}") from None
        if self.agent_version is not None and (not isinstance(self.agent_version, str) or not self.agent_version):
            raise ConfigError(f"agent_version must be a version string such as '3', not {self.agent_version!r}")
        if self.base_url and self.project_endpoint:
            raise ConfigError("Pass either project_endpoint= or base_url= (the project's OpenAI route), not both")
        if self.project_endpoint is not None:
            check_project_endpoint(self.project_endpoint)
        for name in ("organization", "project"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}= is an OpenAI account setting; Foundry takes project_endpoint= instead")
        credential = self.credential
        if credential is not None and not callable(getattr(credential, "get_token", None)):
            raise ConfigError("credential must be an azure TokenCredential or AsyncTokenCredential (an object with "
                              f"get_token), such as azure.identity.DefaultAzureCredential(), not {type(credential)}")


@dataclass(frozen=True, repr=False)
class OpenAIConfig(_OpenAIBase):
    """OpenAI Chat Completions: text answers (image inputs allowed). It cannot run the image tool."""

    _implementation: ClassVar[str] = "nbimagine._providers.openai:ChatCompletionsProvider"
    provider: ClassVar[str] = "openai"


@dataclass(frozen=True, repr=False)
class OpenAIImagesConfig(_OpenAIBase):
    """OpenAI Images API: ``images.generate``, and ``images.edit`` when the request holds images.

    One call makes ``n`` images (1-10). An edit takes up to 16 input images (the first is the one
    edited; the others are references) and an optional ``mask``. Only the parameters you set are
    sent. Every value is checked against the model's rules before any request
    (``nbimagine._image_models``: sizes, ``n``, qualities and formats differ between gpt-image-2,
    gpt-image-1 and the retired DALL-E models); a value the API would refuse is a ``ConfigError``,
    a value it accepts but ignores is a warning.

    ``partial_images`` (0-3) streams interim renderings (``stream()``; ``ask()`` streams too).
    ``style`` is DALL-E 3 only. ``extra_body`` is sent as is.
    """

    model: str = "gpt-image-2"
    _: KW_ONLY
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    input_fidelity: str | None = None
    partial_images: int | None = None
    style: str | None = None
    extra_body: Mapping[str, Any] | None = None

    _implementation: ClassVar[str] = "nbimagine._providers.openai_images:OpenAIImagesProvider"
    provider: ClassVar[str] = "openai"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_format == "jpg":
            object.__setattr__(self, "output_format", "jpeg")
        for name, value in self.params().items():
            problem = images_param_problem(self.model, name, value, self.params())
            if problem:
                raise ConfigError(problem)
        if self.extra_body is not None and not isinstance(self.extra_body, Mapping):
            raise ConfigError("extra_body must be a dict of extra request fields")

    def params(self) -> dict[str, Any]:
        """The Images API parameters that were set, by their API names (``n``, ``size``, ...)."""
        return {name: getattr(self, name) for name in IMAGES_PARAMS if getattr(self, name) is not None}

    def ignored_params(self) -> dict[str, str]:
        """Parameters this model accepts but ignores, each with the reason (warned, not sent)."""
        from ._image_models import rules_for

        rules = rules_for(self.model)
        out = {}
        if self.input_fidelity is not None and not rules.input_fidelities:
            out["input_fidelity"] = (f"{rules.family} has no input_fidelity (OpenAI: 'For gpt-image-2, omit this "
                                     "parameter')")
        from .tools import COMPRESSIBLE_FORMATS

        if self.output_compression is not None and self.output_format not in COMPRESSIBLE_FORMATS:
            out["output_compression"] = "output_compression only changes jpeg and webp output"
        return out


@dataclass(frozen=True, repr=False)
class AzureOpenAIImagesConfig(OpenAIImagesConfig):
    """Azure OpenAI / Microsoft Foundry Images API. ``model`` is your image deployment's name.

    Environment: ``AZURE_OPENAI_API_KEY`` (or ``AZURE_OPENAI_AD_TOKEN``), ``AZURE_OPENAI_ENDPOINT``,
    ``OPENAI_API_VERSION``. With a dated ``api_version`` the SDK calls
    ``/openai/deployments/{model}/images/...``; without one, the v1 surface ``/openai/v1/images/...``.
    """

    _: KW_ONLY
    azure_endpoint: str | None = None
    api_version: str | None = None
    azure_ad_token: str | None = None

    _implementation: ClassVar[str] = "nbimagine._providers.openai_images:AzureOpenAIImagesProvider"
    provider: ClassVar[str] = "azure"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_url and self.azure_endpoint:
            raise ConfigError("Pass either base_url= or azure_endpoint=, not both")


# What one batch may hold, read by submit_batch before anything is uploaded and by the emulator. OpenAI: "The
# file can contain up to 50,000 requests, and can be up to 200 MB in size" (Batch API reference, batches.create
# input_file_id; MB taken as 10**6 bytes, the stricter reading). Gemini: no request count is documented; a
# batch's JSONL input file is a Files API file, "up to 2 GB" each (Files API guide).
OPENAI_BATCH_MAX_REQUESTS = 50_000
OPENAI_BATCH_MAX_BYTES = 200_000_000
GEMINI_BATCH_MAX_BYTES = 2 * 1024**3

# The Images API parameters a config can set, in the order they are checked.
IMAGES_PARAMS = ("n", "size", "quality", "background", "output_format", "output_compression", "moderation",
                 "input_fidelity", "partial_images", "style")


def images_param_problem(model: str, name: str, value: Any, params: Mapping[str, Any]) -> str | None:
    """Why the Images API refuses ``name=value`` for ``model`` (given the other ``params``), or ``None``."""
    from ._image_models import rules_for

    rules = rules_for(model)
    family = rules.family

    def one_of(allowed: tuple[str, ...]) -> str | None:
        if not allowed:
            return f"{family} does not take {name}; drop it"
        if value not in allowed:
            return f"{name} must be one of {', '.join(map(repr, allowed))} for {family}, not {value!r}"
        return None

    if name in ("n", "output_compression", "partial_images"):
        low, high = {"n": (1, rules.max_n), "output_compression": (0, 100), "partial_images": (0, 3)}[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            hint = " (several images in one call: use a GPT image model)" if name == "n" and high == 1 else ""
            return f"{name} must be an integer from {low} to {high} for {family}, not {value!r}{hint}"
        if name == "partial_images" and not rules.streaming:
            return f"{family} cannot stream partial images; drop partial_images"
        if name == "output_compression" and not rules.output_formats:
            return f"{family} does not take output_compression; drop it"
        return None
    if name == "size":
        return rules.size_problem(value) if isinstance(value, str) else f"size must be a string, not {value!r}"
    if name == "quality":
        return one_of(rules.qualities)
    if name == "background":
        problem = one_of(rules.backgrounds)
        if problem is None and value == "transparent" and params.get("output_format") == "jpeg":
            # SDK background: "When using transparent, set the output format to png or webp."
            return "JPEG has no transparency: use output_format='png' or 'webp' with a transparent background"
        return problem
    if name == "output_format":
        return one_of(rules.output_formats)
    if name == "moderation":
        return one_of(rules.moderations)
    if name == "input_fidelity":
        if rules.input_fidelities:
            return one_of(rules.input_fidelities)
        from .tools import INPUT_FIDELITIES

        return None if value in INPUT_FIDELITIES else (f"input_fidelity must be one of "
                                                       f"{', '.join(map(repr, INPUT_FIDELITIES))}, not {value!r}")
    if name == "style":
        return one_of(rules.styles)
    return None


@dataclass(frozen=True, repr=False)
class GeminiConfig(ProviderConfig):
    """Gemini Developer API. Images come from the IMAGE response modality, not from a tool.

    ``image_config`` is a ``google.genai.types.ImageConfig`` or a plain dict, passed through whole.
    ``include_thoughts=True`` asks for the model's interim drafts, streamed as partial images.
    Environment: ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``.
    """

    _: KW_ONLY
    api_version: str | None = None
    response_modalities: Sequence[str] | None = None
    image_config: Any = None
    include_thoughts: bool | None = None
    headers: Mapping[str, str] | None = None
    extra_config: Mapping[str, Any] | None = None

    _implementation: ClassVar[str] = "nbimagine._providers.google:GeminiProvider"
    provider: ClassVar[str] = "gemini"
    _vertex: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.response_modalities is not None:
            given = self.response_modalities
            if isinstance(given, str) or not isinstance(given, Sequence):
                raise ConfigError(f"response_modalities must be a list such as ['TEXT', 'IMAGE'], not {given!r}")
            if not given:
                raise ConfigError("response_modalities cannot be empty: use ['TEXT', 'IMAGE'], or ['IMAGE'] alone")
            modalities = []
            for item in self.response_modalities:
                name = item.upper() if isinstance(item, str) else item
                if name not in GEMINI_MODALITIES:
                    allowed = ", ".join(map(repr, GEMINI_MODALITIES))
                    raise ConfigError(f"response_modalities entries must be {allowed}, not {item!r}")
                modalities.append(name)
            object.__setattr__(self, "response_modalities", tuple(modalities))
        if self.include_thoughts is not None and not isinstance(self.include_thoughts, bool):
            raise ConfigError(f"include_thoughts must be True, False or None, not {self.include_thoughts!r}")
        if self.extra_config is not None and not isinstance(self.extra_config, Mapping):
            raise ConfigError("extra_config must be a dict of google.genai GenerateContentConfig fields")
        fields = image_config_fields(self.image_config)
        ratio, size = fields.get("aspect_ratio"), fields.get("image_size")
        if ratio is not None and ratio not in GEMINI_ASPECT_RATIOS:
            raise ConfigError(
                f"image_config aspect_ratio must be one of {', '.join(GEMINI_ASPECT_RATIOS)}, not {ratio!r}"
            )
        if size is not None and size not in GEMINI_IMAGE_SIZES:
            upper = size.upper() if isinstance(size, str) else None
            hint = " (use an uppercase K)" if upper in GEMINI_IMAGE_SIZES else ""
            raise ConfigError(
                f"image_config image_size must be one of {', '.join(GEMINI_IMAGE_SIZES)}{hint}, not {size!r}"
            )
        if not self._vertex:
            vertex_only = [name for name in GEMINI_VERTEX_ONLY_IMAGE_FIELDS if fields.get(name) is not None]
            if vertex_only:
                one = len(vertex_only) == 1
                raise ConfigError(
                    f"image_config {', '.join(vertex_only)} need{'s' if one else ''} Vertex AI: the Gemini "
                    f"Developer API does not support {'it' if one else 'them'}. Use "
                    "VertexAIConfig(project=..., location=...) (or VertexAIConfig(api_key=...) for express mode), "
                    "or drop the field(s)."
                )
        quality = fields.get("output_compression_quality")
        options = fields.get("image_output_options") or {}
        if isinstance(options, Mapping):
            quality = options.get("compression_quality", options.get("compressionQuality", quality))
        if quality is not None and (
            not isinstance(quality, int) or isinstance(quality, bool) or not 0 <= quality <= 100
        ):
            raise ConfigError(
                f"image_config compression quality must be an integer from 0 to 100, not {quality!r}"
            )


# Documented values (Gemini image models; 1:4, 4:1, 1:8, 8:1 and 512 are Gemini 3.1 Flash Image only).
GEMINI_MODALITIES = ("TEXT", "IMAGE", "AUDIO")
GEMINI_ASPECT_RATIOS = (
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "1:4", "4:1", "1:8", "8:1",
)
GEMINI_IMAGE_SIZES = ("512", "1K", "2K", "4K")
# Documented for Gemini 3.1 Flash Image only (https://ai.google.dev/gemini-api/docs/image-generation).
GEMINI_NEWEST_ONLY_RATIOS = ("1:4", "4:1", "1:8", "8:1")
GEMINI_NEWEST_ONLY_SIZES = ("512",)
GEMINI_VERTEX_ONLY_IMAGE_FIELDS = (
    "person_generation", "prominent_people", "output_mime_type", "output_compression_quality",
    "image_output_options",
)


def image_config_fields(image_config: Any) -> dict[str, Any]:
    """The set fields of an ``ImageConfig`` (SDK object or dict, either key casing), by snake_case name."""
    if image_config is None:
        return {}
    if isinstance(image_config, Mapping):
        raw = dict(image_config)
    elif hasattr(image_config, "model_dump"):
        raw = image_config.model_dump(exclude_none=True)
    else:
        raise ConfigError(
            "image_config must be a google.genai.types.ImageConfig or a dict such as "
            f"{{'aspect_ratio': '16:9', 'image_size': '2K'}}, not {type(image_config).__name__}"
        )
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"image_config keys must be strings, not {key!r}")
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        if value is not None:
            out[snake] = value
    return out


@dataclass(frozen=True, repr=False)
class VertexAIConfig(GeminiConfig):
    """Gemini on Vertex AI: ``project`` + ``location`` (+ ``credentials``), or ``api_key`` for express mode.

    Environment: ``GOOGLE_CLOUD_PROJECT``, ``GOOGLE_CLOUD_LOCATION`` (default ``global``); without
    ``credentials`` the Application Default Credentials are used.
    """

    _: KW_ONLY
    project: str | None = None
    location: str | None = None
    credentials: Any = None

    _implementation: ClassVar[str] = "nbimagine._providers.google:VertexAIProvider"
    provider: ClassVar[str] = "vertex"
    _vertex: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_key and self.credentials is not None:
            raise ConfigError(
                "VertexAIConfig takes credentials= (project mode) or api_key= (express mode), not both"
            )
        if self.api_key and (self.project or self.location):
            raise ConfigError(
                "VertexAIConfig express mode (api_key=) does not take project/location; "
                "drop api_key to use project + location with credentials"
            )

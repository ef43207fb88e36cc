"""Provider configurations. Plain data: no SDK is imported until a request is made.

Every config takes ``model``, ``api_key=None`` (then the SDK's usual environment variables apply),
``base_url=None``, ``timeout`` (seconds) and ``max_retries``. Keys never appear in reprs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = [
    "AzureOpenAIResponsesConfig",
    "GeminiConfig",
    "OpenAIConfig",
    "OpenAIResponsesConfig",
    "ProviderConfig",
    "VertexAIConfig",
]

_SECRET_FIELDS = frozenset({"api_key", "azure_ad_token", "credentials"})
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
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"{type(self).__name__} needs a model name, e.g. model='gpt-4.1'")
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, not {self.max_retries!r}")

    def replace(self, **changes: Any) -> ProviderConfig:
        """A copy with some fields changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS:
                if value is not None:
                    shown.append(f"{f.name}=<set>")
            elif value != f.default:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


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
    """

    _: KW_ONLY
    store: bool = True
    tool_choice: str | None = None
    extra_body: Mapping[str, Any] | None = None

    _implementation: ClassVar[str] = "nbimagine._providers.openai:OpenAIResponsesProvider"
    provider: ClassVar[str] = "openai"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tool_choice is not None and self.tool_choice not in _TOOL_CHOICES:
            raise ConfigError(f"tool_choice must be one of {', '.join(_TOOL_CHOICES)}, not {self.tool_choice!r}")


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


@dataclass(frozen=True, repr=False)
class OpenAIConfig(_OpenAIBase):
    """OpenAI Chat Completions: text answers (image inputs allowed). It cannot run the image tool."""

    _implementation: ClassVar[str] = "nbimagine._providers.openai:ChatCompletionsProvider"
    provider: ClassVar[str] = "openai"


@dataclass(frozen=True, repr=False)
class GeminiConfig(ProviderConfig):
    """Gemini Developer API. Images come from the IMAGE response modality, not from a tool.

    ``image_config`` is a ``google.genai.types.ImageConfig`` or a plain dict, passed through whole.
    ``include_thoughts=True`` asks for the model's interim drafts, streamed as partial images.
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


@dataclass(frozen=True, repr=False)
class VertexAIConfig(GeminiConfig):
    """Gemini on Vertex AI: ``project`` + ``location`` (+ ``credentials``), or ``api_key`` for express mode.

    Environment: ``GOOGLE_CLOUD_PROJECT``, ``GOOGLE_CLOUD_LOCATION``.
    """

    _: KW_ONLY
    project: str | None = None
    location: str | None = None
    credentials: Any = None

    _implementation: ClassVar[str] = "nbimagine._providers.google:VertexAIProvider"
    provider: ClassVar[str] = "vertex"

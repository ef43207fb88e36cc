"""The session configuration shared by the ``%%imagine`` magic and the widget panels.

One process-wide :class:`ImagineSession` (``get_session()``) holds the defaults a notebook
generates with: provider, model, the OpenAI image-tool options and the Gemini image options. It is
a ``traitlets.HasTraits`` so that widgets can ``link``/``observe`` it and ``%config ImagineMagics``
can forward to it. Nothing here imports an SDK: agents are built from plain config dataclasses and
the SDKs load on the first request.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from traitlets import Bool, HasTraits, Int, List, Unicode

from .config import (
    GEMINI_ASPECT_RATIOS,
    GEMINI_IMAGE_SIZES,
    AzureOpenAIImagesConfig,
    AzureOpenAIResponsesConfig,
    FoundryAgentConfig,
    GeminiConfig,
    OpenAIImagesConfig,
    OpenAIResponsesConfig,
    ProviderConfig,
    VertexAIConfig,
)
from .errors import ConfigError
from .tools import ImageGenerationTool

if TYPE_CHECKING:
    from ._agent import Agent
    from .emulator import Emulator

__all__ = ["DEFAULT_MODELS", "OPTIONS", "PROVIDERS", "ImagineSession", "emulator", "get_session", "set_emulator"]

PROVIDERS = ("openai", "azure", "foundry", "gemini", "vertex")
# Foundry's model is the orchestrator deployment of an agent version nbimagine creates: there is no default
# ("" = use the agent as it is, unless AZURE_AI_MODEL_DEPLOYMENT_NAME names one).
DEFAULT_MODELS = {
    "openai": "gpt-4.1",
    "azure": "gpt-4.1",
    "foundry": "",
    "gemini": "gemini-3.1-flash-image",
    "vertex": "gemini-3.1-flash-image",
}
# Provider families that run the Responses API's image tool.
RESPONSES_KINDS = ("openai", "azure", "foundry")
# Session option -> ImageGenerationTool field (OpenAI / Azure).
OPENAI_OPTIONS = {
    "size": "size",
    "quality": "quality",
    "background": "background",
    "output_format": "output_format",
    "output_compression": "output_compression",
    "partial_images": "partial_images",
    "moderation": "moderation",
    "input_fidelity": "input_fidelity",
}
GEMINI_OPTIONS = ("aspect_ratio", "image_size", "response_modalities")
# Responses API only (openai, azure and foundry): run each request as a background response.
RESPONSES_OPTIONS = ("background_mode",)
# Session option -> the families that take it (FoundryAgentConfig / AzureOpenAIResponsesConfig fields).
FOUNDRY_OPTIONS = {
    "project_endpoint": ("foundry",),
    "agent_name": ("foundry",),
    "agent_version": ("foundry",),
    "image_deployment": ("azure", "foundry"),
}
OPTIONS = ("model", *OPENAI_OPTIONS, *GEMINI_OPTIONS, *RESPONSES_OPTIONS, *FOUNDRY_OPTIONS, "emulator")

# Which environment variables count as credentials, per provider (names only; values never leave here).
KEY_ENV = {
    "openai": (("OPENAI_API_KEY",),),
    "azure": (("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN"), ("AZURE_OPENAI_ENDPOINT",)),
    # Foundry: the project endpoint; the credential is Microsoft Entra ID (see foundry_credential_sources).
    "foundry": (("AZURE_AI_PROJECT_ENDPOINT",),),
    "gemini": (("GEMINI_API_KEY", "GOOGLE_API_KEY"),),
    # Vertex: a project (Application Default Credentials) or an express-mode API key.
    "vertex": (("GOOGLE_CLOUD_PROJECT", "GOOGLE_API_KEY"),),
}
# Placeholder credentials for the emulator; it accepts any non-empty key.
_EMULATOR_KEY = "emulator-key"


@dataclass
class _Registered:
    config: ProviderConfig
    tools: tuple[object, ...] = field(default_factory=tuple)


class ImagineSession(HasTraits):
    """Defaults for ``%%imagine`` and the panels; observable (``traitlets``).

    ``model=None`` means ``DEFAULT_MODELS[provider]``. Options that do not apply to the current
    provider are kept but not sent (so switching back and forth keeps them).
    """

    provider = Unicode("openai")
    model = Unicode(None, allow_none=True)
    size = Unicode(None, allow_none=True)
    quality = Unicode(None, allow_none=True)
    background = Unicode(None, allow_none=True)
    output_format = Unicode(None, allow_none=True)
    moderation = Unicode(None, allow_none=True)
    input_fidelity = Unicode(None, allow_none=True)
    output_compression = Int(None, allow_none=True)
    partial_images = Int(0)
    aspect_ratio = Unicode(None, allow_none=True)
    image_size = Unicode(None, allow_none=True)
    response_modalities = List(Unicode(), default_value=["TEXT", "IMAGE"])
    background_mode = Bool(False)
    project_endpoint = Unicode(None, allow_none=True)
    agent_name = Unicode(None, allow_none=True)
    agent_version = Unicode(None, allow_none=True)
    image_deployment = Unicode(None, allow_none=True)
    emulator = Bool(False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registered: dict[str, _Registered] = {}

    # --- names -----------------------------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        """Built-in provider names followed by registered ones."""
        return PROVIDERS + tuple(n for n in self._registered if n not in PROVIDERS)

    def kind(self, provider: str | None = None) -> str:
        """The provider family ("openai", "azure", "gemini", "vertex") of a built-in or registered name."""
        name = provider or self.provider
        if name in self._registered:
            return type(self._registered[name].config).provider
        if name in PROVIDERS:
            return name
        raise ConfigError(
            f"Unknown provider {name!r}: use one of {', '.join(self.providers)}, "
            "or register one with get_session().register(name, config)"
        )

    def is_images_api(self, provider: str | None = None) -> bool:
        """Whether ``provider`` (default: the current one) is an Images API config: ``n`` images per request."""
        registered = self._registered.get(provider or self.provider)
        return registered is not None and isinstance(registered.config, OpenAIImagesConfig)

    def effective_model(self, provider: str | None = None, model: str | None = None) -> str:
        name = provider or self.provider
        if model:
            return model
        if provider in (None, self.provider) and self.model:
            return self.model
        registered = self._registered.get(name)
        if self.kind(name) == "foundry":
            # The orchestrator deployment when there is one; otherwise the agent speaks for itself.
            agent = self.agent_name or (getattr(registered.config, "agent_name", None) if registered else None)
            model = (registered.config.model if registered else None) or os.environ.get(
                "AZURE_AI_MODEL_DEPLOYMENT_NAME")
            return model or (f"agent {agent}" if agent else "")
        if registered is not None:
            return registered.config.model
        return DEFAULT_MODELS[self.kind(name)]

    def options(self) -> dict[str, Any]:
        """Current values of every option (``None`` = provider default)."""
        return {name: getattr(self, name) for name in ("provider", *OPTIONS)}

    # --- validation and updates ------------------------------------------------------------------

    def _merged(self, provider: str | None, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"the options are {', '.join(OPTIONS)}"
            )
        merged = self.options()
        if provider is not None and provider != self.provider and "model" not in options:
            # A model name belongs to its provider: switching provider goes back to that provider's default.
            merged["model"] = None
        if provider is not None:
            merged["provider"] = provider
        merged.update(options)
        return merged

    def validate(self, provider: str | None = None, **options: Any) -> None:
        """Raise ``ConfigError`` (saying how to fix it) unless these options would be valid."""
        merged = self._merged(provider, options)
        self.kind(merged["provider"])
        self._tool(merged)
        _gemini_image_config(merged)
        modalities = merged["response_modalities"]
        if modalities is not None:
            GeminiConfig(model="check", response_modalities=list(modalities))
        if merged["model"] is not None and (not isinstance(merged["model"], str) or not merged["model"].strip()):
            raise ConfigError("model must be a non-empty name such as 'gpt-4.1' or 'gemini-3.1-flash-image'")
        if not isinstance(merged["background_mode"], bool):
            raise ConfigError(f"background_mode must be True or False, not {merged['background_mode']!r}")
        for name in FOUNDRY_OPTIONS:
            value = merged[name]
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty text, not {value!r}")

    def _check_applies(self, provider: str, kind: str, overrides: dict[str, Any]) -> None:
        """A per-request option the provider does not take is an error (session defaults just stay inactive)."""
        if overrides.get("background_mode") and kind not in RESPONSES_KINDS:
            raise ConfigError("--background-mode runs a Responses API background response: it needs an openai, "
                              f"azure or foundry provider, not {provider}")
        for name, families in FOUNDRY_OPTIONS.items():
            if overrides.get(name) is not None and kind not in families:
                flag = "--agent" if name == "agent_name" else "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is a {' and '.join(families)} option and {provider} does not use it; "
                                  "drop it")

    def use(self, provider: str | None = None, **options: Any) -> None:
        """Validate, then set the provider and options together (one round of notifications)."""
        self.validate(provider, **options)
        merged = self._merged(provider, options)
        with self.hold_trait_notifications():
            for name, value in merged.items():
                if name == "partial_images" and value is None:
                    value = 0
                if name == "response_modalities" and value is not None:
                    value = [str(v).upper() for v in value]
                if getattr(self, name) != value:
                    setattr(self, name, value)

    # --- agents ----------------------------------------------------------------------------------

    def register(self, name: str, config: ProviderConfig, tools: Sequence[object] = ()) -> None:
        """Make ``name`` usable as ``-p name`` / ``use name`` (e.g. a second Azure deployment)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"Provider names must be identifiers such as 'azure_east', not {name!r}")
        if not isinstance(config, ProviderConfig):
            raise ConfigError(f"register() needs a provider config such as AzureOpenAIResponsesConfig, "
                              f"not {type(config).__name__}")
        self._registered[name] = _Registered(config, tuple(tools))

    def _tool(self, merged: dict[str, Any]) -> ImageGenerationTool:
        # The ImageGenerationTool constructor is the single source of truth for OpenAI option rules.
        params = {field_: merged[opt] for opt, field_ in OPENAI_OPTIONS.items() if merged.get(opt) is not None}
        if params.get("partial_images") == 0:
            del params["partial_images"]
        return ImageGenerationTool(**params)

    def build_agent(self, **overrides: Any) -> Agent:
        """An ``Agent`` for the session's provider with these overrides (same names as the options).

        ``provider=`` may be among the overrides. OpenAI/Azure force the image tool; with
        ``emulator`` on, every provider is routed to the in-process emulator with dummy keys.
        """
        from ._agent import Agent

        provider = overrides.pop("provider", None)
        per_call = overrides.pop("n", None)  # Images API only: images per request
        self.validate(provider, **overrides)
        merged = self._merged(provider, overrides)
        name = merged["provider"]
        kind = self.kind(name)
        self._check_applies(name, kind, overrides)
        model = self.effective_model(name, merged["model"])
        routed = merged["emulator"]
        registered = self._registered.get(name)

        if registered is not None and isinstance(registered.config, OpenAIImagesConfig):
            # The Images API takes the same options as the image tool, on the config itself.
            params = self._tool(merged).params()
            if per_call:
                params["n"] = per_call
            config = registered.config.replace(model=model, **params)
            tools = []
        elif kind == "foundry":
            config, tools = self._foundry(merged, registered)
        elif kind in ("openai", "azure"):
            tool = self._tool(merged)
            if registered is not None:
                config = registered.config.replace(model=model)
                if isinstance(config, OpenAIResponsesConfig) and config.tool_choice is None:
                    config = config.replace(tool_choice="image_generation")
                tools = _merge_image_tool(registered.tools, tool)
            else:
                cls = AzureOpenAIResponsesConfig if kind == "azure" else OpenAIResponsesConfig
                config = cls(model=model, tool_choice="image_generation")
                tools = [tool]
            if kind == "azure" and merged["image_deployment"] and isinstance(config, AzureOpenAIResponsesConfig):
                config = config.replace(image_deployment=merged["image_deployment"])
        else:
            image_config = _gemini_image_config(merged) or None
            modalities = list(merged["response_modalities"] or ["TEXT", "IMAGE"])
            if registered is not None:
                changes: dict[str, Any] = {"model": model}
                if image_config:
                    changes["image_config"] = {**_as_dict(registered.config), **image_config}
                if getattr(registered.config, "response_modalities", None) is None:
                    changes["response_modalities"] = modalities
                config = registered.config.replace(**changes)
                tools = list(registered.tools)
            else:
                cls = VertexAIConfig if kind == "vertex" else GeminiConfig
                config = cls(model=model, response_modalities=modalities, image_config=image_config)
                tools = []
        if merged["background_mode"] and isinstance(config, OpenAIResponsesConfig):
            config = config.replace(background=True)
        if routed:
            config = _route_to_emulator(config)
        return Agent(f"imagine-{name}", config=config, tools=tools)

    def _foundry(self, merged: dict[str, Any], registered: _Registered | None) -> tuple[ProviderConfig, list[object]]:
        """A Foundry agent: with a model (the orchestrator deployment), a version nbimagine creates or reuses with
        the session's image options; without one, the existing agent as it is."""
        tool = self._tool(merged)
        base = registered.config if registered is not None else None
        model = (merged["model"] or (base.model if base is not None else None)
                 or os.environ.get("AZURE_AI_MODEL_DEPLOYMENT_NAME") or None)
        fields = {name: merged[name] for name in FOUNDRY_OPTIONS if merged[name] is not None}
        if not (fields.get("agent_name") or (base is not None and getattr(base, "agent_name", None))):
            raise ConfigError("Foundry needs the agent's name: %imagine use foundry --project-endpoint URL "
                              "--agent NAME [--image-deployment D] [-m DEPLOYMENT]")
        if model:
            if "agent_version" in fields:
                raise ConfigError("--agent-version uses an existing version as it is; with -m nbimagine creates "
                                  "the version itself: drop one of them")
            fields["model"] = model
            fields.setdefault("tool_choice", "image_generation")
            tools: list[object] = (_merge_image_tool(registered.tools, tool) if registered is not None
                                   else [tool])
        else:
            if tool.params():
                raise ConfigError(
                    f"{', '.join(tool.params())} would change the agent's image tool, which lives in its definition: "
                    "add -m <orchestrator deployment> so nbimagine creates a version with them, or set them on "
                    "the agent in Foundry"
                )
            tools = []
        if base is not None:
            return base.replace(**fields), tools
        return FoundryAgentConfig(**fields), tools

    def key_status(self) -> dict[str, bool]:
        """Provider name -> whether credentials are set (environment or registered config). Never values."""
        status = {name: all(any(os.environ.get(v) for v in group) for group in groups)
                  for name, groups in KEY_ENV.items()}
        status["foundry"] = status["foundry"] or bool(self.project_endpoint)
        for name, reg in self._registered.items():
            config = reg.config
            has_key = bool(config.api_key or getattr(config, "azure_ad_token", None)
                           or getattr(config, "credentials", None) or getattr(config, "project", None))
            status[name] = has_key or status.get(type(config).provider, False)
        return status

    def key_sources(self) -> dict[str, list[str]]:
        """Provider name -> names of the environment variables that are set (for ``%imagine providers``)."""
        out = {}
        for name, groups in KEY_ENV.items():
            out[name] = [v for group in groups for v in group if os.environ.get(v)]
        session_endpoint = ["project_endpoint (session)"] if self.project_endpoint else []
        out["foundry"] = [*out["foundry"], *session_endpoint, *foundry_credential_sources()]
        for name, reg in self._registered.items():
            out[name] = ["api_key (configured)"] if reg.config.api_key else out.get(type(reg.config).provider, [])
        return out


def foundry_credential_sources() -> list[str]:
    """Where ``DefaultAzureCredential`` may find a Microsoft Entra ID identity here (names, never values)."""
    import shutil

    sources = [v for v in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
                           "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT", "MSI_ENDPOINT") if os.environ.get(v)]
    for tool, label in (("az", "Azure CLI (az login)"), ("azd", "Azure Developer CLI (azd auth login)")):
        if shutil.which(tool):
            sources.append(label)
    return sources


def _as_dict(config: ProviderConfig) -> dict[str, Any]:
    from .config import image_config_fields

    return image_config_fields(getattr(config, "image_config", None))


def _merge_image_tool(tools: Sequence[object], session_tool: ImageGenerationTool) -> list[object]:
    # A registered config's own image tool wins for fields the session leaves unset.
    out: list[object] = []
    found = False
    for tool in tools:
        if isinstance(tool, ImageGenerationTool):
            found = True
            out.append(ImageGenerationTool(**{**tool.params(), **session_tool.params(),
                                              "input_image_mask": tool.input_image_mask}))
        else:
            out.append(tool)
    if not found:
        out.append(session_tool)
    return out


def _gemini_image_config(merged: dict[str, Any]) -> dict[str, Any]:
    image_config = {}
    ratio, size = merged.get("aspect_ratio"), merged.get("image_size")
    if ratio is not None:
        if ratio not in GEMINI_ASPECT_RATIOS:
            raise ConfigError(f"aspect ratio must be one of {', '.join(GEMINI_ASPECT_RATIOS)}, not {ratio!r}")
        image_config["aspect_ratio"] = ratio
    if size is not None:
        if size not in GEMINI_IMAGE_SIZES:
            hint = " (use an uppercase K)" if str(size).upper() in GEMINI_IMAGE_SIZES else ""
            raise ConfigError(f"image size must be one of {', '.join(GEMINI_IMAGE_SIZES)}{hint}, not {size!r}")
        image_config["image_size"] = size
    return image_config


def _route_to_emulator(config: ProviderConfig) -> ProviderConfig:
    emu = emulator()
    if isinstance(config, FoundryAgentConfig):
        from .emulator import EmulatorCredential

        return config.replace(project_endpoint=emu.foundry_endpoint, base_url=None, api_key=None,
                              credential=EmulatorCredential(),
                              image_deployment=config.image_deployment or "gpt-image-1")
    if isinstance(config, AzureOpenAIImagesConfig):
        return config.replace(base_url=None, azure_endpoint=emu.azure_endpoint, api_version="2025-04-01-preview",
                              api_key=_EMULATOR_KEY, azure_ad_token=None)
    if isinstance(config, OpenAIImagesConfig):
        return config.replace(base_url=emu.openai_base_url, api_key=_EMULATOR_KEY, organization=None, project=None)
    if isinstance(config, AzureOpenAIResponsesConfig):
        return config.replace(
            base_url=emu.azure_endpoint.rstrip("/") + "/openai/v1/", azure_endpoint=None, api_version="preview",
            api_key=_EMULATOR_KEY, azure_ad_token=None, image_deployment=config.image_deployment or "gpt-image-1",
        )
    if isinstance(config, OpenAIResponsesConfig):
        return config.replace(base_url=emu.openai_base_url, api_key=_EMULATOR_KEY, organization=None, project=None)
    if isinstance(config, VertexAIConfig):
        # Express mode (an API key, no project): no Application Default Credentials needed offline.
        return config.replace(base_url=emu.vertex_base_url, api_key=_EMULATOR_KEY, credentials=None,
                              project=None, location=None)
    if isinstance(config, GeminiConfig):
        return config.replace(base_url=emu.gemini_base_url, api_key=_EMULATOR_KEY, api_version="v1beta")
    raise ConfigError(f"The emulator cannot stand in for {type(config).__name__}")


# --- singletons ------------------------------------------------------------------------------------

_session: ImagineSession | None = None
_emulator: Emulator | None = None
_lock = threading.Lock()


def get_session() -> ImagineSession:
    """The process-wide session shared by the magics and the widgets.

    ``NBIMAGINE_EMULATOR=1`` in the environment turns the emulator on when the session is created.
    """
    global _session
    with _lock:
        if _session is None:
            _session = ImagineSession(emulator=os.environ.get("NBIMAGINE_EMULATOR", "") not in ("", "0"))
        return _session


def emulator() -> Emulator:
    """The in-process emulator, started on first use and stopped when the interpreter exits."""
    global _emulator
    with _lock:
        if _emulator is None:
            from .emulator import Emulator

            emu = Emulator().start()
            atexit.register(emu.stop)
            _emulator = emu
        return _emulator


def set_emulator(emu: Emulator | None) -> None:
    """Route ``emulator`` mode to an emulator you started (e.g. on a fixed port, or a test's); ``None``
    goes back to the in-process one started on demand. Does not turn emulator mode on by itself."""
    global _emulator
    with _lock:
        _emulator = emu

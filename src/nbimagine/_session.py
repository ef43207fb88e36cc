"""The session configuration shared by the ``%%imagine`` magic and the widget panels.

One process-wide :class:`ImagineSession` (``get_session()``) holds the defaults a notebook
generates with: the provider and every option of the table in :mod:`nbimagine._options` (one trait
per row; a value set for another provider is kept but not sent). It is
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

from traitlets import Bool, HasTraits, Int, List, TraitType, Unicode

from ._options import FAMILY_LABELS, IMAGE_TOOL, IMAGES_API, Option, active, option
from ._options import SETTINGS as TABLE
from .config import (
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

# The Images API twins follow their Responses API provider: the same account and keys, another API.
PROVIDERS = ("openai", "openai-images", "azure", "azure-images", "foundry", "gemini", "vertex")
# Foundry's model is the orchestrator deployment of an agent version nbimagine creates: there is no default
# ("" = use the agent as it is, unless AZURE_AI_MODEL_DEPLOYMENT_NAME names one).
DEFAULT_MODELS = {
    "openai": "gpt-4.1",
    "openai-images": "gpt-image-2",
    "azure": "gpt-4.1",
    "azure-images": "gpt-image-2",  # the image deployment's name (else AZURE_OPENAI_IMAGE_DEPLOYMENT)
    "foundry": "",
    "gemini": "gemini-3.1-flash-image",
    "vertex": "gemini-3.1-flash-image",
}
# What stands for the model of a Foundry session that names no agent yet.
NO_AGENT = "no agent yet (--agent NAME)"
# Every session option: the table's (all but the cell modes), then the session's own switch.
OPTIONS = (*(opt.name for opt in TABLE), "emulator")

# Which environment variables count as credentials, per provider (names only; values never leave here).
KEY_ENV = {
    "openai": (("OPENAI_API_KEY",),),
    "openai-images": (("OPENAI_API_KEY",),),
    "azure": (("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN"), ("AZURE_OPENAI_ENDPOINT",)),
    "azure-images": (("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN"), ("AZURE_OPENAI_ENDPOINT",)),
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


def option_trait(opt: Option) -> TraitType[Any, Any]:
    """The traitlets trait of a table option (for the session and ``%config ImagineMagics``)."""
    if opt.kind is bool:
        return Bool(opt.default, help=opt.help_text())
    if opt.kind is int:
        return Int(opt.default, allow_none=opt.default is None, help=opt.help_text())
    if opt.kind is list:
        return List(Unicode(), default_value=list(opt.default or []), help=opt.help_text())
    return Unicode(opt.default, allow_none=True, help=opt.help_text())


# The option traits are made from the table, so that a new row is a new session option.
_OptionTraits = type("_OptionTraits", (HasTraits,), {opt.name: option_trait(opt) for opt in TABLE})


class ImagineSession(_OptionTraits):
    """Defaults for ``%%imagine`` and the panels; observable (``traitlets``).

    Besides ``provider`` and ``emulator``, every row of :data:`nbimagine._options.SETTINGS` (the
    table but its cell modes) is a trait (``model``, ``size``, ``quality``, ``aspect_ratio``,
    ``max_retries``, ``concurrency``...). ``model=None`` means
    ``DEFAULT_MODELS[provider]``. An option given explicitly must apply to the provider it is used
    with (``use("gemini", quality="high")`` is a ``ConfigError`` that says what Gemini takes instead);
    values set earlier for another provider are kept but not sent, and shown as inactive.
    """

    provider = Unicode("openai", help=f"{', '.join(PROVIDERS)} or a registered name")
    emulator = Bool(False, help="route every provider to the in-process emulator")

    def __init__(self, **kwargs: Any) -> None:
        # This kernel session's spending guard (``%imagine budget N --session``), not an option: ``spent_usd``
        # is what every request of the session cost (its generations', and Agent requests once the extension
        # is loaded), simulated ones included (so the guard can be tried offline); ``_holds`` what requests in
        # flight hold of it (see ``_budget``). The notebook's budget lives in its history and survives a restart.
        self._budget_usd: float | None = None
        self.budget_usd = kwargs.pop("budget_usd", None)
        self.spent_usd = 0.0
        self._holds: dict[str, float] = {}
        super().__init__(**kwargs)
        self._registered: dict[str, _Registered] = {}

    @property
    def budget_usd(self) -> float | None:
        """This session's budget in US dollars (``%imagine budget N --session``), None when there is none."""
        return self._budget_usd

    @budget_usd.setter
    def budget_usd(self, value: float | str | None) -> None:
        from ._budget import budget_amount, changed

        self._budget_usd = budget_amount(value)  # ConfigError for an amount that is not one
        changed()

    # --- names -----------------------------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        """Built-in provider names followed by registered ones."""
        return PROVIDERS + tuple(n for n in self._registered if n not in PROVIDERS)

    def kind(self, provider: str | None = None) -> str:
        """The provider family (a built-in name: "openai", "openai-images", "gemini"...) of a built-in or
        registered name; it says which options the provider takes."""
        name = provider or self.provider
        if name in self._registered:
            return family_of(self._registered[name].config)
        if name in PROVIDERS:
            return name
        raise ConfigError(
            f"Unknown provider {name!r}: use one of {', '.join(self.providers)}, "
            "or register one with get_session().register(name, config)"
        )

    def is_images_api(self, provider: str | None = None) -> bool:
        """Whether ``provider`` (default: the current one) is an Images API config: ``n`` images per request."""
        return self.kind(provider) in IMAGES_API

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
        if name == "azure-images":
            return os.environ.get("AZURE_OPENAI_IMAGE_DEPLOYMENT") or DEFAULT_MODELS[name]
        return DEFAULT_MODELS[self.kind(name)]

    def options(self) -> dict[str, Any]:
        """Current values of every option (``None`` = provider default)."""
        return {name: getattr(self, name) for name in ("provider", *OPTIONS)}

    def active_options(self, provider: str | None = None) -> dict[str, Any]:
        """The table options the provider takes, with their current values (``None`` = provider default)."""
        return active({opt.name: getattr(self, opt.name) for opt in TABLE}, self.kind(provider))

    def inactive_options(self, provider: str | None = None) -> dict[str, Any]:
        """Values kept for other providers, which this provider does not use (only those that are set)."""
        family = self.kind(provider)
        return {opt.name: getattr(self, opt.name) for opt in TABLE
                if not opt.applies(family) and getattr(self, opt.name) not in (None, opt.default)}

    def summary(self) -> str:
        """One line: provider · model · emulator · the options set for this provider (what is sent)."""
        try:
            model, active_now = self.effective_model(), self.active_options()
        except ConfigError as exc:
            return str(exc)
        set_ = ", ".join(f"{name}={option(name).show(value)}" for name, value in active_now.items()
                         if name != "model" and value not in (None, option(name).default))
        route = ["offline emulator"] if self.emulator else []
        parts = [FAMILY_LABELS.get(self.provider, self.provider), model or NO_AGENT, *route, *([set_] if set_ else [])]
        return " · ".join(parts)

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
        merged.update({name: option(name).validate(value) if name != "emulator" else value
                       for name, value in options.items()})
        return merged

    def validate(self, provider: str | None = None, *, any_provider: bool = False, **options: Any) -> None:
        """Raise ``ConfigError`` (saying how to fix it) unless these options would be valid.

        Each option given must apply to the provider (``provider`` or the session's); with
        ``any_provider=True`` an option of another provider is accepted and kept as an inactive
        default (what ``%config`` and configuration files do).
        """
        merged = self._merged(provider, options)
        name = merged["provider"]
        family = self.kind(name)
        if not any_provider:
            for key in options:
                value = merged[key]  # normalised
                if key == "emulator" or value is None or value == option(key).default:
                    continue
                if not option(key).applies(family):
                    raise ConfigError(option(key).misplaced(value, family, name))
        self._tool(merged)
        model = merged["model"]
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise ConfigError("--model needs a non-empty name such as 'gpt-4.1' or 'gemini-3.1-flash-image'")
        if family in IMAGES_API:  # the model's own rules (dall-e-3 sizes, gpt-image-1-mini fidelity...)
            self._images_config(merged, name, self.effective_model(name, model))

    def use(self, provider: str | None = None, *, any_provider: bool = False, **options: Any) -> None:
        """Validate, then set the provider and options together (one round of notifications)."""
        self.validate(provider, any_provider=any_provider, **options)
        merged = self._merged(provider, options)
        with self.hold_trait_notifications():
            for name, value in merged.items():
                if value is None and name != "provider" and name != "emulator":
                    value = option(name).default
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
        # The ImageGenerationTool constructor is the single source of truth for the tool's combined rules
        # (a transparent JPEG, compression without jpeg/webp...); its messages name the Python parameters,
        # the session's name the magic's flags, as every other session message does.
        try:
            return ImageGenerationTool(**_sent(merged, "ImageGenerationTool"))
        except ConfigError as exc:
            raise ConfigError(_in_flags(str(exc))) from None

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
        model = self.effective_model(name, merged["model"])
        routed = merged["emulator"]
        registered = self._registered.get(name)

        if kind in IMAGES_API:
            config, tools = self._images_config(merged, name, model, per_call), []
        elif kind == "foundry":
            config, tools = self._foundry(merged, registered)
        elif kind in IMAGE_TOOL:
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
        else:
            image_config = _sent(merged, "ImageConfig") or None
            modalities = list(merged["response_modalities"] or option("response_modalities").default)
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
        config = _with_config_options(config, merged, kind)
        if routed:
            config = _route_to_emulator(config)
        return Agent(f"imagine-{name}", config=config, tools=tools)

    def _images_config(self, merged: dict[str, Any], name: str, model: str, n: int | None = None
                       ) -> OpenAIImagesConfig:
        """The Images API config of ``name`` (registered, or built in) with the session's image options, which
        the Images API takes under the image tool's names; checked against the model's rules (ConfigError)."""
        params = self._tool(merged).params()
        if n:
            params["n"] = n
        registered = self._registered.get(name)
        if registered is not None:
            return registered.config.replace(model=model, **params)  # type: ignore[return-value]
        cls = AzureOpenAIImagesConfig if name == "azure-images" else OpenAIImagesConfig
        return cls(model=model, **params)

    def _foundry(self, merged: dict[str, Any], registered: _Registered | None) -> tuple[ProviderConfig, list[object]]:
        """A Foundry agent: with a model (the orchestrator deployment), a version nbimagine creates or reuses with
        the session's image options; without one, the existing agent as it is."""
        tool = self._tool(merged)
        base = registered.config if registered is not None else None
        model = (merged["model"] or (base.model if base is not None else None)
                 or os.environ.get("AZURE_AI_MODEL_DEPLOYMENT_NAME") or None)
        fields = _sent(merged, "config", "foundry")
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


def family_of(config: ProviderConfig) -> str:
    """The option family of a config: its ``provider``, or the Images API twin of it."""
    if isinstance(config, OpenAIImagesConfig):
        return f"{config.provider}-images"
    return config.provider


def credentials_advice(session: ImagineSession, provider: str, exc: ConfigError,
                       offline: str = "run %imagine emulator on to work offline") -> str:
    """One line for missing credentials: the variables to set, how to set a secret safely in a
    notebook, and the offline way out (``offline`` says how, where the user is)."""
    groups = KEY_ENV.get(provider, ())  # built-in names only: a registered config says for itself
    missing = [group for group in groups if not any(os.environ.get(name) for name in group)]
    if not missing:
        return f"{exc}; or {offline}"
    names = " and ".join(" or ".join(group) for group in missing)
    secret = next((name for group in missing for name in group if "KEY" in name or "TOKEN" in name), None)
    how = (f"os.environ[{secret!r}] = getpass.getpass() (not %env, which prints it into the notebook)" if secret
           else f"os.environ[{missing[0][0]!r}] = '...'")
    return f"No credentials for {provider}: set {names} before starting Jupyter, or in a cell with {how}; or {offline}"


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


def _in_flags(text: str) -> str:
    """A message about ``ImageGenerationTool`` parameters in the words of the magic: ``output_format='png'
    or 'webp'`` -> ``--format png or webp``, ``output_compression`` -> ``--compression``."""
    import re

    for opt in TABLE:
        owner, _, name = opt.target.partition(".")
        if owner == "ImageGenerationTool":
            text = re.sub(rf"\b{name}='([^']*)'((?: or '[^']*')*)",
                          lambda m, flag=opt.flag: f"{flag} {m[1]}{m[2].replace(chr(39), '')}", text)
            text = re.sub(rf"\b{name}\b", opt.flag, text)
    return text


def _sent(merged: dict[str, Any], target: str, family: str | None = None) -> dict[str, Any]:
    """The options whose table ``target`` is ``target.<field>`` (those ``family`` takes, when given), by
    field, leaving out unset ones."""
    out = {}
    for opt in TABLE:
        owner, _, field_name = opt.target.partition(".")
        value = merged.get(opt.name)
        # None is "the provider decides"; a number or switch at its default (0 partial images) is not sent.
        unset = value is None or (opt.kind in (int, bool) and value == opt.default)
        if owner == target and not unset and (family is None or opt.applies(family)):
            out[field_name] = value
    return out


def _with_config_options(config: ProviderConfig, merged: dict[str, Any], family: str) -> ProviderConfig:
    """``config`` with the session's config-level options (``max_retries``, ``background``...) that this
    provider takes and this config has as fields (a registered config of another class keeps its own)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}
    fields = {k: v for k, v in _sent(merged, "config", family).items() if k in names and k != "model"}
    return config.replace(**fields) if fields else config


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
            from urllib.parse import urlsplit

            from .emulator import Emulator

            url = os.environ.get("NBIMAGINE_EMULATOR", "")
            if url.startswith(("http://", "https://")):
                # An emulator already running (python -m nbimagine.emulator prints this variable): its
                # batch jobs outlive a kernel restart, as a real provider's do.
                parts = urlsplit(url)
                _emulator = Emulator(parts.hostname or "127.0.0.1", parts.port or 80)
            else:
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

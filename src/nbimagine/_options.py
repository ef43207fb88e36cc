"""Every image option of the notebook layer, in one table.

The ``%%imagine`` parser and its help (``%imagine?``, ``--help``), ``%imagine use``, the session's
traits, ``%config ImagineMagics``, the settings panel and validation all read :data:`OPTIONS`, so
that they cannot drift apart. A row names the option once: its session name (the provider's own
parameter name), its magic flag, the provider families it belongs to, its allowed values (taken
from :mod:`nbimagine.tools` and :mod:`nbimagine.config`, whose constants the emulator also checks
against, and which a test compares with the SDKs' own ``Literal`` types), its default and its help.

Adding an option (e.g. ``--background`` for background responses) is one row here; the parser,
help, session trait, ``%config`` trait and ``%imagine use`` listing follow.

A row's ``scope`` says what it is: ``"provider"`` rows are sent to the provider; ``"set"`` rows say how
an image set runs (``--concurrency``, ``--rate-limit``: session options, never sent); ``"cell"`` rows
are modes of one ``%%imagine`` cell (``--each``, ``--batch``: the magic line only, no session value).

Importing this module stays cheap: no SDK, no IPython, no widgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import (
    GEMINI_ASPECT_RATIOS,
    GEMINI_IMAGE_SIZES,
    GEMINI_MODALITIES,
    check_agent_name,
    check_project_endpoint,
)
from .errors import ConfigError
from .tools import BACKGROUNDS, INPUT_FIDELITIES, MODERATIONS, OUTPUT_FORMATS, QUALITIES, STANDARD_SIZES, validate_size

__all__ = [
    "EVERY_PROVIDER",
    "FAMILY_LABELS",
    "IMAGES_API",
    "IMAGE_CONFIG",
    "IMAGE_TOOL",
    "OPENAI_IMAGE",
    "OPTIONS",
    "SETTINGS",
    "Option",
    "active",
    "family_label",
    "option",
    "options_for",
    "sent",
]

# Provider families grouped by how they take image options. A family is a config's ``provider`` ("openai",
# "gemini"...), except for the Images API configs, whose options differ from the Responses API's.
IMAGE_TOOL = ("openai", "azure", "foundry")  # the Responses API's image_generation tool (ImageGenerationTool)
IMAGES_API = ("openai-images", "azure-images")  # images.generate / images.edit (OpenAIImagesConfig)
OPENAI_IMAGE = IMAGE_TOOL + IMAGES_API  # the GPT image models' own parameters, on the tool or the Images API
IMAGE_CONFIG = ("gemini", "vertex")  # GenerateContentConfig.response_modalities + ImageConfig
EVERY_PROVIDER: tuple[str, ...] = ()  # an option every provider takes
FAMILY_LABELS = {"openai": "OpenAI", "azure": "Azure OpenAI", "foundry": "Microsoft Foundry", "gemini": "Gemini",
                 "vertex": "Vertex AI", "openai-images": "OpenAI Images API",
                 "azure-images": "Azure OpenAI Images API"}

Hint = Callable[[Any, str], str]  # (value, family it was given for) -> what to use there instead


@dataclass(frozen=True)
class Option:
    """One option. ``name`` is the session trait, the override key and the provider's parameter name."""

    name: str
    flags: tuple[str, ...]  # magic flags, e.g. ("-m", "--model"); the last one is the long form
    families: tuple[str, ...]  # provider families that take it; EVERY_PROVIDER = all
    target: str  # where the value is sent, e.g. "ImageGenerationTool.quality"
    help: str  # one phrase, without the allowed values (they are appended from ``choices``)
    choices: tuple[str, ...] = ()
    free_form: str = ""  # what else is accepted besides ``choices``, e.g. "WxH"
    bounds: tuple[int, int] | None = None  # inclusive, for integer options
    kind: type = str  # str, int, bool (on|off on the magic line) or list (comma-separated on the magic line)
    default: Any = None  # the session's value when unset; None = the provider decides
    metavar: str | None = None
    check: Callable[[Any], Any] | None = None  # extra validation of one value; returns it normalised
    instead: Hint | None = None  # advice when given for a family it does not belong to
    source: str = ""  # where the rule comes from
    unset: str = "default"  # how an unset value (None) is shown
    label: str = ""  # the panel's label (default: the name in words)
    example: str = ""  # a placeholder for free text
    scope: str = "provider"  # "provider" (sent), "set" (how an image set runs), "cell" (a mode of one cell)
    needs: tuple[str, ...] = ()  # cell modes (row names) one of which must be on the line with it
    excludes: tuple[str, ...] = ()  # magic-line options (argparse dests) that cannot go with it
    why: str = ""  # the reason for ``excludes``, said in the refusal

    @property
    def flag(self) -> str:
        return self.flags[-1]

    def applies(self, family: str) -> bool:
        """Whether a provider of this family takes the option."""
        return not self.families or family in self.families

    @property
    def owner(self) -> str:
        """Who the option belongs to, for messages: "OpenAI", "Gemini", "every provider"."""
        if not self.families:
            return "every provider"
        return family_label(self.families)

    @property
    def title(self) -> str:
        """The panel's label: ``label``, else the name in words ("Output format")."""
        return self.label or self.name.replace("_", " ").capitalize()

    def values_text(self) -> str:
        """The allowed values in words: ``low, medium, high, xhigh, max, auto``."""
        if self.scope == "cell":  # a flag of the line: there or not
            return ""
        parts = ["on", "off"] if self.kind is bool else list(self.choices)
        if self.free_form:
            parts.append(self.free_form)
        if self.bounds:
            parts.append(f"{self.bounds[0]}-{self.bounds[1]}")
        return ", ".join(parts)

    def help_text(self) -> str:
        """The line shown by ``%imagine?`` and as the panel control's tooltip."""
        owner = "" if not self.families else f"{self.owner}: "
        values = self.values_text()
        return f"{owner}{self.help}" + (f" ({values})" if values else "")

    def validate(self, value: Any, *, label: str | None = None) -> Any:
        """``value`` normalised, or ``ConfigError`` saying what is allowed. ``None`` is always allowed.
        ``label`` names the value in the message (default: the flag; the Python API says ``name=``)."""
        if value is None:
            return None
        flag = label or self.flag
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("on", "off"):
                return value.lower() == "on"
            raise ConfigError(f"{flag} is on or off, not {value!r}")
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or (
                    self.bounds and not self.bounds[0] <= value <= self.bounds[1]):
                low, high = self.bounds or (0, 0)
                raise ConfigError(f"{flag} takes a whole number from {low} to {high}, not {value!r}")
            return value
        if self.kind is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{self.flag} takes a list such as {','.join(self.choices)}, not {value!r}")
            normalised = [str(item).strip().upper() for item in items if str(item).strip()]
            unknown = [item for item in normalised if item not in self.choices]
            if unknown or not normalised:
                raise ConfigError(f"{self.flag} takes one or more of {', '.join(self.choices)}, "
                                  f"not {','.join(unknown) or 'nothing'}")
            return list(dict.fromkeys(normalised))
        if not isinstance(value, str):
            raise ConfigError(f"{self.flag} takes a text value such as {self.values_text()}, not {value!r}")
        if self.check is not None:
            return self.check(value)
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.flag} must be one of {self.values_text()}, not {value!r}")
        if not value.strip():
            raise ConfigError(f"{self.flag} needs a value" + (f" such as {self.example}" if self.example else ""))
        return value

    def show(self, value: Any) -> str:
        """A value as ``%imagine use`` and the panel show it."""
        if value is None:
            return self.unset
        if isinstance(value, list):
            return ",".join(map(str, value))
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def refusal(self, given: dict[str, Any]) -> str | None:
        """Why this option, given on a magic line with ``given`` (argparse dest -> value, falsy = absent),
        cannot run as asked, or None: a cell mode it needs is missing, or an option it excludes is there."""
        if self.needs and not any(given.get(name) for name in self.needs):
            modes = " or ".join(option(name).flag for name in self.needs)
            return f"{self.flag} applies to an image set: add {modes} (one prompt per line)"
        clash = [name for name in self.excludes if given.get(name) not in (None, False, [], "")]
        if clash:
            flags = ", ".join(_BY_NAME[name].flag if name in _BY_NAME else "--" + name.replace("_", "-")
                              for name in clash)
            return f"{flags} cannot go with {self.flag}: {self.why}"
        return None

    def misplaced(self, value: Any, family: str, provider: str) -> str:
        """The one-line message for this option given to a provider that does not take it."""
        where = provider if provider == family else f"{provider} ({family_label((family,))})"
        text = f"{self.flag} is {_article(self.owner)} {self.owner} option and {where} does not use it"
        advice = self.instead(value, family) if self.instead else ""
        return f"{text}: {advice}" if advice else f"{text}; drop it"


def family_label(families: Sequence[str]) -> str:
    """Who takes an option, in words: ``OPENAI_IMAGE`` -> "OpenAI", ``IMAGE_CONFIG`` -> "Gemini" (each group is
    named after its first vendor), ``IMAGE_TOOL`` -> "OpenAI Responses API", ``("azure", "foundry")`` ->
    "Azure OpenAI / Microsoft Foundry"."""
    if not families:
        return "any provider"
    if tuple(families) == IMAGE_TOOL:  # what the Images API lacks (background responses)
        return "OpenAI Responses API"
    if tuple(families) in (OPENAI_IMAGE, IMAGE_CONFIG):
        return FAMILY_LABELS[families[0]]
    return " / ".join(FAMILY_LABELS.get(f, f) for f in families)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# --- checks and hints ------------------------------------------------------------------------------


def _checked(flag: str, check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _agent_name(value: str) -> str:
    check_agent_name(value)
    return value


def _check_size(value: str) -> str:
    return _checked("--size", validate_size, value)


def _check_format(value: str) -> str:
    value = "jpeg" if value == "jpg" else value
    if value not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, not {value!r}")
    return value


def _check_image_size(value: str) -> str:
    if value not in GEMINI_IMAGE_SIZES:
        hint = " (use an uppercase K)" if value.upper() in GEMINI_IMAGE_SIZES else ""
        raise ConfigError(f"--image-size must be one of {', '.join(GEMINI_IMAGE_SIZES)}{hint}, not {value!r}")
    return value


def _ratio(text: str) -> float | None:
    try:
        left, _, right = text.partition(":") if ":" in text else text.partition("x")
        return int(left) / int(right)
    except (ValueError, ZeroDivisionError):
        return None


def openai_size_for(aspect_ratio: str | None) -> str:
    """The standard OpenAI size closest in shape to a Gemini aspect ratio."""
    ratio = _ratio(aspect_ratio or "") or 1.0
    if ratio > 1.15:
        return "1536x1024"
    if ratio < 0.87:
        return "1024x1536"
    return "1024x1024"


def gemini_shape_for(size: str | None) -> str:
    """The Gemini ``--aspect``/``--image-size`` closest to an OpenAI size."""
    if not size or size == "auto":
        return "--aspect 1:1 (or leave it out: the model chooses)"
    ratio = _ratio(size) or 1.0
    aspect = min(GEMINI_ASPECT_RATIOS, key=lambda r: abs(math.log((_ratio(r) or 1.0) / ratio)))
    longest = max(int(side) for side in size.split("x"))
    tier = "512" if longest <= 640 else "1K" if longest <= 1536 else "2K" if longest <= 3072 else "4K"
    return f"--aspect {aspect} --image-size {tier}"


def _none_for(what: str) -> Hint:
    def hint(value: Any, family: str) -> str:
        return f"{FAMILY_LABELS.get(family, family)} has no {what} option; drop it"
    return hint


def _size_instead(value: Any, family: str) -> str:
    return f"for {FAMILY_LABELS.get(family, family)} use {gemini_shape_for(value)}"


def _aspect_instead(value: Any, family: str) -> str:
    return f"for {FAMILY_LABELS.get(family, family)} use --size {openai_size_for(value)}"


def _image_size_instead(value: Any, family: str) -> str:
    return (f"for {FAMILY_LABELS.get(family, family)} use --size (1024x1024, 1536x1024, 1024x1536, or WxH such "
            "as 2048x2048 on newer models)")


def _quality_instead(value: Any, family: str) -> str:
    return f"{FAMILY_LABELS.get(family, family)} has no quality option; for more pixels use --image-size 2K or 4K"


def _background_mode_instead(value: Any, family: str) -> str:
    if family in IMAGES_API:
        responses = family.removesuffix("-images")
        return f"the Images API answers each request at once; drop it, or use -p {responses} (the Responses API)"
    return _none_for("background-response")(value, family)


def _image_deployment_instead(value: Any, family: str) -> str:
    if family == "azure-images":
        return f"the Images API's model is the image deployment: use -m {value}"
    return _none_for("image-deployment")(value, family)


def _modalities_instead(value: Any, family: str) -> str:
    return f"{FAMILY_LABELS.get(family, family)} always answers with text and the image tool; drop it"


_TOOL_DOCS = "https://platform.openai.com/docs/guides/tools-image-generation"
_BACKGROUND_DOCS = "https://platform.openai.com/docs/guides/background"
_FOUNDRY_DOCS = "https://learn.microsoft.com/azure/ai-foundry/agents/how-to/tools/image-generation"
_GEMINI_DOCS = "https://ai.google.dev/gemini-api/docs/image-generation"

OPTIONS: tuple[Option, ...] = (
    Option("model", ("-m", "--model"), EVERY_PROVIDER, "config.model",
           "model or deployment name (default: the provider's default)", metavar="MODEL"),
    Option("project_endpoint", ("--project-endpoint",), ("foundry",), "config.project_endpoint",
           "the project endpoint", metavar="URL", example="https://<resource>.services.ai.azure.com/api/projects/<p>",
           check=lambda value: _checked("--project-endpoint", check_project_endpoint, value), source=_FOUNDRY_DOCS),
    Option("agent_name", ("--agent",), ("foundry",), "config.agent_name",
           "the agent's name (with -m DEPLOYMENT nbimagine creates or reuses a version with the image options; "
           "without -m the agent is used as it is)", metavar="NAME", label="Agent", example="agent name",
           check=lambda value: _checked("--agent", _agent_name, value), source=_FOUNDRY_DOCS),
    Option("agent_version", ("--agent-version",), ("foundry",), "config.agent_version",
           "use this version of the agent (default: the latest)", metavar="V", example="latest",
           source=_FOUNDRY_DOCS),
    Option("image_deployment", ("--image-deployment",), ("azure", "foundry"), "config.image_deployment",
           "the gpt-image deployment", metavar="D", example="gpt-image-1", instead=_image_deployment_instead,
           source=_FOUNDRY_DOCS),
    Option("size", ("--size",), OPENAI_IMAGE, "ImageGenerationTool.size", "image size",
           choices=STANDARD_SIZES, free_form="WxH (multiples of 16, up to 3840, at most 3:1)", check=_check_size,
           instead=_size_instead, source=_TOOL_DOCS),
    Option("quality", ("--quality",), OPENAI_IMAGE, "ImageGenerationTool.quality", "rendering quality",
           choices=QUALITIES, instead=_quality_instead, source=_TOOL_DOCS),
    Option("background", ("--background",), OPENAI_IMAGE, "ImageGenerationTool.background", "background",
           choices=BACKGROUNDS, instead=_none_for("background"), source=_TOOL_DOCS),
    Option("output_format", ("--format",), OPENAI_IMAGE, "ImageGenerationTool.output_format", "file format",
           choices=OUTPUT_FORMATS, check=_check_format, instead=_none_for("output format"), label="Format",
           source=_TOOL_DOCS),
    Option("output_compression", ("--compression",), OPENAI_IMAGE, "ImageGenerationTool.output_compression",
           "jpeg/webp compression", bounds=(0, 100), kind=int, metavar="0-100", label="Compression",
           instead=_none_for("compression"), source=_TOOL_DOCS),
    Option("partial_images", ("--partial",), OPENAI_IMAGE, "ImageGenerationTool.partial_images",
           "stream N partial images while the image renders", bounds=(0, 3), kind=int, default=0, metavar="N",
           instead=_none_for("partial-images"), source=_TOOL_DOCS),
    Option("moderation", ("--moderation",), OPENAI_IMAGE, "ImageGenerationTool.moderation", "moderation strictness",
           choices=MODERATIONS, instead=_none_for("moderation"), source=_TOOL_DOCS),
    Option("input_fidelity", ("--fidelity",), OPENAI_IMAGE, "ImageGenerationTool.input_fidelity",
           "how closely an edit keeps its input", choices=INPUT_FIDELITIES, instead=_none_for("input fidelity"),
           source=_TOOL_DOCS),
    Option("background_mode", ("--background-mode",), IMAGE_TOOL, "config.background",
           "run as a background response: its status is shown while queued and in progress, Ctrl-C cancels it "
           "on the server", kind=bool, default=False, metavar="on|off", label="Background response",
           instead=_background_mode_instead, source=_BACKGROUND_DOCS),
    Option("aspect_ratio", ("--aspect",), IMAGE_CONFIG, "ImageConfig.aspect_ratio", "aspect ratio",
           choices=GEMINI_ASPECT_RATIOS, instead=_aspect_instead, source=_GEMINI_DOCS),
    Option("image_size", ("--image-size",), IMAGE_CONFIG, "ImageConfig.image_size", "resolution tier",
           choices=GEMINI_IMAGE_SIZES, check=_check_image_size, instead=_image_size_instead, source=_GEMINI_DOCS),
    Option("response_modalities", ("--modalities",), IMAGE_CONFIG, "GenerateContentConfig.response_modalities",
           "what the model may answer with, comma-separated", choices=tuple(m for m in GEMINI_MODALITIES
                                                                           if m != "AUDIO"),
           kind=list, default=["TEXT", "IMAGE"], metavar="TEXT,IMAGE", instead=_modalities_instead,
           source=_GEMINI_DOCS),
    Option("max_retries", ("--retries",), EVERY_PROVIDER, "config.max_retries",
           "how often the SDK retries a rate limit (429) or server error (5xx) before giving up (default 2)",
           bounds=(0, 10), kind=int, metavar="N", unset="default (2)"),
    # Image sets (nbimagine.generate_many / submit_batch): how a set runs, never sent to the provider.
    Option("each", ("--each",), EVERY_PROVIDER, "set.each",
           "an image set: one prompt per line of the cell, generated now, concurrently", kind=bool, default=False,
           scope="cell"),
    Option("batch", ("--batch",), EVERY_PROVIDER, "set.batch",
           "send the cell's prompts (one per line) to the provider's batch engine: about half price, results "
           "within 24 h; %imagine jobs follows the job, even after a restart", kind=bool, default=False,
           scope="cell", excludes=("each", "edit", "ref", "mask", "no_history", "concurrency", "rate_limit"),
           why="the provider's batch engine runs text prompts, one per line, at its own pace, and their results "
               "are collected into the history (--each runs the set now)",
           source="https://platform.openai.com/docs/guides/batch"),
    Option("concurrency", ("--concurrency",), EVERY_PROVIDER, "set.concurrency",
           "with --each: requests in flight at once; a 429 is waited out by all", bounds=(1, 64), kind=int,
           default=4, metavar="N", scope="set", needs=("each",)),
    Option("rate_limit", ("--rate-limit",), EVERY_PROVIDER, "set.rate_limit",
           "with --each: your requests-per-minute limit, so that the set is paced from its first request "
           "(default: learnt from the provider's answers)", bounds=(1, 100_000), kind=int, metavar="RPM",
           scope="set", needs=("each",), unset="learnt", label="Rate limit (/min)", example="e.g. 60",
           source="https://platform.openai.com/docs/guides/rate-limits"),
)

_BY_NAME = {opt.name: opt for opt in OPTIONS}
# The rows that are session options (traits, %config, %imagine use, the panel): all but the cell modes.
SETTINGS: tuple[Option, ...] = tuple(opt for opt in OPTIONS if opt.scope != "cell")


def option(name: str) -> Option:
    """The row of ``name`` (``KeyError`` if there is none)."""
    return _BY_NAME[name]


def options_for(family: str) -> tuple[Option, ...]:
    """The session options that apply with a provider of this family, in table order."""
    return tuple(opt for opt in SETTINGS if opt.applies(family))


def active(values: dict[str, Any], family: str) -> dict[str, Any]:
    """The subset of ``values`` (option name -> value) that applies with a provider of ``family``."""
    return {name: value for name, value in values.items() if name in _BY_NAME and _BY_NAME[name].applies(family)}


def sent(values: dict[str, Any], family: str) -> dict[str, Any]:
    """The subset of ``values`` that a provider of ``family`` is sent (not how a set runs)."""
    return {name: value for name, value in active(values, family).items() if _BY_NAME[name].scope == "provider"}

"""The emulator's fault registry: every way it can misbehave on purpose, by name, with a description.

A fault is chosen with ``Emulator.inject(NAME)`` (the next request(s) take it), with a ``[fault:NAME]``
token in the prompt, or with ``%imagine emulator fault NAME`` in a notebook. ``[error:NNN]`` is short for
``http`` with that status. Names are strict: an unknown name, or a fault of one vendor asked of the other,
is an error (``ValueError`` from ``inject``, an HTTP 400 in the vendor's envelope for a prompt token),
never a silent no-op.

Some faults take an argument, written ``NAME:ARG`` (or ``NAME-ARG``): ``http:503``,
``finish:IMAGE_OTHER``, ``prompt_blocked:MODEL_ARMOR``.

Every fault family is one row in :data:`_TABLE` (name, routes, argument, description), or is described
where it is made and registered from there (hostile images, background and batch jobs). A row names the
*routes* that act on it (:data:`ROUTES`: the Responses API, background responses, the Images API, ...);
a request takes only an injected fault its route acts on (the others wait for theirs), and a prompt token
naming a fault its route does not act on is refused like an unknown name. So a fault is never silently
swallowed by a request that cannot show it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

__all__ = ["ROUTES", "FaultKind", "UnknownFaultError", "fault_kinds", "parse_fault", "register_fault"]

FAMILIES = ("openai", "gemini", "foundry")  # foundry: the project management routes (agents)
_BOTH = ("openai", "gemini")

# route -> (the vendor families it serves, what it is). Every request the emulator answers belongs to one.
ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "responses": (("openai",), "the Responses API (OpenAI, Azure, Foundry's OpenAI routes)"),
    "background": (("openai",), "a background response (POST .../responses with background=true)"),
    "retrieve": (("openai",), "a background response's resumed stream (GET .../responses/{id}?stream=true)"),
    "poll": (("openai",), "a background response's status poll (GET .../responses/{id})"),
    "images": (("openai",), "the Images API (images/generations, images/edits)"),
    "chat": (("openai",), "chat completions"),
    "gemini": (("gemini",), "generateContent / streamGenerateContent (Gemini, Vertex)"),
    "batch": (_BOTH, "a batch job (OpenAI Batch API, Gemini batchGenerateContent)"),
    "foundry": (("foundry",), "Foundry's project management routes (agents)"),
}


class UnknownFaultError(ValueError):
    """A fault name the registry does not know, or one that does not apply to the vendor or route asked."""


@dataclass(frozen=True)
class FaultKind:
    name: str
    description: str
    routes: tuple[str, ...]  # the routes that act on it (keys of ROUTES)
    # What the argument is ("STATUS", "REASON"), or None when the fault takes none.
    argument: str | None = None
    argument_required: bool = False

    @property
    def families(self) -> tuple[str, ...]:
        """The vendor families of its routes, in :data:`FAMILIES` order."""
        return tuple(f for f in FAMILIES if any(f in ROUTES[r][0] for r in self.routes))

    def usage(self) -> str:
        if self.argument is None:
            return self.name
        return f"{self.name}:{self.argument}" if self.argument_required else f"{self.name}[:{self.argument}]"


_REGISTRY: dict[str, FaultKind] = {}


def register_fault(name: str, description: str, *, routes: tuple[str, ...], argument: str | None = None,
                   argument_required: bool = False) -> FaultKind:
    """Add a fault family acted on by ``routes`` (keys of :data:`ROUTES`); idempotent for the same
    definition, a different one under a used name raises ``ValueError``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"fault names are lower_snake_case, not {name!r}")
    unknown = set(routes) - set(ROUTES)
    if unknown or not routes:
        raise ValueError(f"fault routes must be among {tuple(ROUTES)}, not {routes!r}")
    kind = FaultKind(name, description, tuple(routes), argument, argument_required)
    existing = _REGISTRY.get(name)
    if existing is not None and existing != kind:
        raise ValueError(f"fault {name!r} is already registered differently")
    _REGISTRY[name] = kind
    return kind


def fault_kinds(family: str | None = None) -> list[FaultKind]:
    """Every registered fault (of one vendor family when given), sorted by name."""
    _register_more()
    return sorted((k for k in _REGISTRY.values() if family is None or family in k.families), key=lambda k: k.name)


def parse_fault(spec: str, family: str | None = None, route: str | None = None) -> tuple[FaultKind, str | None]:
    """``"finish:IMAGE_OTHER"`` -> (the ``finish`` kind, ``"IMAGE_OTHER"``).

    Raises :class:`UnknownFaultError` for an unknown name, a missing or unexpected argument, or a fault
    that does not exist for ``family`` or that ``route`` does not act on.
    """
    _register_more()
    spec = spec.strip()
    kind = _REGISTRY.get(spec)
    argument: str | None = None
    if kind is None:
        match = re.fullmatch(r"([a-z][a-z0-9_]*)[:\-](.+)", spec)
        if match and match[1] in _REGISTRY:
            kind, argument = _REGISTRY[match[1]], match[2]
    if kind is None:
        close = difflib.get_close_matches(spec.split(":")[0], list(_REGISTRY), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UnknownFaultError(
            f"The emulator has no fault {spec!r}.{hint} Known faults: {', '.join(k.usage() for k in fault_kinds())}"
            " (list them with %imagine emulator faults, or nbimagine.emulator.fault_kinds())."
        )
    if argument is not None and kind.argument is None:
        raise UnknownFaultError(f"The emulator fault {kind.name!r} takes no argument (got {spec!r}).")
    if argument is None and kind.argument_required:
        raise UnknownFaultError(f"The emulator fault {kind.name!r} needs an argument: {kind.usage()}.")
    if family is not None and family not in kind.families:
        raise UnknownFaultError(
            f"The emulator fault {kind.name!r} exists for {' and '.join(kind.families)} only, not {family}."
        )
    if route is not None and route not in kind.routes:
        raise UnknownFaultError(
            f"The emulator fault {kind.name!r} does not apply to {ROUTES[route][1]}; it applies to "
            f"{'; '.join(ROUTES[r][1] for r in kind.routes)}."
        )
    return kind, argument


# Routes acting on a fault, by kind of answer. A background response is the Responses API's answer made on
# the emulator's clock, so what changes a Responses answer changes it too.
_RESPONSES = ("responses", "background")
_HTTP = ("responses", "background", "retrieve", "poll", "images", "chat", "gemini", "foundry")
_IMAGES = ("responses", "background", "images", "gemini")  # routes answering with image bytes

# One row per fault family: name, routes, argument, description.
_TABLE: list[tuple[str, tuple[str, ...], str | None, str]] = [
    ("http", _HTTP, "STATUS",
     "Answer with HTTP STATUS in the vendor's error envelope (inject(..., status=) or [error:NNN]); 429 and 5xx "
     "carry retry hints."),
    ("broken_stream", ("responses", "background", "retrieve", "images", "chat", "gemini"), None,
     "Drop the connection mid-answer (after the first events of a stream, or half a JSON body)."),
    ("stream_error", (*_RESPONSES, "gemini"), None,
     "An error inside the stream: OpenAI's flat 'error' event then response.failed (a failed response without "
     "streaming); Gemini's {\"error\": ...} chunk."),
    ("undecodable", _IMAGES, None, "The image bytes are not an image."),
    ("text_only", (*_RESPONSES, "gemini"), None, "Answer with text and no image, as a model that chose not to draw."),
    ("mime_mismatch", _IMAGES, None,
     "The declared media type differs from the bytes (OpenAI output_format / Gemini inlineData.mimeType say "
     "one format, the bytes are another)."),
    ("large_image", _IMAGES, None,
     "An image as large on the wire as a real 4K photo (several MB of high-entropy pixels)."),
    ("no_usage", _IMAGES, None,
     "The answer reports no token usage at all (usage / usageMetadata missing), as some proxies and "
     "OpenAI-compatible gateways send: the client cannot price it."),
    # OpenAI
    ("moderation", (*_RESPONSES, "images"), None,
     "HTTP 400 moderation_blocked (image_generation_user_error) with moderation_details, before any output."),
    ("image_moderation", _RESPONSES, None,
     "The last image_generation_call fails with error.code moderation_blocked (earlier images survive)."),
    ("image_failed", _RESPONSES, None,
     "The last image_generation_call fails with error.code server_error (earlier images survive)."),
    ("stream_error_nested", _RESPONSES, None,
     "The live API's nested in-stream error {\"type\": \"error\", \"error\": {...}} (the SDK raises APIError), "
     "then response.failed."),
    ("generating_result", _RESPONSES, None,
     "The image_generation_call item keeps status 'generating' although it carries the full result."),
    ("no_completed", _RESPONSES, None,
     "The stream ends cleanly after the image without response.completed (JSON: status in_progress)."),
    ("incomplete", _RESPONSES, "REASON",
     "The response ends with status 'incomplete' and incomplete_details.reason REASON (default "
     "max_output_tokens; content_filter is a policy stop), without an image."),
    ("refusal", _RESPONSES, None, "The model refuses: a message whose content is a 'refusal' part, no image."),
    ("empty_data", ("images",), None,
     "An Images API answer without any image and without an error: data is [] (streamed: the completed events "
     "carry an empty b64_json), as gateways in front of the API have answered."),
    # Gemini / Vertex
    ("finish", ("gemini",), "REASON!",
     "The candidate ends with finishReason REASON (any name, also one the SDK does not know yet) and a "
     "finishMessage; no image unless REASON is STOP or MAX_TOKENS."),
    ("prompt_blocked", ("gemini",), "REASON",
     "No candidates: promptFeedback.blockReason REASON (default PROHIBITED_CONTENT) with blockReasonMessage."),
    ("no_image", ("gemini",), None, "finishReason NO_IMAGE with its finishMessage, no image and no text."),
    ("image_safety", ("gemini",), None, "finishReason IMAGE_SAFETY with its finishMessage."),
    ("image_prohibited_content", ("gemini",), None, "finishReason IMAGE_PROHIBITED_CONTENT with its finishMessage."),
    ("image_recitation", ("gemini",), None, "finishReason IMAGE_RECITATION with its finishMessage."),
    ("image_other", ("gemini",), None, "finishReason IMAGE_OTHER with its finishMessage."),
    ("safety", ("gemini",), None, "finishReason SAFETY with its finishMessage."),
    ("prohibited_content", ("gemini",), None, "finishReason PROHIBITED_CONTENT with its finishMessage."),
    ("blocklist", ("gemini",), None, "finishReason BLOCKLIST with its finishMessage."),
    ("spii", ("gemini",), None, "finishReason SPII with its finishMessage."),
    ("recitation", ("gemini",), None, "finishReason RECITATION with its finishMessage."),
    ("model_armor", ("gemini",), None, "finishReason MODEL_ARMOR (Vertex Model Armor) with its finishMessage."),
    ("urlsafe_base64", ("gemini",), None, "Image data in the URL-safe base64 alphabet, as pydantic writes it."),
]


def _more_rows() -> list[tuple[str, tuple[str, ...], str]]:
    """Fault families described where they are made (imported late: those modules import the server)."""
    from ._background import BACKGROUND_FAULTS  # background responses (OpenAI-family routes)
    from ._batch import BATCH_FAULTS  # batch jobs (both vendors' Batch APIs)
    from ._hostile import HOSTILE_IMAGES, MALFORMED_STREAMS  # what a provider or a broken proxy may hand back

    rows = [(name, _IMAGES, text) for name, text in HOSTILE_IMAGES.items()]
    rows += [(name, (*_RESPONSES, "images"), text) for name, text in MALFORMED_STREAMS.items()]
    rows += [(name, ("background",), text) for name, text in BACKGROUND_FAULTS.items()]
    rows += [(name, ("batch",), text) for name, text in BATCH_FAULTS.items()]
    return [(name, routes, text[0].upper() + text[1:] + ".") for name, routes, text in rows]


for _name, _routes, _argument, _description in _TABLE:
    register_fault(_name, _description, routes=_routes,
                   argument=_argument.rstrip("!") if _argument else None,
                   argument_required=bool(_argument and _argument.endswith("!")))
_more_registered = False


def _register_more() -> None:
    global _more_registered
    if not _more_registered:
        _more_registered = True
        for name, routes, description in _more_rows():
            register_fault(name, description, routes=routes)

"""``Agent`` and ``Reply``: the provider-independent core."""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from .config import ProviderConfig
from .errors import ConfigError, ImagineError, InputError
from .events import BinaryResult, ImageInput, ReplyEvent, StreamEvent, check_text

if TYPE_CHECKING:
    from ._cost import Cost, Usage
    from ._providers._base import Input, Provider, Turn

__all__ = ["Agent", "Reply"]


class Reply:
    """What an agent answered: ``body`` (text) and ``files`` (images, in order).

    ``usage`` is what the provider reported (:class:`~nbimagine.Usage`, ``None`` if it reported nothing);
    ``cost`` is its price (:class:`~nbimagine.Cost`: US dollars, source, simulated) or ``None`` when no price
    list knows the model. Each image's ``metadata["cost_usd"]`` is its share of ``cost``.
    """

    def __init__(
        self,
        *,
        body: str = "",
        files: Sequence[BinaryResult] = (),
        usage: Usage | None = None,
        cost: Cost | None = None,
        finish_reason: str | None = None,
        finish_message: str | None = None,
        response_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        history: Any = None,
    ) -> None:
        self.body = body
        self.files = list(files)
        self.usage = usage
        self.cost = cost
        self.finish_reason = finish_reason
        # The provider's explanation when the answer stopped short (Gemini's finishMessage, OpenAI's
        # incomplete_details); None for a normal answer.
        self.finish_message = finish_message
        self.response_id = response_id
        self.provider = provider
        self.model = model
        self._history = history
        self._agent: Agent | None = None

    async def ask(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = ()) -> Reply:
        """Continue the conversation this reply belongs to (same arguments as :meth:`Agent.ask`)."""
        return await self._owner().ask(*inputs, mask=mask, refs=refs, _history=self._history)

    def stream(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = ()) -> AsyncIterator[StreamEvent]:
        return self._owner().stream(*inputs, mask=mask, refs=refs, _history=self._history)

    def ask_sync(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = ()) -> Reply:
        return self._owner().ask_sync(*inputs, mask=mask, refs=refs, _history=self._history)

    def _owner(self) -> Agent:
        if self._agent is None:
            raise ConfigError("This reply was not produced by an Agent, so it cannot continue a conversation")
        return self._agent

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 60 else self.body[:57] + "..."
        cost = f", cost={self.cost}" if self.cost else ""
        return f"Reply(body={body!r}, files={self.files!r}, finish_reason={self.finish_reason!r}{cost})"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from ._display import reply_bundle

        return reply_bundle(self)


class Agent:
    """A named agent bound to one provider configuration and its tools.

    >>> agent = Agent("designer", config=OpenAIResponsesConfig(model="gpt-4.1"), tools=[ImageGenerationTool()])
    >>> reply = await agent.ask("Generate a logo for a coffee shop.")
    """

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        *,
        tools: Sequence[object] = (),
        instructions: str | None = None,
    ) -> None:
        if not isinstance(config, ProviderConfig):
            raise ConfigError(
                f"Agent config must be a provider config such as OpenAIResponsesConfig or GeminiConfig, "
                f"not {type(config).__name__}"
            )
        self.name = name
        self.config = config
        self.tools = list(tools)
        self.instructions = instructions
        self._provider = _load_provider(config, self.tools)
        from ._cost import warm_up

        warm_up()

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, config={self.config!r}, tools={self.tools!r})"

    async def ask(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = (), _history: Any = None) -> Reply:
        """Send the inputs (text, ``ImageInput``, ``BinaryResult``, bytes, paths, PIL images); return the reply.

        The first image is the one edited; ``refs`` are reference images sent after it (the same as
        passing them last). ``mask`` (any image kind) marks the region of the first image to change
        by its fully transparent pixels, or, black-and-white, by its white ones (converted, with an
        ``InputWarning``). It must be the size of the first image. OpenAI sends it as the image tool's
        ``input_image_mask`` or the Images API's ``mask``; Gemini has no mask parameter, so the mask is
        drawn on a copy of the image as a visible guide with an instruction, and the results say so
        (``metadata["mask"] == "guide"``). Bad inputs raise ``InputError`` before any request.
        """
        reply = None
        async with aclosing(self._events(inputs, refs, mask, _history, stream=False)) as events:
            async for event in events:
                if isinstance(event, ReplyEvent):
                    reply = event.reply
        assert reply is not None, "provider ended without a ReplyEvent"
        return reply

    async def stream(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = (),
                     _history: Any = None) -> AsyncIterator[StreamEvent]:
        """Yield ``PartialImageEvent``, ``TextDeltaEvent``, ``ImageEvent`` (and, for background responses,
        ``StatusEvent``) as they come, then one ``ReplyEvent``.

        Leaving the loop early (``break``, then ``aclose()``) ends the request at once: the HTTP stream
        is closed, and a background response is cancelled on the server.
        """
        async with aclosing(self._events(inputs, refs, mask, _history, stream=True)) as events:
            async for event in events:
                yield event

    def ask_sync(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = (), _history: Any = None) -> Reply:
        """Blocking ``ask`` for scripts and notebooks (works inside a running event loop; Ctrl-C cancels)."""
        from ._sync import run_sync

        return run_sync(self.ask(*inputs, mask=mask, refs=refs, _history=_history))

    async def _events(self, inputs: tuple[Any, ...], refs: Sequence[Any], mask: Any, history: Any, *,
                      stream: bool) -> AsyncIterator[StreamEvent]:
        from ._budget import guarded
        from .errors import ProviderError
        from .events import ImageEvent

        turn = self._turn(inputs, refs, mask, history, stream=stream)
        try:
            self._provider.check_credentials()
            # In a kernel with the extension loaded: the budgets are checked and held first (BudgetError), and
            # what the request cost is counted when it ends, however it ends.
            async with guarded(self, [*turn.inputs, *([turn.mask] if turn.mask is not None else [])]) as done:
                reply, made = None, 0
                try:
                    async with aclosing(self._provider.run(turn)) as events:
                        async for event in events:
                            if isinstance(event, ImageEvent):
                                made += 1
                            elif isinstance(event, ReplyEvent):
                                event.reply._agent = self
                                _attach_cost(event.reply, self._provider)
                                reply = event.reply
                                done(reply, len(reply.files))  # the answer is in: counted before the caller stops
                            yield event
                except ProviderError as exc:
                    made = max(made, len(exc.files))
                    raise
                finally:
                    done(reply, len(reply.files) if reply is not None else made)
        except ImagineError as exc:
            exc.detach()  # the SDK errors it was made from hold requests with credential headers
            raise

    def _turn(self, inputs: Sequence[Any], refs: Sequence[Any], mask: Any, history: Any, *, stream: bool) -> Turn:
        from ._providers._base import Turn

        if isinstance(refs, (str, bytes)) or not isinstance(refs, Sequence):
            raise InputError("refs= takes a list of images, e.g. refs=[logo, ImageInput(path='style.png')]")
        normalized = normalize_inputs([*inputs, *refs])
        if mask is not None:
            from ._masks import as_mask_input

            mask = as_mask_input(mask)
        return Turn(inputs=normalized, history=history, instructions=self.instructions, stream=stream, mask=mask)

    def dry_run(self, *inputs: Any, mask: Any = None, refs: Sequence[Any] = (), n: int = 1, stream: bool = False,
                _history: Any = None) -> DryRun:
        """What ``ask(*inputs, mask=, refs=)`` (``stream`` for ``stream()``) would send, and what ``n`` such
        requests would cost (:func:`~nbimagine.estimate`). Nothing is sent.

        The request is the one the provider's own code builds through the SDK, captured before it leaves
        (credentials masked, image data shortened). A missing key raises ``ConfigError`` as ``ask`` would.
        """
        from ._cost import estimate

        turn = self._turn(inputs, refs, mask, _history, stream=stream)
        self._provider.check_credentials()
        request = self._provider.describe_request(turn)
        images = [*turn.inputs, *([turn.mask] if turn.mask is not None else [])]
        return DryRun(request, estimate(self.config, tools=self.tools, inputs=images, n=n))


class DryRun:
    """``Agent.dry_run``'s answer: ``request`` (method, url, headers, json; secrets masked) and ``estimate``."""

    def __init__(self, request: dict[str, Any], estimate: Any) -> None:
        self.request = request
        self.estimate = estimate

    def __repr__(self) -> str:
        return f"DryRun({self.request.get('method')} {self.request.get('url')}, estimate={self.estimate})"

    def _repr_markdown_(self) -> str:
        import json

        body = json.dumps(self.request, indent=2, ensure_ascii=False)
        return f"{self.estimate._repr_markdown_()}\n\n**Request (not sent)**\n\n```json\n{body}\n```"


def _attach_cost(reply: Reply, provider: Provider[Any], *, batch: bool = False) -> None:
    """Price the reply (a batch job's line at the batch price) and stamp each image with its share. A pricing
    failure never costs the images."""
    try:
        reply.cost = provider.cost(reply)
        if batch and reply.cost is not None:
            from ._cost import batch_priced

            reply.cost = batch_priced(reply.cost)
    except Exception as exc:  # a price list problem must not lose a paid answer
        import warnings

        from .errors import ImagineWarning

        warnings.warn(f"nbimagine could not price this reply (its images are fine): {exc!r}", ImagineWarning,
                      stacklevel=3)
        return
    cost = reply.cost
    if cost is not None and reply.files:
        stamp = {"cost_usd": cost.usd / len(reply.files)}
        if cost.simulated:
            stamp["cost_simulated"] = True
        if cost.estimated:
            stamp["cost_estimated"] = True
        reply.files = [BinaryResult(f.data, {**f.metadata, **stamp}) for f in reply.files]


def _load_provider(config: ProviderConfig, tools: list[object]) -> Provider[Any]:
    module_name, _, class_name = config._implementation.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config, tools)


def normalize_inputs(inputs: Sequence[Any]) -> list[Input]:
    """Turn everything ``ask`` accepts into ``str`` and ``ImageInput``; raise ``InputError`` otherwise."""
    if not inputs:
        raise InputError("ask() needs at least one input: a prompt string and/or images")
    normalized: list[Input] = []
    for item in inputs:
        if isinstance(item, str):
            normalized.append(check_text(item))
        elif isinstance(item, ImageInput):
            normalized.append(item)
        elif isinstance(item, BinaryResult):
            normalized.append(ImageInput.from_result(item))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            normalized.append(ImageInput(data=bytes(item)))
        elif isinstance(item, os.PathLike):
            normalized.append(ImageInput(path=item))
        elif type(item).__module__.startswith("PIL."):
            normalized.append(ImageInput(data=_pil_to_png(item)))
        else:
            raise InputError(
                f"Cannot send a {type(item).__name__} to a model; use text, ImageInput, BinaryResult, bytes, "
                "a pathlib.Path or a PIL image"
            )
    return normalized


def _pil_to_png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

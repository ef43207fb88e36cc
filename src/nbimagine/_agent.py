"""``Agent`` and ``Reply``: the provider-independent core."""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from .config import ProviderConfig
from .errors import ConfigError, InputError
from .events import BinaryResult, ImageInput, ReplyEvent, StreamEvent, check_text

if TYPE_CHECKING:
    from ._providers._base import Input, Provider

__all__ = ["Agent", "Reply"]


class Reply:
    """What an agent answered: ``body`` (text) and ``files`` (images, in order)."""

    def __init__(
        self,
        *,
        body: str = "",
        files: Sequence[BinaryResult] = (),
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        response_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        history: Any = None,
    ) -> None:
        self.body = body
        self.files = list(files)
        self.usage = usage
        self.finish_reason = finish_reason
        self.response_id = response_id
        self.provider = provider
        self.model = model
        self._history = history
        self._agent: Agent | None = None

    async def ask(self, *inputs: Any) -> Reply:
        """Continue the conversation this reply belongs to."""
        return await self._owner().ask(*inputs, _history=self._history)

    def stream(self, *inputs: Any) -> AsyncIterator[StreamEvent]:
        return self._owner().stream(*inputs, _history=self._history)

    def ask_sync(self, *inputs: Any) -> Reply:
        return self._owner().ask_sync(*inputs, _history=self._history)

    def _owner(self) -> Agent:
        if self._agent is None:
            raise ConfigError("This reply was not produced by an Agent, so it cannot continue a conversation")
        return self._agent

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 60 else self.body[:57] + "..."
        return f"Reply(body={body!r}, files={self.files!r}, finish_reason={self.finish_reason!r})"

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

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, config={self.config!r}, tools={self.tools!r})"

    async def ask(self, *inputs: Any, _history: Any = None) -> Reply:
        """Send the inputs (text, ``ImageInput``, ``BinaryResult``, bytes, paths, PIL images); return the reply."""
        reply = None
        async for event in self._events(inputs, _history, stream=False):
            if isinstance(event, ReplyEvent):
                reply = event.reply
        assert reply is not None, "provider ended without a ReplyEvent"
        return reply

    async def stream(self, *inputs: Any, _history: Any = None) -> AsyncIterator[StreamEvent]:
        """Yield ``PartialImageEvent``, ``TextDeltaEvent`` and ``ImageEvent`` as they come, then one ``ReplyEvent``."""
        async for event in self._events(inputs, _history, stream=True):
            yield event

    def ask_sync(self, *inputs: Any, _history: Any = None) -> Reply:
        """Blocking ``ask`` for scripts and notebooks (works inside a running event loop; Ctrl-C cancels)."""
        from ._sync import run_sync

        return run_sync(self.ask(*inputs, _history=_history))

    async def _events(self, inputs: tuple[Any, ...], history: Any, *, stream: bool) -> AsyncIterator[StreamEvent]:
        from ._providers._base import Turn

        turn = Turn(inputs=normalize_inputs(inputs), history=history, instructions=self.instructions, stream=stream)
        self._provider.check_credentials()
        async for event in self._provider.run(turn):
            if isinstance(event, ReplyEvent):
                event.reply._agent = self
            yield event


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

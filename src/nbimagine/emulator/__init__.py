"""A loopback emulator of the OpenAI Responses (Azure, Foundry projects) and Gemini / Vertex image APIs.

The real ``openai`` and ``google-genai`` SDKs talk to it over HTTP on 127.0.0.1, so notebooks and tests
run without keys or network::

    from nbimagine.emulator import Emulator

    with Emulator() as emu:
        client = OpenAI(base_url=emu.openai_base_url, api_key="x")
        project = AIProjectClient(emu.foundry_endpoint, credential=EmulatorCredential())

Images are deterministic drawings of the prompt, marked "nbimagine emulator". Prompt tokens steer it:
``[images:N]`` (N image calls), ``[error:NNN]`` (HTTP error), ``[fault:NAME]`` (see ``Emulator.inject``;
hostile images such as ``truncated_png`` or ``bomb_png`` are listed in ``_hostile.HOSTILE_IMAGES``).
Standalone: ``python -m nbimagine.emulator --port 8765``.
"""

from __future__ import annotations

from ._foundry import EmulatorCredential
from ._server import Emulator, RecordedRequest

__all__ = ["Emulator", "EmulatorCredential", "RecordedRequest"]

"""A loopback emulator of the OpenAI Responses (Azure, Foundry projects) and Gemini / Vertex image APIs.

The real ``openai`` and ``google-genai`` SDKs talk to it over HTTP on 127.0.0.1, so notebooks and tests
run without keys or network::

    from nbimagine.emulator import Emulator

    with Emulator() as emu:
        client = OpenAI(base_url=emu.openai_base_url, api_key="x")
        project = AIProjectClient(emu.foundry_endpoint, credential=EmulatorCredential())

Images are drawings of the prompt, marked "nbimagine emulator". Prompt tokens steer it:
``[images:N]`` (N image calls), ``[error:NNN]`` (HTTP error), ``[fault:NAME]`` (a registered fault).
:func:`fault_kinds` lists the faults with their descriptions; ``Emulator.inject(NAME)`` applies one to the
next request(s); an unknown name is an error. In a notebook: ``%imagine emulator faults`` and
``%imagine emulator fault NAME``. Standalone: ``python -m nbimagine.emulator --port 8765`` (``--faults``
lists them).
"""

from __future__ import annotations

from ._faults import FaultKind, UnknownFaultError, fault_kinds, register_fault
from ._foundry import EmulatorCredential
from ._server import Emulator, RecordedRequest

__all__ = ["Emulator", "EmulatorCredential", "FaultKind", "RecordedRequest", "UnknownFaultError", "fault_kinds",
           "register_fault"]

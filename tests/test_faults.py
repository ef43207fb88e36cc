"""The emulator's fault registry: discoverable, strict, and every registered fault really does something."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from IPython.core.error import UsageError
from openai import OpenAI

from nbimagine.emulator import Emulator, UnknownFaultError, fault_kinds

SMALL = {"type": "image_generation", "size": "256x256"}
# Arguments for the faults that need one in the table-driven test.
ARGS = {"http": ":503", "finish": ":IMAGE_OTHER"}


def _raw(emu: Emulator, family: str, prompt: str, *, stream: bool = False) -> str:
    """The emulator's raw answer to a small request, with per-request ids removed (or the failure)."""
    if family == "openai":
        url = emu.openai_base_url + "/responses"
        body: dict[str, Any] = {"model": "gpt-5", "input": prompt, "tools": [{**SMALL, "partial_images": 1}],
                                "stream": stream}
        headers = {"authorization": "Bearer sk-test"}
    else:
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        url = f"{emu.gemini_base_url}/v1beta/models/gemini-2.5-flash-image:{method}"
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                "generationConfig": {"imageConfig": {"aspectRatio": "1:1"}}}
        headers = {"x-goog-api-key": "test-key"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except Exception as exc:  # a dropped connection
        return f"broken: {type(exc).__name__}"
    text = re.sub(r'"(?:resp|ig|msg)_[0-9a-f]+"', '"ID"', text)
    text = re.sub(r'"(?:responseId|created_at|completed_at|createTime)":\s*"?[^",}]*"?', '"T"', text)
    return text


# Faults of background jobs and of Foundry's management routes act on requests these raw calls do not make;
# tests/test_background.py and tests/test_foundry.py drive them.
OTHER_ROUTES = {"background_failed", "background_cancelled", "background_result_missing"}


@pytest.mark.parametrize(("family", "name"), [(f, k.name) for k in fault_kinds() for f in k.families
                                              if f in ("openai", "gemini") and k.name not in OTHER_ROUTES])
def test_every_registered_fault_changes_the_answer(emu: Emulator, family: str, name: str) -> None:
    spec = name + ARGS.get(name, "")
    normal = [_raw(emu, family, "a lighthouse", stream=s) for s in (False, True)]
    faulty = []
    for stream in (False, True):
        emu.reset()  # the same variant of the drawing as the normal answer
        emu.inject(spec, family=family)
        faulty.append(_raw(emu, family, "a lighthouse", stream=stream))
        if stream is False:
            emu.reset()
            assert _raw(emu, family, "a lighthouse") == normal[0]  # deterministic after a reset
    assert any(f != n for f, n in zip(faulty, normal, strict=True)), f"{spec} did nothing on {family}"
    assert not emu.state.pending_faults()
    # The same fault named by a prompt token: the answer is the injected one, not a drawing of the token.
    emu.reset()
    emu.inject(spec, family=family)
    injected = _raw(emu, family, f"a lighthouse [fault:{spec}]")
    emu.reset()
    assert _raw(emu, family, f"a lighthouse [fault:{spec}]") == injected


def test_registry_lists_every_fault_with_a_description() -> None:
    kinds = fault_kinds()
    assert len({k.name for k in kinds}) == len(kinds) >= 25
    assert all(len(k.description) > 20 and k.families for k in kinds)
    assert {k.name for k in fault_kinds("openai")} >= {"http", "moderation", "image_moderation", "generating_result",
                                                        "no_completed", "stream_error_nested", "mime_mismatch"}
    assert {k.name for k in fault_kinds("gemini")} >= {"finish", "prompt_blocked", "no_image", "model_armor"}
    listed = subprocess.run([sys.executable, "-m", "nbimagine.emulator", "--faults"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert all(k.name in listed for k in kinds) and "finish:REASON" in listed


@pytest.mark.parametrize(("spec", "fragment"), [
    ("modaration", "Did you mean moderation"),
    ("no_such_fault", "Known faults"),
    ("finish", "needs an argument: finish:REASON"),
    ("moderation:LOUD", "takes no argument"),
    ("http:abc", "numeric status"),
])
def test_inject_refuses_unknown_faults(emu: Emulator, spec: str, fragment: str) -> None:
    with pytest.raises(UnknownFaultError, match=fragment):
        emu.inject(spec)
    with pytest.raises(ValueError):  # UnknownFaultError is a ValueError
        emu.inject(spec)
    assert not emu.state.pending_faults()


def test_inject_refuses_a_fault_of_the_other_vendor(emu: Emulator) -> None:
    with pytest.raises(UnknownFaultError, match="exists for gemini only"):
        emu.inject("prompt_blocked", family="openai")
    with pytest.raises(UnknownFaultError, match="exists for openai only"):
        emu.inject("gemini:image_moderation")


def test_one_vendor_fault_waits_for_its_vendor(emu: Emulator) -> None:
    emu.inject("prompt_blocked")  # Gemini only: an OpenAI request does not consume it
    client = OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
    assert client.responses.create(model="m", input="x", tools=[SMALL]).output[0].result
    assert emu.state.pending_faults() == [("prompt_blocked", "gemini", 1)]


def test_unknown_fault_token_is_a_400_in_each_vendor_envelope_and_nothing_is_drawn(emu: Emulator) -> None:
    client = OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="a cat [fault:nope]", tools=[SMALL])
    assert info.value.code == "unknown_fault" and "no fault 'nope'" in info.value.message
    with pytest.raises(openai.BadRequestError, match="exists for gemini only"):
        client.responses.create(model="m", input="a cat [fault:prompt_blocked]", tools=[SMALL])
    gclient = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.gemini_base_url,
                                                                       api_version="v1beta"))
    with pytest.raises(genai_errors.ClientError) as ginfo:
        gclient.models.generate_content(model="gemini-2.5-flash-image", contents="a cat [fault:nope]")
    assert ginfo.value.code == 400 and ginfo.value.status == "INVALID_ARGUMENT" and "nope" in ginfo.value.message


def test_magic_lists_and_arms_faults(emu: Emulator, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from nbimagine._session import get_session, set_emulator

    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    if "imagine" not in shell.magics_manager.magics["cell"]:
        shell.run_line_magic("load_ext", "nbimagine")
    session = get_session()
    set_emulator(emu)
    try:
        session.use(emulator=False)
        with pytest.raises(UsageError, match="emulator is off"):
            shell.run_line_magic("imagine", "emulator fault moderation")
        session.use(emulator=True)
        listing = shell.run_line_magic("imagine", "emulator faults")
        assert all(k.name in repr(listing) for k in fault_kinds())
        assert "<table>" in listing._repr_html_()
        with pytest.raises(UsageError, match="Did you mean moderation"):
            shell.run_line_magic("imagine", "emulator fault modaration")
        shell.run_line_magic("imagine", "emulator fault http --status 503 --times 2")
        assert emu.state.pending_faults() == [("http", None, 2)]
    finally:
        session.use(emulator=False)
        set_emulator(None)

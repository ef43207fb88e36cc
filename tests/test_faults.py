"""The emulator's fault registry: discoverable, strict, and every registered fault really does something."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from IPython.core.error import UsageError
from openai import APIConnectionError, OpenAI

from nbimagine.emulator import Emulator, UnknownFaultError, fault_kinds
from nbimagine.emulator._faults import ROUTES

SMALL = {"type": "image_generation", "size": "256x256"}
# Arguments for the faults that need one in the table-driven test.
ARGS = {"http": ":503", "finish": ":IMAGE_OTHER"}
# The routes whose requests carry a prompt (a [fault:NAME] token can name a fault there).
PROMPTED = ("responses", "background", "images", "chat", "gemini")
_TERMINAL = ("completed", "failed", "expired", "cancelled", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED",
             "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, *,
          raw: bool = False) -> str:
    """The answer, with per-request ids and clocks removed unless ``raw`` (or the failure)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except Exception as exc:  # a dropped connection
        return f"broken: {type(exc).__name__}"
    return text if raw else _http_clean(text)


def _http_clean(text: str) -> str:
    text = re.sub(r'"(?:resp|ig|msg|chatcmpl)[_-][0-9A-Za-z]+"', '"ID"', text)
    return re.sub(r'"(?:responseId|created_at|completed_at|createTime|created)":\s*"?[^",}]*"?', '"T"', text)


_OPENAI = {"authorization": "Bearer sk-test"}


def _responses_body(prompt: str, stream: bool, **more: Any) -> dict[str, Any]:
    return {"model": "gpt-5", "input": prompt, "tools": [{**SMALL, "partial_images": 1}], "stream": stream, **more}


def _until_done(get: Any) -> Any:
    deadline = time.monotonic() + 120
    while (status := get())[0] not in _TERMINAL:
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    return status


def _answer(emu: Emulator, route: str, family: str, prompt: str, stream: bool, arm: Any) -> str:
    """The emulator's answer to a small request on ``route``; ``arm()`` injects the fault at the moment
    that route's request would take it."""
    base = emu.openai_base_url
    if route == "responses":
        arm()
        return _http("POST", base + "/responses", _responses_body(prompt, stream), _OPENAI)
    if route in ("background", "retrieve", "poll"):
        emu.state.background_duration = 0.05
        if route == "background":
            arm()
        created = _http("POST", base + "/responses", _responses_body(prompt, stream and route == "background",
                                                                      background=True), _OPENAI, raw=True)
        if (stream and route == "background") or created.startswith(("HTTP", "broken")):
            return _http_clean(created)
        resp_id = json.loads(created)["id"]
        if route in ("retrieve", "poll"):
            arm()
        if route == "poll":
            return _http("GET", f"{base}/responses/{resp_id}", headers=_OPENAI)
        events = _http("GET", f"{base}/responses/{resp_id}?stream=true", headers=_OPENAI)  # waits for the end
        if route == "retrieve":
            return events
        return _http_clean(created) + _http("GET", f"{base}/responses/{resp_id}", headers=_OPENAI)
    if route == "images":
        arm()
        body = {"model": "gpt-image-2", "prompt": prompt, "size": "256x256", "stream": stream,
                **({"partial_images": 1} if stream else {})}
        return _http("POST", base + "/images/generations", body, _OPENAI)
    if route == "chat":
        arm()
        body = {"model": "gpt-5", "messages": [{"role": "user", "content": prompt}], "stream": stream}
        return _http("POST", base + "/chat/completions", body, _OPENAI)
    if route == "gemini":
        arm()
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                "generationConfig": {"imageConfig": {"aspectRatio": "1:1"}}}
        return _http("POST", f"{emu.gemini_base_url}/v1beta/models/gemini-2.5-flash-image:{method}", body,
                     {"x-goog-api-key": "test-key"})
    if route == "foundry":
        arm()
        return _http("GET", emu.foundry_endpoint + "/agents?api-version=v1", headers=_OPENAI)
    assert route == "batch", route
    emu.batch_time = 0.05
    arm()
    if family == "openai":
        client = OpenAI(base_url=base, api_key="k", max_retries=0)
        line = {"custom_id": "0", "method": "POST", "url": "/v1/responses", "body": _responses_body(prompt, False)}
        file = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
        try:
            batch = client.batches.create(input_file_id=file.id, endpoint="/v1/responses", completion_window="24h")
        except APIConnectionError:  # batch_create_lost: made, but its answer dropped
            return "creation answer lost"
        status, counts = _until_done(lambda: (lambda b: (b.status, b.request_counts))(
            client.batches.retrieve(batch.id)))
        return f"{status} {counts}"
    gclient = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.gemini_base_url,
                                                                       api_version="v1beta"))
    try:
        job = gclient.batches.create(model="gemini-2.5-flash-image",
                                     src=[{"contents": [{"role": "user", "parts": [{"text": prompt}]}]}])
    except httpx2.HTTPError:  # batch_create_lost (google-genai lets the transport's error through)
        return "creation answer lost"
    state, stats = _until_done(lambda: (lambda j: (str(getattr(j.state, "value", j.state)), j.completion_stats))(
        gclient.batches.get(name=job.name)))
    return f"{state} {stats}"


def _streams(route: str) -> tuple[bool, ...]:
    return {"retrieve": (True,), "batch": (False,), "foundry": (False,)}.get(route, (False, True))


CASES = [(route, family, kind.name) for kind in fault_kinds() for route in kind.routes
         for family in ROUTES[route][0]]


@pytest.mark.parametrize(("route", "family", "name"), CASES)
def test_every_registered_fault_changes_the_answer_on_every_route_it_names(emu: Emulator, route: str, family: str,
                                                                           name: str) -> None:
    spec = name + ARGS.get(name, "")
    normal, faulty = [], []
    for stream in _streams(route):
        emu.reset()  # the same variant of the drawing in both answers
        normal.append(_answer(emu, route, family, "a lighthouse", stream, lambda: None))
        emu.reset()
        faulty.append(_answer(emu, route, family, "a lighthouse", stream, lambda: emu.inject(spec, family=family)))
        assert not emu.state.pending_faults(), f"{spec} was not taken by a {route} request"
    assert any(f != n for f, n in zip(faulty, normal, strict=True)), f"{spec} did nothing on {route} ({family})"
    if route in PROMPTED:
        # The same fault named by a prompt token: the answer is the injected one, not a drawing of the token.
        emu.reset()
        injected = _answer(emu, route, family, f"a lighthouse [fault:{spec}]", False,
                           lambda: emu.inject(spec, family=family))
        emu.reset()
        assert _answer(emu, route, family, f"a lighthouse [fault:{spec}]", False, lambda: None) == injected


def test_a_fault_is_never_swallowed_by_a_route_that_does_not_act_on_it(emu: Emulator) -> None:
    """Injected: it waits for a request of a route that acts on it. Named in a prompt: HTTP 400."""
    checked = 0
    for kind in fault_kinds():
        spec = kind.name + ARGS.get(kind.name, "")
        for route in PROMPTED:
            family = ROUTES[route][0][0]
            if route in kind.routes or family not in kind.families:
                continue
            emu.reset()
            emu.inject(spec, family=family)
            normal = _answer(emu, route, family, "a lighthouse", False, lambda: None)
            assert not normal.startswith(("HTTP", "broken")), (kind.name, route, normal)
            assert emu.state.pending_faults(), f"{spec} was swallowed by a {route} request"
            emu.reset()
            assert _answer(emu, route, family, f"a lighthouse [fault:{spec}]", False, lambda: None) == "HTTP 400"
            checked += 1
    assert checked >= 30


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


def test_magic_lists_and_arms_faults(emu: Emulator, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
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
        capsys.readouterr()
        shell.run_line_magic("imagine", "emulator fault refusal")  # says which requests will take it
        assert "the Responses API" in capsys.readouterr().out
        listing = shell.run_line_magic("imagine", "emulator faults")
        assert "Armed, waiting for a request they apply to: http x2, refusal (openai) x1" in repr(listing)
    finally:
        session.use(emulator=False)
        set_emulator(None)

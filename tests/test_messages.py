"""The wording of what the notebook says: one line, what happened and what to do, the error type once,
true causes, retries visible. Real shell, real SDKs, the real emulator over HTTP."""

from __future__ import annotations

import socket

import pytest
from IPython.core.error import UsageError

from nbimagine._session import get_session
from nbimagine.errors import ProviderError


def texts(shell) -> list[str]:
    return [out["data"].get("text/plain", "") for out in shell.display_pub.outputs]


def shown_lines(capsys) -> list[str]:
    printed = capsys.readouterr()
    return [line for line in (printed.out + printed.err).splitlines() if line.strip()]


# Every provider family of the notebook; Foundry asks its agent through the project's OpenAI route, whose
# faults are the openai family's (the emulator's "foundry" faults are its management routes').
FAMILIES = ["openai", "azure", "foundry", "gemini", "vertex"]


def use(ip, family: str) -> str:
    """Switch the session to ``family``; returns the emulator fault family of its requests."""
    if family == "foundry":
        ip.run_line_magic("imagine", "use foundry --agent painter -m gpt-4.1")
    else:
        ip.run_line_magic("imagine", f"use {family}")
    return family if family in ("gemini", "vertex") else "openai"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_retried_server_error_is_visible_in_the_progress_slot(ip, emu, family):
    faults = use(ip, family)
    emu.inject(f"{faults}:http" if faults != "vertex" else "http", status=503, times=1, retry_after=0.01)
    ip.run_cell_magic("imagine", "--no-history -o r", "a cat")
    assert ip.user_ns["r"].files  # the retry succeeded
    progress = [t for t in texts(ip) if "retrying" in t]
    assert progress and "retrying (1/2) after HTTP 503" in progress[0]


def test_rate_limit_advice_names_what_the_cell_can_change(ip, emu, capsys):
    emu.inject("http", status=429, times=3, retry_after=0.01)
    result = ip.run_cell("%%imagine --no-history\na cat")
    error = result.error_in_exec
    assert isinstance(error, ProviderError) and error.status == 429
    assert "--retries" in str(error) and "max_retries" not in str(error)
    lines = shown_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("ProviderError: [openai, HTTP 429")
    # The retries happened and were shown.
    assert any("retrying (2/2) after HTTP 429" in t for t in texts(ip))


def test_the_error_type_appears_once(ip, emu, capsys):
    emu.inject("http", status=500, times=3, retry_after=0.01)
    result = ip.run_cell("%%imagine --no-history\na cat")
    assert isinstance(result.error_in_exec, ProviderError)
    final = texts(ip)[-1]
    assert "Failed after" in final and "ProviderError" not in final
    lines = shown_lines(capsys)
    assert len(lines) == 1 and lines[0].count("ProviderError") == 1
    assert "try again" in lines[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_broken_stream_is_a_dropped_connection_not_an_unreachable_api(ip, emu, family):
    faults = use(ip, family)
    get_session().use(max_retries=0)
    emu.inject(f"{faults}:broken_stream" if faults != "vertex" else "broken_stream", times=1)
    with pytest.raises(ProviderError) as info:
        ip.run_cell_magic("imagine", "--no-history", "a cat")
    message = str(info.value)
    assert "dropped mid-answer" in message and "Could not reach" not in message


def test_an_unreachable_api_says_so(ip):
    from nbimagine._session import set_emulator
    from nbimagine.emulator import Emulator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    class Nowhere:
        openai_base_url = f"http://127.0.0.1:{port}/v1"

    set_emulator(Nowhere())  # type: ignore[arg-type]
    try:
        get_session().use(max_retries=0)
        with pytest.raises(ProviderError, match="Could not reach the API"):
            ip.run_cell_magic("imagine", "--no-history", "a cat")
    finally:
        set_emulator(None)
    assert Emulator  # the real one is restored by the fixture


def test_missing_key_is_one_usage_error_with_the_advice_once(ip, emu, capsys, fresh_history):
    ip.run_line_magic("imagine", "history --notebook messages")  # no "cannot tell which notebook" notice
    capsys.readouterr()
    get_session().use(emulator=False)
    result = ip.run_cell("%%imagine\na cat")
    error = result.error_in_exec
    assert isinstance(error, UsageError)
    message = str(error)
    assert message.count("getpass.getpass()") == 1 and "OPENAI_API_KEY" in message and "emulator on" in message
    assert "%env" not in message.replace("not %env", "")
    assert ip.display_pub.outputs == []  # no progress slot, no "ConfigError" header above it
    assert shown_lines(capsys) == [f"UsageError: {message}"]
    assert not emu.requests


def test_show_last_puts_each_caption_line_on_its_own_line(ip):
    from IPython.display import display

    ip.run_cell_magic("imagine", "", "a cat")
    before = len(ip.display_pub.outputs)
    display(ip.run_line_magic("imagine", "show last"))
    image, caption = ip.display_pub.outputs[before:]
    assert "image/jpeg" in image["data"] or "image/png" in image["data"]
    html = caption["data"]["text/html"]
    assert "<br/>revised prompt: a cat" in html and "<br/>prompt: a cat" in html


def test_an_edit_caption_names_its_source(ip):
    ip.run_cell_magic("imagine", "-o first", "a cat")
    first = ip.user_ns["first"].files[0].metadata["history_id"]
    ip.run_cell_magic("imagine", "-e last", "give it a hat")
    captions = [out["data"].get("text/html", "") for out in ip.display_pub.outputs[-3:]]
    assert any(f"edited from #{first}" in caption for caption in captions)

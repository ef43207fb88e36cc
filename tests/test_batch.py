"""Image sets: the emulator's Files / Batches routes and rate-limit mode through the real SDKs,
``generate_many`` under the shared limiter, ``submit_batch`` / ``BatchJob`` and the job table.

Everything runs over HTTP against the real emulator; histories live in ``tmp_path``. No test waits
for a fixed time: batch jobs are polled until they end (the emulator's ``batch_time`` is small).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time

import pytest

import nbimagine
from nbimagine._history import History
from nbimagine._session import get_session
from nbimagine.config import (
    AzureOpenAIImagesConfig,
    AzureOpenAIResponsesConfig,
    GeminiConfig,
    OpenAIImagesConfig,
    OpenAIResponsesConfig,
    VertexAIConfig,
)
from nbimagine.errors import BatchError, ConfigError, ContentPolicyError, ProviderError
from nbimagine.tools import ImageGenerationTool

TERMINAL = {"completed", "failed", "expired", "cancelled"}


# Rate limits learnt in one test must not pace the next one (conftest also gives the `session` fixture).
pytestmark = pytest.mark.usefixtures("no_learnt_limits")


def openai_client(emu):
    from openai import OpenAI

    return OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)


def gemini_client(emu):
    from google import genai
    from google.genai import types

    return genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.gemini_base_url,
                                                                     api_version="v1beta", retry_options=None))


def line(custom_id, prompt, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": {
        "model": "gpt-4.1", "input": prompt, "tools": [{"type": "image_generation", "size": "256x256"}],
        "tool_choice": {"type": "image_generation"}, **body}})


def upload(client, lines):
    return client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")


def until_done(get, *, seen=None, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        item = get()
        if seen is not None:
            seen.append(item)
        state = getattr(item, "status", None) or getattr(item, "state", None)
        if str(state) in TERMINAL or getattr(item, "done", False):
            return item
        assert time.monotonic() < deadline, f"still {state}"
        time.sleep(0.02)


# --- emulator: OpenAI Files + Batches --------------------------------------------------------------


def test_openai_batch_runs_through_its_states_with_output_and_error_files(emu):
    emu.batch_time = 0.3
    client = openai_client(emu)
    file = upload(client, [line("a", "a fox"), line("b", "a whale [error:400]"), line("c", "a tree")])
    assert file.purpose == "batch" and file.bytes > 0 and client.files.retrieve(file.id).id == file.id
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/responses", completion_window="24h",
                                  metadata={"set": "1"})
    assert batch.status == "validating" and batch.request_counts.total == 3 and batch.metadata == {"set": "1"}
    seen: list = []
    batch = until_done(lambda: client.batches.retrieve(batch.id), seen=seen)
    states = [b.status for b in seen]
    assert states.index("in_progress") < states.index("finalizing") < states.index("completed")
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 1
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["a", "c"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    assert out[0]["response"]["body"]["output"][0]["type"] == "image_generation_call"
    err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(r["custom_id"], r["response"]["status_code"]) for r in err] == [("b", 400)]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list()]


@pytest.mark.parametrize(("setup", "state", "code"), [
    ("cancel", "cancelled", "batch_cancelled"),
    ("expiry", "expired", "batch_expired"),
    ("fault", "expired", "batch_expired"),
])
def test_openai_batch_cancel_and_expiry_keep_the_lines_done(emu, setup, state, code):
    client = openai_client(emu)
    emu.batch_time = 1.0
    if setup == "expiry":
        emu.batch_expiry = 0.0  # expires at once, nothing done
    if setup == "fault":
        emu.inject("batch_expired")
    file = upload(client, [line(str(i), f"prompt {i}") for i in range(4)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/responses", completion_window="24h")
    if setup == "cancel":
        deadline = time.monotonic() + 30
        while client.batches.retrieve(batch.id).request_counts.completed < 1:  # one line done, then cancel
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
    batch = until_done(lambda: client.batches.retrieve(batch.id))
    assert batch.status == state
    err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert err and all(r["error"]["code"] == code and r["response"] is None for r in err)
    done = batch.request_counts.completed
    if setup == "fault":
        assert done == 2
    if done:
        assert len(client.files.content(batch.output_file_id).text.splitlines()) == done
    with pytest.raises(Exception) as info:
        client.batches.cancel(batch.id)
    assert getattr(info.value, "status_code", None) == 409


@pytest.mark.parametrize(("make", "status", "fragment"), [
    (lambda c, f: c.batches.create(input_file_id=f, endpoint="/v1/responses", completion_window="1h"), 400, "24h"),
    (lambda c, f: c.batches.create(input_file_id=f, endpoint="/v1/nope", completion_window="24h"), 400, "endpoint"),
    (lambda c, f: c.batches.create(input_file_id="file-missing", endpoint="/v1/responses",
                                   completion_window="24h"), 404, "No such File"),
    (lambda c, f: c.batches.retrieve("batch_missing"), 404, "batch_missing"),
    (lambda c, f: c.files.create(file=("x.jsonl", b"not json\n"), purpose="batch"), 400, "Line 1"),
    (lambda c, f: c.files.create(file=("x.jsonl", b"{}"), purpose="nonsense"), 400, "purpose"),
])
def test_openai_batch_rejects_what_the_api_rejects(emu, make, status, fragment):
    client = openai_client(emu)
    file = upload(client, [line("a", "x")])
    with pytest.raises(Exception) as info:
        make(client, file.id)
    assert info.value.status_code == status
    assert fragment in str(info.value) or getattr(info.value, "param", None) == fragment


def test_openai_batch_input_with_a_bad_line_fails_validation(emu):
    client = openai_client(emu)
    bad = json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    file = upload(client, [line("a", "x"), line("a", "duplicate"), bad])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/responses", completion_window="24h")
    assert batch.status == "failed"
    assert {e.code for e in batch.errors.data} == {"duplicate_custom_id", "mismatched_endpoint"}
    emu.inject("batch_failed")
    batch = client.batches.create(input_file_id=upload(client, [line("a", "x")]).id, endpoint="/v1/responses",
                                  completion_window="24h")
    assert until_done(lambda: client.batches.retrieve(batch.id)).status == "failed"


# --- emulator: Gemini ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["inline", "file"])
def test_gemini_batch_inline_and_file(emu, source):
    import io

    client = gemini_client(emu)
    requests = [{"contents": [{"parts": [{"text": p}], "role": "user"}]} for p in ("a cat", "a dog [error:500]")]
    if source == "inline":
        src: object = [{**r, "config": {"image_config": {"image_size": "512"}}} for r in requests]
    else:
        data = "".join(json.dumps({"key": f"k{i}", "request": r}) + "\n" for i, r in enumerate(requests))
        src = client.files.upload(file=io.BytesIO(data.encode()), config={"mime_type": "application/jsonl"}).name
    job = client.batches.create(model="gemini-3.1-flash-image", src=src, config={"display_name": "set"})
    assert job.name.startswith("batches/") and job.state.name == "JOB_STATE_PENDING" and job.display_name == "set"
    seen: list = []
    job = until_done(lambda: client.batches.get(name=job.name), seen=seen)
    assert "JOB_STATE_RUNNING" in {j.state.name for j in seen} and job.state.name == "JOB_STATE_SUCCEEDED"
    if source == "inline":
        results = [(r.response is not None, r.error) for r in job.dest.inlined_responses]
        assert results[0] == (True, None) and results[1][1].code == 500
    else:
        rows = [json.loads(x) for x in client.files.download(file=job.dest.file_name).splitlines()]
        assert [r["key"] for r in rows] == ["k0", "k1"]
        assert "response" in rows[0] and rows[1]["error"]["code"] == 500
    assert job.name in [j.name for j in client.batches.list()]


def test_gemini_batch_cancel(emu):
    client = gemini_client(emu)
    emu.batch_time = 2.0
    job = client.batches.create(model="gemini-3.1-flash-image",
                                src=[{"contents": [{"parts": [{"text": f"p{i}"}]}]} for i in range(3)])
    client.batches.cancel(name=job.name)
    assert until_done(lambda: client.batches.get(name=job.name)).state.name == "JOB_STATE_CANCELLED"
    with pytest.raises(Exception) as info:
        client.batches.get(name="batches/missing")
    assert info.value.code == 404


# --- emulator: rate-limit mode and what the errors carry ---------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_rate_limit_answers_429_with_the_wait_and_the_limit(session, emu, provider):
    from nbimagine._agent import Agent

    emu.rate_limit = 6  # one request per 10 s: the second one is refused however slow the first was
    if provider == "openai":
        agent = Agent("a", OpenAIResponsesConfig(model="gpt-4.1", base_url=emu.openai_base_url, api_key="k",
                                                 max_retries=0), tools=[ImageGenerationTool(size="256x256")])
    else:
        agent = Agent("a", GeminiConfig(model="gemini-3.1-flash-image", base_url=emu.gemini_base_url, api_key="k",
                                        max_retries=0))
    agent.ask_sync("first")
    with pytest.raises(ProviderError) as info:
        agent.ask_sync("second")
    assert info.value.status == 429
    assert 0 < info.value.retry_after <= 10.0 and info.value.rate_limit == 6
    assert emu.rate_stats == {"accepted": 1, "rejected": 1, "rejected_again": 0}


# --- prompts ---------------------------------------------------------------------------------------


def _series(kind):
    if kind == "pandas":
        import pandas as pd

        return pd.DataFrame({"prompt": ["a cat", "a dog"]})["prompt"]
    import polars as pl

    return pl.DataFrame({"prompt": ["a cat", "a dog"]})["prompt"]


@pytest.mark.parametrize("kind", ["list", "tuple", "generator", "pandas", "polars"])
def test_prompts_from_any_iterable_or_a_dataframe_column(kind):
    from nbimagine._many import as_prompts

    given = {"list": ["a cat", "a dog"], "tuple": ("a cat", "a dog"), "generator": (p for p in ["a cat", "a dog"])}
    assert as_prompts(given[kind] if kind in given else _series(kind)) == ["a cat", "a dog"]


@pytest.mark.parametrize(("bad", "fragment"), [
    ("a cat", "not one string"),
    (["a cat", None], "prompt 1 is missing"),
    (["a cat", float("nan")], "prompt 1 is missing"),
    (["a cat", 3], "prompt 1 is a int"),
    (["a cat", "  "], "prompt 1 is empty"),
    ([], "no prompts"),
    (42, "list of strings"),
    ("dataframe", "one column"),
])
def test_bad_prompts_are_a_config_error_before_any_request(session, emu, bad, fragment):
    if bad == "dataframe":
        import pandas as pd

        bad = pd.DataFrame({"prompt": ["a"]})
    for call in (nbimagine.generate_many, nbimagine.submit_batch):
        with pytest.raises(ConfigError, match=fragment):
            call(bad)
    assert not emu.requests


# --- generate_many -----------------------------------------------------------------------------------


def test_generate_many_keeps_successes_lists_failures_and_records_each(session, emu):
    result = nbimagine.generate_many(["a fox", "a whale [error:400]", "a tree [fault:image_moderation]", "a cloud"],
                                     size="256x256", progress=False)
    assert [r.ok for r in result] == [True, False, False, True]
    assert isinstance(result[2].error, ContentPolicyError) and result[1].error.status == 400
    assert len(result.files) == 2 and [e.prompt for e in result.entries] == ["a fox", "a cloud"]
    history = nbimagine.history()
    assert len(history) == 2 and history[-1].params["size"] == "256x256"
    text = repr(result)
    assert "2 of 4 prompt(s) done" in text and "[1] 'a whale [error:400]'" in text and "[2]" in text
    assert "<img" in result._repr_mimebundle_()["text/html"]


def test_generate_many_with_a_config_and_variants(session, emu, tmp_path):
    config = GeminiConfig(model="gemini-3.1-flash-image", base_url=emu.gemini_base_url, api_key="k",
                          image_config={"image_size": "512"})
    history = History(tmp_path, "other")
    result = nbimagine.generate_many(_series("polars"), config=config, n=2, history=history, progress=False)
    assert [len(r.files) for r in result] == [2, 2] and len(history) == 4
    assert history[0].provider == "gemini" and history[0].params == {"image_size": "512"}
    with pytest.raises(ConfigError, match="config"):
        nbimagine.generate_many(["x"], config=config, size="1024x1024")


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_generate_many_under_a_rate_limit_never_gets_a_request_rejected_twice(session, emu, provider):
    # The limit is unknown at first. OpenAI states it on every answer: the first request goes alone and its
    # headers pace the rest, so nothing is rejected. Gemini says it only in a 429: the first wave may be
    # rejected, once, and teaches the limiter the limit.
    emu.rate_limit = 120
    options = {"size": "256x256"} if provider == "openai" else {"provider": "gemini", "image_size": "512"}
    result = nbimagine.generate_many([f"cat {i}" for i in range(5)], concurrency=4, progress=False, **options)
    assert all(r.ok for r in result) and len(result.files) == 5
    stats = emu.rate_stats
    assert stats["accepted"] == 5 and stats["rejected_again"] == 0
    assert result.rejected == stats["rejected"]
    assert stats["rejected"] == 0 if provider == "openai" else stats["rejected"] >= 1
    assert result.rate_limit == 120 and "paced at 120 requests/min" in result.summary


def test_generate_many_with_a_known_rate_limit_paces_from_the_first_request(session, emu):
    from nbimagine._many import ManyRun, prepare_agent, run_with_progress

    emu.rate_limit = 120
    agent, params = prepare_agent(None, (), {"size": "256x256"}, session)
    run = ManyRun([f"dog {i}" for i in range(4)], agent=agent, params=params, n=1, overrides={"size": "256x256"},
                  record=False, history=None, concurrency=3, rate_limit=120)
    result = run_with_progress(run, progress=False)
    assert all(r.ok for r in result) and emu.rate_stats["rejected_again"] == 0
    # Spaced by the interval (0.5 s) from the first start, not learnt from a 429. (A request may still
    # arrive early by a loaded machine's jitter: then it is retried once, in the slot it missed.)
    assert len(run.limiter.starts) == 4 + run.limiter.retried
    firsts = [t for t, retry in run.limiter.starts if not retry]
    assert all(later - earlier >= 0.5 for earlier, later in itertools.pairwise(firsts))


# --- the limiter on its own: request callables that answer as a provider would, times from the loop ---


def _limited(retry_after, rate_limit=None):
    return ProviderError("Rate limit reached (test)", status=429, code="rate_limit_exceeded",
                         retry_after=retry_after, rate_limit=rate_limit)


def _drive(limiter, answers):
    """Run one ``limiter.call`` per list in ``answers`` concurrently; each call's attempts take their
    answer in order (an exception is raised, anything else returned). Returns the (loop time, call,
    attempt) of every attempt, in start order."""
    starts = []

    async def main():
        loop = asyncio.get_running_loop()

        async def one(index, script):
            attempt = 0

            async def request():
                nonlocal attempt
                starts.append((loop.time(), index, attempt))
                answer = script[min(attempt, len(script) - 1)]
                attempt += 1
                await asyncio.sleep(0)
                if isinstance(answer, BaseException):
                    raise answer
                return answer

            try:
                return await limiter.call(request)
            except ProviderError as exc:
                return exc

        return await asyncio.gather(*(one(i, script) for i, script in enumerate(answers)))

    return asyncio.run(main()), starts


def test_after_a_429_nobody_starts_before_the_wait_and_the_rejected_request_goes_first():
    from nbimagine._many import RateLimiter

    limiter = RateLimiter(concurrency=4)
    results, starts = _drive(limiter, [[_limited(0.3), "a"], ["b"], ["c"], ["d"], ["e"], ["f"]])
    assert results == ["a", "b", "c", "d", "e", "f"]
    rejected_at = next(t for t, index, attempt in starts if index == 0)
    after = [(t, index, attempt) for t, index, attempt in starts if t > rejected_at + 1e-3 or attempt]
    assert after[0][1:] == (0, 1)  # the retry first...
    assert all(t >= rejected_at + 0.3 for t, _, _ in after)  # ...and nobody before the provider's wait
    assert limiter.rejected == 1 and limiter.rejected_again == 0


def test_a_429_stating_the_limit_spaces_every_later_start():
    from nbimagine._many import RateLimiter

    limiter = RateLimiter(concurrency=8, key=("test", "limit", "model"))
    script = [[_limited(0.05, rate_limit=600), "ok"] if i else ["ok"] for i in range(5)]
    results, starts = _drive(limiter, script)
    assert results == ["ok"] * 5 and limiter.interval == pytest.approx(0.1)
    retries = sorted(t for t, _, attempt in starts if attempt)
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(retries))
    # Learnt for this provider, base URL and model: the next run paces from its first request.
    assert RateLimiter(concurrency=2, key=("test", "limit", "model")).interval == pytest.approx(0.1)
    assert RateLimiter(concurrency=2, key=("test", "limit", "other")).interval == 0


@pytest.mark.parametrize(("family", "stated"), [
    ("openai", {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": ("0", "1")}),
    ("azure", {"x-ratelimit-remaining-requests": ("0", "1")}),
    ("gemini", {}),
])
def test_every_answer_under_a_rate_limit_carries_the_headers_the_vendor_sends(emu, family, stated):
    """Real SDKs read the raw headers of successful answers: OpenAI all three, Azure the remaining count only,
    Gemini none (its limit comes with a 429)."""
    emu.rate_limit = 120
    if family == "gemini":
        import httpx  # google-genai keeps the headers of a successful answer to itself

        raw = httpx.post(f"{emu.gemini_base_url}/v1beta/models/gemini-3.1-flash-image:generateContent",
                         headers={"x-goog-api-key": "k"}, json={"contents": [{"parts": [{"text": "a cat"}]}]})
        headers = raw.headers
    else:
        from openai import AzureOpenAI

        client = openai_client(emu) if family == "openai" else AzureOpenAI(
            azure_endpoint=emu.azure_endpoint, api_key="k", api_version="2025-04-01-preview", max_retries=0)
        raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="a cat", size="1024x1024")
        headers = raw.headers
        assert raw.parse().data[0].b64_json
    assert raw.status_code == 200
    names = {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    for name in names:
        if name not in stated and not (family == "openai" and name == "x-ratelimit-reset-requests"):
            assert name not in headers
    for name, value in stated.items():
        assert headers[name] in (value if isinstance(value, tuple) else (value,))
    if family == "openai":
        assert headers["x-ratelimit-reset-requests"].endswith("ms")


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
      "x-ratelimit-reset-requests": "1s"}, (60.0, 59, 1.0)),
    ({"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-requests": "6m0s"}, (10000.0, 0, 360.0)),
    ({"x-ratelimit-reset-requests": "120ms"}, (None, None, 0.12)),
    ({"x-ratelimit-reset-requests": "1h2m3.5s"}, (None, None, 3723.5)),
    ({"x-ratelimit-remaining-requests": "3"}, (None, 3, None)),  # Azure
    ({"x-ratelimit-limit-requests": "abc", "x-ratelimit-reset-requests": "soon"}, None),
    ({}, None),
])
def test_rate_headers_are_read_as_openai_writes_them(headers, expected):
    from nbimagine._providers._base import rate_headers

    found = rate_headers(headers)
    assert (None if found is None else (found.limit, found.remaining, found.reset)) == expected


def test_answers_headers_pace_a_set_before_any_429():
    """The first request goes alone; its answer's headers (limit 600/min, none remaining for 0.05 s) set
    the schedule of the others."""
    from nbimagine._many import RateLimiter
    from nbimagine._providers._base import ON_RATE_HEADERS, RateHeaders

    limiter = RateLimiter(concurrency=4, key=("test", "headers", "model"), probe=True)
    starts = []

    async def main():
        loop = asyncio.get_running_loop()

        async def request():
            starts.append(loop.time())
            await asyncio.sleep(0.02)
            ON_RATE_HEADERS.get()(RateHeaders(limit=600, remaining=0, reset=0.05))  # as the SDK's hook does
            return "ok"

        return await asyncio.gather(*(limiter.call(request) for _ in range(5)))

    assert asyncio.run(main()) == ["ok"] * 5 and limiter.interval == pytest.approx(0.1)
    assert starts[1] - starts[0] >= 0.1  # nobody went with the first one
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(starts))
    assert RateLimiter(concurrency=2, key=("test", "headers", "model")).interval == pytest.approx(0.1)


def test_a_slow_first_answer_does_not_hold_the_set_back(monkeypatch):
    """The others wait for the first answer's headers a short while only (an image without streaming takes
    far longer): then they go, and the limit is learnt from whatever comes first."""
    from nbimagine import _many

    monkeypatch.setattr(_many, "_PROBE_WAIT", 0.05)
    limiter = _many.RateLimiter(concurrency=3, probe=True)
    events = []

    async def main():
        async def request(i):
            events.append(("start", i))
            await asyncio.sleep(0.3 if i == 0 else 0)  # both timers on one loop: the 0.05 s one fires first
            events.append(("end", i))
            return i

        return await asyncio.gather(*(limiter.call(lambda i=i: request(i)) for i in range(3)))

    assert asyncio.run(main()) == [0, 1, 2]
    assert events[0] == ("start", 0) and events.index(("start", 1)) < events.index(("end", 0))


@pytest.mark.parametrize(("error", "retried"), [
    (ProviderError("overloaded", status=503, retry_after=0.01), True),
    (ProviderError("timeout", status=408, retry_after=0.01), True),
    (ProviderError("bad request", status=400), False),
    (ContentPolicyError("blocked", reason="moderation_blocked", status=400), False),
    (ProviderError("failed after an image", status=500, files=[object()]), False),  # paid: never sent again
])
def test_what_the_limiter_retries(error, retried):
    from nbimagine._many import RateLimiter

    limiter = RateLimiter(concurrency=1)
    results, starts = _drive(limiter, [[error, "ok"]])
    assert results == (["ok"] if retried else [error]) and len(starts) == (2 if retried else 1)


def test_the_limiter_keeps_to_its_concurrency():
    from nbimagine._many import RateLimiter

    limiter = RateLimiter(concurrency=2)
    peak = 0

    async def main():
        async def request():
            nonlocal peak
            peak = max(peak, limiter.running)
            await asyncio.sleep(0.01)
            return "ok"

        return await asyncio.gather(*(limiter.call(request) for _ in range(6)))

    assert asyncio.run(main()) == ["ok"] * 6 and peak == 2


@pytest.mark.parametrize(("concurrency", "rate_limit"), [(0, None), (65, None), (True, None), (2.5, None),
                                                          (4, 0), (4, -1), (4, float("inf")), (4, "60"),
                                                          (4, 100_001)])
def test_limiter_arguments_are_checked(concurrency, rate_limit):
    from nbimagine._many import RateLimiter

    with pytest.raises(ConfigError):
        RateLimiter(concurrency, rate_limit)


@pytest.mark.parametrize(("failures", "options", "ok"), [
    (2, {}, True),  # as often as the SDK would have retried (max_retries defaults to 2)
    (3, {}, False),
    (3, {"max_retries": 3}, True),  # --retries / max_retries= raise it
])
def test_generate_many_retries_server_errors_as_often_as_the_sdk_would(session, emu, failures, options, ok):
    emu.inject("http", status=503, times=failures, retry_after=0.01)
    result = nbimagine.generate_many(["a lamp"], size="256x256", progress=False, **options)
    assert result[0].ok is ok
    posts = [r for r in emu.requests if r.method == "POST"]
    assert len(posts) == (failures + 1 if ok else failures)


def test_generate_many_missing_key_is_one_error(session, emu):
    session.use(emulator=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        nbimagine.generate_many(["a", "b"], progress=False)


# --- submit_batch / BatchJob ----------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_submit_batch_records_the_job_first_and_collects_exactly_once(session, emu, provider):
    options = {"size": "256x256"} if provider == "openai" else {"provider": "gemini", "image_size": "512"}
    job = nbimagine.submit_batch(["a red fox", "a whale [error:400]", "a green tree"], **options)
    history = nbimagine.history()
    record = history.job(job.id)
    assert record.total == 3 and record.job_id == job.id and record.state in ("validating", "in_progress")
    assert job.prompts == ["a red fox", "a whale [error:400]", "a green tree"]
    assert "api_key" not in json.dumps(dict(record.connection)) and "k" not in record.connection.get("fields", {})
    result = job.wait(progress=False, poll=0.02)
    assert [r.ok for r in result] == [True, False, True] and result[1].error.status == 400
    first = [e.id for e in result.entries]
    assert len(first) == 2 and len(history) == 2
    entry = history.get(first[0])
    assert entry.prompt == "a red fox" and entry.metadata["batch_id"] == job.id and entry.metadata["custom_id"] == "0"
    assert entry.params == ({"size": "256x256"} if provider == "openai" else {"image_size": "512"})
    again = job.results()
    assert [e.id for e in again.entries] == first and len(history) == 2
    assert history.job(job.id).state == "collected" and history.job(job.id).done == 2
    assert [j.id for j in nbimagine.jobs()] == [job.id]


def test_an_index_of_schema_3_gets_the_job_tables_and_keeps_its_images(tmp_path):
    import sqlite3

    from nbimagine.events import BinaryResult

    with History(tmp_path, "older") as history:
        history.add(BinaryResult(b"\x89PNG\r\n\x1a\n" + b"0" * 32, {}), prompt="kept")
    conn = sqlite3.connect(tmp_path / ".nbimagine" / "index.sqlite")
    conn.executescript("DROP TABLE job_lines; DROP TABLE jobs; PRAGMA user_version=3;")
    conn.close()
    with History(tmp_path, "older") as history:
        assert [e.prompt for e in history] == ["kept"] and history.jobs() == []
        history.add_job("0123456789ab", provider="openai", kind="openai", model="m", params={}, parents=(),
                        connection={"api_key": "sk-secret"}, lines=[("0", "a prompt")])
        assert history.job("0123").total == 1 and "api_key" not in history.job("last").connection
    conn = sqlite3.connect(tmp_path / ".nbimagine" / "index.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    conn.close()


@pytest.mark.parametrize("collected", [False, True])
def test_a_lost_index_is_repaired_with_its_jobs(session, emu, tmp_path, collected):
    from nbimagine._history import repair_history

    history = History(tmp_path, "jobs")
    job = nbimagine.submit_batch(["a pear", "a plum [error:400]", "a fig"], size="256x256", history=history)
    if collected:
        first = [e.id for e in job.wait(progress=False, poll=0.02).entries]
    history.close()
    index = tmp_path / ".nbimagine" / "index.sqlite"
    for extra in ("", "-wal", "-shm"):
        (tmp_path / ".nbimagine" / f"index.sqlite{extra}").unlink(missing_ok=True)
    assert not index.exists()
    report = repair_history(tmp_path)
    assert report.jobs == 1 and "1 batch job(s)" in str(report)
    with History(tmp_path, "jobs") as history:
        record = history.job(job.id)
        assert record.job_id == job.id and record.total == 3 and dict(record.params) == {"size": "256x256"}
        assert [line.prompt for line in history.job_lines(record.id)] == ["a pear", "a plum [error:400]", "a fig"]
        assert record.done == (2 if collected else 0)
        again = nbimagine.jobs(history)[0].wait(progress=False, poll=0.02)  # reached again, collected once
        assert [r.ok for r in again] == [True, False, True] and len(history) == 2
        if collected:
            assert [e.id for e in again.entries] == first


def test_jobs_follow_their_notebook_when_it_is_merged_into_another(tmp_path):
    from nbimagine._history import repair_history

    with History(tmp_path, "draft") as draft:
        draft.add_job("0123456789ab", provider="openai", kind="openai", model="m", params={}, parents=(),
                      connection={}, lines=[("0", "a prompt")])
    with History(tmp_path, "final") as final:
        final.merge("draft")
        assert [j.id for j in final.jobs()] == ["0123456789ab"] and final.job("last").notebook == "final"
    repair_history(tmp_path)  # the job record still names "draft"; the notebook records say where it went
    with History(tmp_path, "final") as final:
        assert [j.id for j in final.jobs()] == ["0123456789ab"]


def test_a_job_survives_a_kernel_restart_and_is_collected_once_across_processes(session, emu, tmp_path):
    emu.batch_time = 1.0
    job = nbimagine.submit_batch(["one", "two"], size="256x256")
    code = (
        "import nbimagine\n"
        "jobs = nbimagine.jobs()\n"
        "print(len(jobs), jobs[0].id)\n"
        "result = jobs[0].wait(progress=False, poll=0.05)\n"
        "print([e.id for e in result.entries])\n"
    )
    # A restarted kernel of the same notebook (Jupyter sets JPY_SESSION_NAME for each kernel it starts).
    env = {**os.environ, "NBIMAGINE_EMULATOR": emu.url, "JPY_SESSION_NAME": f"{nbimagine.history().notebook}.ipynb"}
    runs = [subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    outputs = [run.stdout.split("\n") for run in runs]
    assert outputs[0][0] == f"1 {job.id}"
    assert outputs[0][1] == outputs[1][1]  # the second process finds the same entries, adds none
    assert len(nbimagine.history()) == 2


@pytest.mark.parametrize(("how", "state"), [("cancel", "cancelled"), ("fault", "expired")])
def test_cancelled_or_expired_job_is_a_batch_error_with_what_was_made(session, emu, how, state):
    emu.batch_time = 1.0 if how == "cancel" else 0.2
    if how == "fault":
        emu.inject("batch_expired")
    job = nbimagine.submit_batch([f"p{i}" for i in range(4)], size="256x256")
    if how == "cancel":
        job.cancel()
    with pytest.raises(BatchError) as info:
        job.wait(progress=False, poll=0.02)
    error = info.value
    assert error.state == state and error.job_id == job.id and len(error.results) == 4
    assert all(r.error is not None for r in error.results.failures)
    assert len(error.files) == len(error.results.entries) == len(nbimagine.history())
    assert nbimagine.history().job(job.id).state == state


def test_results_of_a_running_job_say_to_wait(session, emu):
    emu.batch_time = 5.0
    job = nbimagine.submit_batch(["slow"], size="256x256")
    with pytest.raises(ConfigError, match="wait"):
        job.results()
    job.cancel()


def test_submit_batch_on_the_images_api(session, emu, tmp_path):
    # /v1/images/generations lines: the Images API's own parameters, its answers read as the SDK reads them.
    config = OpenAIImagesConfig(api_key="k", base_url=emu.openai_base_url, size="1024x1024", quality="low")
    history = History(tmp_path, "images")
    job = nbimagine.submit_batch(["a kite", "a boat [error:400]"], config=config, history=history)
    uploaded = next(r for r in emu.requests if r.path.endswith("/batches"))
    assert uploaded.json["endpoint"] == "/v1/images/generations"
    result = job.wait(progress=False, poll=0.02)
    assert [r.ok for r in result] == [True, False] and result[1].error.status == 400
    entry = history.get(result[0].entries[0].id)
    assert entry.prompt == "a kite" and entry.params == {"size": "1024x1024", "quality": "low"}
    assert entry.image.metadata["api"] == "images" and entry.image.metadata["batch_id"] == job.id


@pytest.mark.parametrize("config", [
    VertexAIConfig(model="gemini-3.1-flash-image", api_key="k"),
    AzureOpenAIResponsesConfig(model="gpt-4.1", api_key="k", azure_endpoint="https://x.example",
                               image_deployment="gpt-image-1"),
    AzureOpenAIImagesConfig("image-deploy", api_key="k", azure_endpoint="https://x.example"),
])
def test_providers_without_a_batch_path_refuse_before_any_request(session, emu, config, tmp_path):
    tools = [ImageGenerationTool()] if isinstance(config, OpenAIResponsesConfig) else []
    with pytest.raises(ConfigError, match="generate_many"):
        nbimagine.submit_batch(["x"], config=config, tools=tools)
    assert not emu.requests and nbimagine.history().jobs() == []


# --- the magic -------------------------------------------------------------------------------------


@pytest.fixture
def ip(session, emu, monkeypatch):
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    if "imagine" not in shell.magics_manager.magics["cell"]:
        shell.run_line_magic("load_ext", "nbimagine")
    publisher = CapturingDisplayPublisher()
    monkeypatch.setattr(shell, "display_pub", publisher)
    monkeypatch.setattr("nbimagine._many.ProgressBar.__init__", _quiet_bar)
    return shell


def _quiet_bar(self, total, *, enabled=True, desc="prompts"):
    self._bar = None  # tqdm writes to stderr in a plain shell; the widget is for kernels


def test_each_runs_one_prompt_per_line_and_lists_failures(ip, emu):
    from IPython.core.error import UsageError

    ip.user_ns["colour"] = "green"
    with pytest.raises(ProviderError, match="1 of 3 prompt"):
        ip.run_cell_magic("imagine", "--each --concurrency 2 --size 256x256 -o teapots",
                          "A red teapot\n\nA {colour} teapot\nA broken teapot [error:400]\n")
    teapots = ip.user_ns["teapots"]
    assert [r.prompt for r in teapots] == ["A red teapot", "A green teapot", "A broken teapot [error:400]"]
    assert len(nbimagine.history()) == 2
    shown = ip.display_pub.outputs[-1]["data"]
    assert "2 of 3 prompt(s) done" in shown["text/plain"] and "<img" in shown["text/html"]
    for line, fragment in [("--concurrency 2 --size 256x256", "--each"), ("--each --concurrency 0", "concurrency"),
                           ("--batch -e last", "cannot go with --batch")]:
        with pytest.raises(UsageError, match=fragment):
            ip.run_cell_magic("imagine", line, "a\nb")


def test_batch_magic_and_jobs_subcommands(ip, emu):
    from IPython.core.error import UsageError

    ip.run_cell_magic("imagine", "--batch --size 256x256 -o job", "A paper crane\nA paper boat\n")
    job = ip.user_ns["job"]
    assert "submitted" in ip.display_pub.outputs[-1]["data"]["text/plain"]
    listing = ip.run_line_magic("imagine", "jobs")
    assert job.id in repr(listing) and "2" in repr(listing)
    assert "Batch job" in repr(ip.run_line_magic("imagine", f"jobs status {job.id[:12]}"))
    result = ip.run_line_magic("imagine", "jobs wait")
    assert len(result.ok) == 2 and len(nbimagine.history()) == 2
    assert len(ip.run_line_magic("imagine", f"jobs results {job.id}").entries) == 2 and len(nbimagine.history()) == 2
    with pytest.raises(UsageError, match="no batch job"):
        ip.run_line_magic("imagine", "jobs wait nope")


# --- budgets and prices (issue 13) for sets ---------------------------------------------------------------


@pytest.fixture
def no_session_budget():
    session = get_session()
    session.budget_usd, session.spent_usd = None, 0.0
    yield session
    session.budget_usd, session.spent_usd = None, 0.0


@pytest.mark.parametrize("how", ["generate_many", "submit_batch", "--each", "--batch"])
def test_a_set_that_could_pass_the_budget_is_refused_before_any_request(ip, emu, no_session_budget, how):
    from IPython.core.error import UsageError

    from nbimagine._generate import Generation
    from nbimagine.errors import BudgetError

    prompts = ["a kite over the sea", "a boat", "a gull"]
    one = Generation(prompts[0], overrides={"quality": "low"}, record=False).estimate()
    # Enough for one prompt, not for three, nor for three at the batch price (half).
    nbimagine.history().set_budget(one.high_usd * 1.2)
    if how in ("generate_many", "submit_batch"):
        with pytest.raises(BudgetError, match="Not sent"):
            getattr(nbimagine, how)(prompts, quality="low", **({"progress": False} if how == "generate_many" else {}))
    else:
        with pytest.raises(UsageError, match="Not sent"):
            ip.run_cell_magic("imagine", f"{how} --quality low", "\n".join(prompts))
    assert emu.requests == [] and nbimagine.history().jobs() == []
    assert nbimagine.generate_many(prompts[:1], quality="low", progress=False)[0].ok  # one fits


def test_batch_images_cost_half_the_price_of_the_same_request_now(session, emu):
    options = {"quality": "low", "size": "1024x1024"}
    now = nbimagine.generate_many(["a paper lantern"], progress=False, **options).entries[0]
    later = nbimagine.submit_batch(["a paper lantern"], **options).wait(progress=False, poll=0.02).entries[0]
    assert now.metadata["cost_usd"] > 0
    assert later.metadata["cost_usd"] == pytest.approx(now.metadata["cost_usd"] / 2)


@pytest.mark.parametrize("mode", ["--each", "--batch"])
def test_a_dry_run_of_a_set_estimates_every_prompt_and_sends_nothing(ip, emu, mode):
    from nbimagine._generate import Generation

    result = ip.run_cell_magic("imagine", f"{mode} --dry-run -n 2 --quality low", "a kite\na much longer prompt")
    assert result is None and emu.requests == [] and nbimagine.history().jobs() == []
    text = ip.display_pub.outputs[-1]["data"]["text/plain"]
    whole = Generation("a much longer prompt", n=2, overrides={"quality": "low"}, record=False).estimate(
        count=2, batch=mode == "--batch")
    assert f"Estimate: {whole}" in text and "x4, one per prompt and variant" in text
    assert ("billed at half the price" in text) is (mode == "--batch")


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_batch_lines_with_bytes_that_are_not_an_image_keep_them(session, emu, provider):
    # As for one request (issue 10): bytes that are not an image are kept, recorded and named on the error.
    options = {"size": "256x256"} if provider == "openai" else {"provider": "gemini"}
    result = nbimagine.submit_batch(["a cup [fault:undecodable]", "a saucer"], **options).wait(progress=False,
                                                                                                poll=0.02)
    assert [r.ok for r in result] == [False, True]
    error = result[0].error
    assert isinstance(error, ProviderError) and error.code == "undecodable_image"
    assert len(result[0].entries) == 1 and result[0].entries[0].metadata.get("undecodable") is True

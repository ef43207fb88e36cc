"""Background responses (``background=True``) through the real ``openai`` SDK against the emulator.

The emulator runs each background job on its own clock (``background_duration``); nothing here
waits a fixed time: tests wait for an event or for a request to reach the emulator.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import warnings

import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from nbimagine import Agent
from nbimagine.config import AzureOpenAIResponsesConfig, OpenAIResponsesConfig
from nbimagine.errors import BackgroundResponseError, ConfigError, ContentPolicyError, ProviderError
from nbimagine.events import ImageEvent, PartialImageEvent, ReplyEvent, StatusEvent
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"


def config(emu, **changes: object) -> OpenAIResponsesConfig:
    base = {"model": "gpt-4.1", "api_key": KEY, "base_url": emu.openai_base_url, "background": True,
            "poll_interval": 0.05, "max_retries": 0}
    return OpenAIResponsesConfig(**{**base, **changes})


def azure_config(emu, **changes: object) -> AzureOpenAIResponsesConfig:
    base = {"model": "gpt-4.1", "api_key": KEY, "azure_endpoint": emu.azure_endpoint, "background": True,
            "poll_interval": 0.05, "max_retries": 0, "image_deployment": "gpt-image-1"}
    return AzureOpenAIResponsesConfig(**{**base, **changes})


def calls(emu, method: str, suffix: str = "") -> list:
    return [r for r in emu.requests if r.method == method and "/responses" in r.path and r.path.endswith(suffix)]


def sync_client(emu) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=KEY, base_url=emu.openai_base_url, max_retries=0)


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("background", "yes"), ("poll_interval", 0), ("poll_interval", -1),
                                          ("poll_interval", 61), ("poll_interval", True)])
def test_bad_background_settings_are_config_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        OpenAIResponsesConfig(model="gpt-4.1", **{field: value})


# --- polled to completion ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [config, azure_config], ids=["openai", "azure"])
async def test_background_ask_is_polled_to_completion(emu, make) -> None:
    emu.background_duration = 0.3
    agent = Agent("designer", config=make(emu), tools=[ImageGenerationTool(size="256x256")])

    reply = await agent.ask("A lighthouse at dusk")

    assert len(reply.files) == 1 and reply.files[0].media_type == "image/png"
    created = calls(emu, "POST")
    assert len(created) == 1 and created[0].json["background"] is True
    polls = calls(emu, "GET")
    assert polls and all(p.path.endswith(reply.response_id) for p in polls)
    assert not calls(emu, "POST", "/cancel")


async def test_background_status_events_queued_then_in_progress(emu) -> None:
    emu.background_duration = 0.4
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])

    events = [e async for e in agent.stream("A lighthouse at dusk")]

    statuses = [e for e in events if isinstance(e, StatusEvent)]
    assert [s.status for s in statuses][:2] == ["queued", "in_progress"]
    assert statuses[0].response_id and statuses[0].response_id.startswith("resp_")
    assert all(b.elapsed >= a.elapsed for a, b in itertools.pairwise(statuses))
    assert isinstance(events[-1], ReplyEvent) and len(events[-1].reply.files) == 1
    assert sum(isinstance(e, ImageEvent) for e in events) == 1


async def test_a_job_longer_than_the_client_timeout_survives(emu) -> None:
    # Each request is quick, so the job (1 s) may outlast the client's timeout (0.3 s), polled or streamed.
    emu.background_duration = 1.0
    for stream in (False, True):
        emu.reset()
        emu.background_duration = 1.0
        agent = Agent("designer", config=config(emu, timeout=0.3), tools=[ImageGenerationTool(size="256x256")])
        if stream:
            events = [e async for e in agent.stream("A slow picture")]
            reply = events[-1].reply
        else:
            reply = await agent.ask("A slow picture")
        assert len(reply.files) == 1


async def test_transient_errors_while_polling_are_retried(emu) -> None:
    from nbimagine.emulator._background import _job

    emu.background_duration = 60  # the job ends when the test says so, not by a clock
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    task = asyncio.ensure_future(agent.ask("A lighthouse"))
    # Wait for the first poll, not for the create: the emulator records a request before it picks a
    # fault, so a fault injected when the create is seen could land on the create itself.
    while not calls(emu, "GET"):
        await asyncio.sleep(0.01)
    emu.inject("http", status=503, times=2)
    while emu.state._faults or len(calls(emu, "GET")) < 4:  # both failed polls, then one that worked
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    _job(emu.state, calls(emu, "GET")[0].path.rsplit("/", 1)[1]).duration = 0  # the job completes now

    reply = await task

    assert len(reply.files) == 1


# --- cancelled mid-way --------------------------------------------------------------------------

async def test_leaving_the_stream_cancels_the_job_on_the_server(emu) -> None:
    emu.background_duration = 60  # never finishes by itself during the test
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])

    stream = agent.stream("A lighthouse")
    async for event in stream:
        if isinstance(event, StatusEvent) and event.status == "in_progress":
            response_id = event.response_id
            break
    await stream.aclose()

    cancels = calls(emu, "POST", "/cancel")
    assert [c.path for c in cancels] == [f"/v1/responses/{response_id}/cancel"]
    retrieved = await sync_client(emu).responses.retrieve(response_id)
    assert retrieved.status == "cancelled"


@pytest.mark.parametrize("stream", [False, True], ids=["polled", "streamed"])
async def test_cancelling_the_task_cancels_the_job_on_the_server(emu, stream: bool) -> None:
    emu.background_duration = 60
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    started = asyncio.Event()
    if stream:
        async def consume() -> None:
            async for _ in agent.stream("A lighthouse"):
                started.set()  # the first event carries the response id: the job can be cancelled by id
        task = asyncio.ensure_future(consume())
    else:
        task = asyncio.ensure_future(agent.ask("A lighthouse"))
    # Streamed: wait for the first event (the POST alone arrives before the client knows the id, and
    # cancelling then was a race: 1 run in 3 sent no cancel). Polled: the first GET has the id.
    while not (started.is_set() if stream else calls(emu, "GET")):
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    cancels = calls(emu, "POST", "/cancel")
    assert len(cancels) == 1
    response_id = cancels[0].path.split("/")[-2]
    assert (await sync_client(emu).responses.retrieve(response_id)).status == "cancelled"


async def test_a_cancel_while_the_create_is_in_flight_still_cancels_the_job(emu) -> None:
    # The job exists on the server as soon as the create arrives; the id comes with the answer.
    emu.background_duration = 60
    emu.latency = 0.3
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    task = asyncio.ensure_future(agent.ask("A lighthouse"))
    while not calls(emu, "POST"):
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(calls(emu, "POST", "/cancel")) == 1


def test_ctrl_c_in_ask_sync_cancels_the_job(emu, ctrl_c_when_in_flight) -> None:
    emu.background_duration = 60
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    ctrl_c_when_in_flight()

    with pytest.raises(KeyboardInterrupt):
        agent.ask_sync("A lighthouse")

    # Ctrl-C returns within Job.cancel's bound; under load the cancel may still be on its way (an exiting
    # interpreter waits for it), so wait for the emulator to see it rather than for a fixed time.
    deadline = time.monotonic() + 30
    while not calls(emu, "POST", "/cancel") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls(emu, "POST", "/cancel")) == 1


def test_ctrl_c_while_polling_cancels_the_job_on_the_server(emu) -> None:
    import _thread
    import threading

    emu.background_duration = 60
    agent = Agent("designer", config=config(emu, poll_interval=0.05), tools=[ImageGenerationTool(size="256x256")])

    def press_once_polled() -> None:  # after a status poll, not during the create
        deadline = time.monotonic() + 30
        while not calls(emu, "GET", "") and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    threading.Thread(target=press_once_polled, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        agent.ask_sync("A lighthouse")  # ask is not streamed: the job is polled
    assert calls(emu, "GET", "")  # it was polling when Ctrl-C came
    deadline = time.monotonic() + 30
    while not calls(emu, "POST", "/cancel") and time.monotonic() < deadline:
        time.sleep(0.02)
    cancelled = calls(emu, "POST", "/cancel")
    assert len(cancelled) == 1 and cancelled[0].path.startswith(calls(emu, "GET", "")[0].path)


def test_a_script_interrupted_during_the_create_still_cancels_the_job_before_it_exits(emu, tmp_path) -> None:
    # Ctrl-C stops waiting after Job.cancel's bound (5 s); the create answers later (6 s here), and the
    # exiting interpreter waits for the cancel that follows instead of leaving the job running.
    import signal
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "from nbimagine import Agent\n"
        "from nbimagine.config import OpenAIResponsesConfig\n"
        "from nbimagine.tools import ImageGenerationTool\n"
        f"config = OpenAIResponsesConfig('gpt-4.1', api_key='{KEY}', base_url='{emu.openai_base_url}', "
        "background=True, max_retries=0)\n"
        "Agent('a', config=config, tools=[ImageGenerationTool(size='256x256')]).ask_sync('A lighthouse')\n"
    )
    emu.background_duration = 60
    emu.latency = 6.0
    process = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not calls(emu, "POST") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls(emu, "POST"), "the script never sent its request"
        emu.latency = 0.0  # the create already waits its 6 s; the cancel must not
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "KeyboardInterrupt" in stderr
    assert len(calls(emu, "POST", "/cancel")) == 1


# --- dropped streams are resumed ----------------------------------------------------------------------

async def test_a_dropped_stream_resumes_without_repeating_or_losing_partial_images(emu) -> None:
    emu.background_duration = 0.4
    tool = ImageGenerationTool(partial_images=3, size="256x256")
    plain = Agent("designer", config=config(emu), tools=[tool])
    expected = [e async for e in plain.stream("A harbour at night")]
    emu.reset()
    emu.background_duration = 0.4
    emu.inject("broken_stream")  # the connection drops right after the first partial image

    events = [e async for e in plain.stream("A harbour at night")]

    partials = [e.index for e in events if isinstance(e, PartialImageEvent)]
    assert partials == [0, 1, 2]
    resumed = [r for r in calls(emu, "GET") if r.query.get("stream") == "true"]
    assert len(resumed) == 1 and resumed[0].query["starting_after"] == "6"
    assert any(isinstance(e, StatusEvent) and e.detail and "resuming after event 6" in e.detail for e in events)
    final, reference = events[-1].reply.files, expected[-1].reply.files
    assert [f.data for f in final] == [f.data for f in reference]
    assert [e.image.data for e in events if isinstance(e, PartialImageEvent)] == [
        e.image.data for e in expected if isinstance(e, PartialImageEvent)]


async def test_a_stream_that_keeps_dropping_resumes_each_time(emu) -> None:
    emu.background_duration = 0.4
    emu.inject("broken_stream", times=3)  # the create, then two resumes, drop
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(partial_images=2, size="256x256")])

    events = [e async for e in agent.stream("A harbour")]

    assert [e.index for e in events if isinstance(e, PartialImageEvent)] == [0, 1]
    assert len(events[-1].reply.files) == 1
    assert len([r for r in calls(emu, "GET") if r.query.get("stream") == "true"]) == 3


# --- failures are typed, images are never an empty success ----------------------------------------

# Each way a job can end badly on the server, and what the caller gets.
SERVER_SIDE_ENDS = [
    ("background_failed", ProviderError, {"code": "server_error"}),
    ("background_cancelled", BackgroundResponseError, {"code": "cancelled", "response_status": "cancelled"}),
]


@pytest.mark.parametrize("stream", [False, True], ids=["polled", "streamed"])
@pytest.mark.parametrize("fault, error, attributes", SERVER_SIDE_ENDS, ids=[f[0] for f in SERVER_SIDE_ENDS])
async def test_a_job_that_ends_badly_on_the_server_raises(emu, stream: bool, fault: str, error: type,
                                                           attributes: dict) -> None:
    emu.background_duration = 0.2
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    prompt = f"A lighthouse [fault:{fault}]"
    with pytest.raises(error) as caught:
        if stream:
            [e async for e in agent.stream(prompt)]
        else:
            await agent.ask(prompt)
    assert {name: getattr(caught.value, name) for name in attributes} == attributes
    assert not isinstance(caught.value, ContentPolicyError)
    assert not calls(emu, "POST", "/cancel")  # nbimagine did not end it: the server did


async def test_a_completed_job_without_its_image_bytes_is_a_typed_error(emu) -> None:
    emu.background_duration = 0.2
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    with pytest.raises(BackgroundResponseError) as caught:
        await agent.ask("A lighthouse [fault:background_result_missing]")
    error = caught.value
    assert error.code == "image_result_missing" and error.response_status == "completed"
    assert "no longer holds the image bytes" in str(error)


async def test_a_streamed_job_keeps_the_bytes_it_received(emu) -> None:
    # The retrieved response would have lost them; the stream delivered them as they were made.
    emu.background_duration = 0.2
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    events = [e async for e in agent.stream("A lighthouse [fault:background_result_missing]")]
    assert len(events[-1].reply.files) == 1


async def test_background_multi_turn_continues_the_conversation(emu) -> None:
    emu.background_duration = 0.1
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(size="256x256")])
    first = await agent.ask("A cat")
    second = await first.ask("Give it a hat")
    assert second.files[0].metadata["action"] == "edit"
    assert calls(emu, "POST")[-1].json["previous_response_id"] == first.response_id


# --- the emulator's background routes, through the raw SDK ---------------------------------------

async def test_emulator_background_routes(emu) -> None:
    emu.background_duration = 60
    client = sync_client(emu)
    job = await client.responses.create(model="gpt-4.1", input="fox", background=True,
                                        tools=[{"type": "image_generation"}])
    assert job.status == "queued" and job.background is True and job.output == []

    cancelled = await client.responses.cancel(job.id)
    again = await client.responses.cancel(job.id)  # idempotent
    assert cancelled.status == again.status == "cancelled"

    plain = await client.responses.create(model="gpt-4.1", input="fox")
    with pytest.raises(BadRequestError, match="Cannot cancel a synchronous response"):
        await client.responses.cancel(plain.id)
    assert (await client.responses.retrieve(plain.id)).status == "completed"
    with pytest.raises(BadRequestError):
        await client.responses.retrieve(plain.id, stream=True)
    with pytest.raises(NotFoundError):
        await client.responses.retrieve("resp_unknown")
    with pytest.raises(NotFoundError):
        await client.responses.cancel("resp_unknown")


async def test_emulator_stream_resume_sends_only_later_events(emu) -> None:
    emu.background_duration = 0.2
    client = sync_client(emu)
    stream = await client.responses.create(model="gpt-4.1", input="fox", background=True, stream=True,
                                           tools=[{"type": "image_generation", "partial_images": 2}])
    first = [e async for e in stream]
    numbers = [e.sequence_number for e in first]
    assert numbers == list(range(len(first)))
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert first[0].response.status == "queued" and first[-1].type == "response.completed"

    resumed = [e async for e in await client.responses.retrieve(first[0].response.id, stream=True, starting_after=5)]
    assert [e.sequence_number for e in resumed] == numbers[6:]
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in first[6:]]


def test_cancel_failure_is_a_warning_not_a_hang(unused_port: int) -> None:
    from nbimagine._providers._background import BackgroundRun

    async def cancel() -> None:
        client = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{unused_port}/v1", max_retries=0)
        run = BackgroundRun(client, parser=None, provider="openai", poll_interval=1.0)
        run.response_id, run.status = "resp_x", "in_progress"
        await run.cancel_on_server()
        await client.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(cancel())
    assert "could not cancel the background response resp_x" in str(caught[0].message)

"""Image sets attacked as a demanding user would: prompts files, odd and huge sets, Ctrl-C, 429 storms, batch
outcomes of every kind on both vendors, the Batch API's own limits, a lost answer to a batch creation, and
kernels killed with SIGKILL while submitting and while collecting.

Real SDKs over HTTP against the real emulator; histories in ``tmp_path``; no fixed waits (jobs are polled
until they end; kills wait for what the emulator or the history shows).
"""

from __future__ import annotations

import _thread
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nbimagine
from nbimagine.config import OPENAI_BATCH_MAX_BYTES, OPENAI_BATCH_MAX_REQUESTS, GeminiConfig
from nbimagine.errors import BatchError, ConfigError, ContentPolicyError, InputError, SetInterrupted

OPTIONS = {"openai": {"size": "256x256"}, "gemini": {"provider": "gemini", "image_size": "512"}}
# A prompt token that makes the emulator refuse that one request: a bad request, and a safety refusal.
REFUSED = {"openai": ("[error:400]", "[fault:moderation]"), "gemini": ("[error:400]", "[fault:image_safety]")}


pytestmark = pytest.mark.usefixtures("no_learnt_limits")


def posts(emu, suffix=""):
    return [r for r in emu.requests if r.method == "POST" and r.path.rstrip("/").endswith(suffix)]


# --- prompts: files, unicode, nothing, duplicates, a great many ---------------------------------------------

PROMPTS_FILE = "\ufeffA café at dawn ☕\r\n\r\n   \n日本の猫、水彩\nZażółć gęślą jaźń\nمرحبا بالعالم\n👩‍🚀 in orbit\n\n"
PROMPTS = ["A café at dawn ☕", "日本の猫、水彩", "Zażółć gęślą jaźń", "مرحبا بالعالم", "👩‍🚀 in orbit"]


@pytest.mark.parametrize("form", ["path", "open file"])
def test_a_prompts_file_with_blank_lines_unicode_a_bom_and_crlf(session, emu, tmp_path, form):
    path = tmp_path / "prompts.txt"
    path.write_bytes(PROMPTS_FILE.encode("utf-8"))
    with open(path, encoding="utf-8") as handle:
        source = path if form == "path" else handle
        made = nbimagine.generate_many(source, progress=False, **OPTIONS["openai"])
    assert [r.prompt for r in made] == PROMPTS and all(r.ok for r in made)
    assert sorted(e.prompt for e in nbimagine.history()) == sorted(PROMPTS)  # stored exactly as written
    sent = [r.json["input"][0]["content"][0]["text"] for r in posts(emu, "/responses")]
    assert sorted(sent) == sorted(PROMPTS)


def test_a_prompts_file_through_a_batch_keeps_every_character(session, emu, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(PROMPTS_FILE.encode("utf-8"))
    job = nbimagine.submit_batch(path, **OPTIONS["openai"])
    assert job.prompts == PROMPTS
    result = job.wait(progress=False, poll=0.02)
    assert [r.prompt for r in result] == PROMPTS and [e.prompt for e in result.entries] == PROMPTS


@pytest.mark.parametrize(("make", "error", "fragment"), [
    (lambda p: ["a cat", "a \udce9 dog"], InputError, "Prompt 1 holds '\\\\udce9'"),  # a lone surrogate
    (lambda p: p.write_bytes(b"a cat\n\xff\xfe dog\n") and p, InputError, "not UTF-8 text"),
    (lambda p: [], ConfigError, "no prompts"),
    (lambda p: p.write_text("\n  \n\ufeff\n", encoding="utf-8") and p, ConfigError, "no prompts in"),
    (lambda p: p.with_name("missing.txt"), InputError, "Cannot read the prompts file"),
    (lambda p: open(p.with_name("b.txt").resolve(), "wb+"), ConfigError, "text mode"),  # noqa: SIM115
])
def test_prompts_that_cannot_be_sent_are_refused_before_any_request(session, emu, tmp_path, make, error, fragment):
    source = make(tmp_path / "prompts.txt")
    for call in (nbimagine.generate_many, nbimagine.submit_batch):
        with pytest.raises(error, match=fragment):
            call(source)
    if hasattr(source, "close"):
        source.close()
    assert not emu.requests and nbimagine.history().jobs() == []


@pytest.mark.parametrize(("body", "fragment"), [
    ("", "cell body is empty"),  # IPython's own words
    ("\n   \n\ufeff\n", "Write the prompts in the cell body"),
    ("a cat\na \udce9 dog", "lone surrogate"),
])
@pytest.mark.parametrize("mode", ["--each", "--batch"])
def test_a_cell_with_no_prompt_or_one_that_cannot_be_sent(ip, emu, body, fragment, mode):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=fragment):
        ip.run_cell_magic("imagine", f"{mode} --size 256x256", body)
    assert not emu.requests


@pytest.mark.parametrize("how", ["now", "batch"])
def test_duplicate_prompts_are_each_their_own_image_once(session, emu, how):
    prompts = ["a cat", "a cat", "a dog", "a cat"]
    if how == "now":
        result = nbimagine.generate_many(prompts, progress=False, **OPTIONS["openai"])
    else:
        job = nbimagine.submit_batch(prompts, **OPTIONS["openai"])
        result = job.wait(progress=False, poll=0.02)
        assert [e.id for e in job.results().entries] == [e.id for e in result.entries]  # collected once
        assert sorted(e.image.metadata["custom_id"] for e in result.entries) == ["0", "1", "2", "3"]
    assert [r.prompt for r in result] == prompts and all(r.ok for r in result)
    ids = [e.id for e in result.entries]
    assert len(ids) == len(set(ids)) == 4 and len(nbimagine.history()) == 4


def test_ten_thousand_and_one_prompts(ip, emu):
    """A dry run of 10,001 prompts estimates them all and sends nothing; a batch of 10,001 is stored, sent as
    one file, and when cancelled reports each prompt in a bounded display."""
    prompts = [f"catalogue item {i}" for i in range(10_001)]
    ip.run_cell_magic("imagine", "--each --dry-run --size 256x256", "\n".join(prompts))
    assert "x10001" in ip.display_pub.outputs[-1]["data"]["text/plain"].replace(",", "")
    assert not emu.requests
    emu.batch_time = 30.0  # long enough to cancel before the lines run
    job = nbimagine.submit_batch(prompts, size="256x256")
    assert job.record.total == 10_001 and len(job.prompts) == 10_001
    uploaded = next(r for r in emu.requests if r.path.endswith("/batches"))
    assert uploaded.json["endpoint"] == "/v1/responses"
    job.cancel()
    with pytest.raises(BatchError) as info:
        job.wait(progress=False, poll=0.05)
    results = info.value.results
    assert len(results) == 10_001 and [r.prompt for r in results] == prompts
    assert len(results.failures) == 10_001 - len(results.ok)
    shown = repr(results).splitlines()
    assert len(shown) <= 22 and shown[-1].startswith("  ... and ") and ".failures" in shown[-1]
    assert results._repr_mimebundle_()["text/html"].count("<li>") <= 21
    before = len(nbimagine.history())
    with pytest.raises(BatchError, match="ended cancelled"):  # asked again: the same outcome, nothing added
        ip.run_line_magic("imagine", f"jobs results {job.id}")
    assert len(nbimagine.history()) == before


# --- the Batch API's own limits -------------------------------------------------------------------------------


def test_more_requests_than_one_batch_holds_are_refused_before_anything_is_stored(session, emu):
    prompts = [f"p{i}" for i in range(OPENAI_BATCH_MAX_REQUESTS + 1)]
    with pytest.raises(ConfigError, match=r"at most 50,000 requests.*50,001.*split"):
        nbimagine.submit_batch(prompts, **OPTIONS["openai"])
    with pytest.raises(ConfigError, match=r"50,002 \(25,001 prompts x 2\)"):
        nbimagine.submit_batch(prompts[:25_001], n=2, **OPTIONS["openai"])
    assert not emu.requests and nbimagine.history().jobs() == []


def test_an_input_file_over_200_mb_is_refused_before_the_upload(session, emu):
    prompt = "a very detailed scene " * 200_000  # 4.4 MB; the same string 48 times is 211 MB of JSONL
    with pytest.raises(ConfigError, match="200 MB") as info:
        nbimagine.submit_batch([prompt] * 48, **OPTIONS["openai"])
    assert "split" in str(info.value)
    assert not emu.requests and nbimagine.history().jobs() == []


def test_the_emulator_enforces_the_same_limits(emu):
    from openai import OpenAI

    from nbimagine.emulator import _batch

    assert _batch.OPENAI_BATCH_MAX_REQUESTS is OPENAI_BATCH_MAX_REQUESTS
    assert _batch.OPENAI_BATCH_MAX_BYTES is OPENAI_BATCH_MAX_BYTES
    client = OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
    line = ('{"custom_id":"%d","method":"POST","url":"/v1/responses","body":{"model":"gpt-4.1","input":"x"}}')
    data = "\n".join(line % i for i in range(OPENAI_BATCH_MAX_REQUESTS + 1)).encode()
    uploaded = client.files.create(file=("big.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "too_many_requests"
    assert "50,000" in batch.errors.data[0].message


# --- how a batch ends: a table over both vendors ----------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "gemini"])
@pytest.mark.parametrize("how", ["completed", "cancelled", "expired", "failed"])
def test_every_end_of_a_batch_is_a_typed_outcome_that_keeps_what_was_made(session, emu, provider, how):
    bad, blocked = REFUSED[provider]
    prompts = ["a red fox", f"a whale {bad}", "a green tree", f"a storm {blocked}", "a kite", "a lamp"]
    emu.batch_time = 3.0 if how == "cancelled" else 0.2
    if how in ("expired", "failed"):
        emu.inject(f"batch_{how}")
    job = nbimagine.submit_batch(prompts, **OPTIONS[provider])
    if how == "cancelled":
        job.cancel()
    if how == "completed":
        result = job.wait(progress=False, poll=0.02)
    else:
        with pytest.raises(BatchError) as info:
            job.wait(progress=False, poll=0.02)
        error = info.value
        assert error.state == how and error.job_id == job.id and str(error).count("\n") == 0
        result = error.results
        assert error.files == result.files
    assert [r.prompt for r in result] == prompts
    history = nbimagine.history()
    assert len(history) == len(result.entries) == sum(r.ok for r in result)  # every image made, once
    assert history.job(job.id).state == ("collected" if how == "completed" else how)
    lines = repr(result)
    for failure in result.failures:  # each failed line named, with its prompt and why
        assert f"[{failure.index}] {failure.prompt!r}" in lines
    if how == "completed":
        assert [r.ok for r in result] == [True, False, True, False, True, True]
        assert result[1].error.status == 400 and isinstance(result[3].error, ContentPolicyError)
    elif how == "failed":
        assert not result.ok and all("failed" in str(r.error) for r in result)
    assert len(job.results() if how == "completed" else []) in (0, 6)


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_lost_answer_to_the_creation_finds_the_job_it_made(session, emu, provider):
    """The provider made the job, but the connection dropped before its answer: found by its name, followed,
    collected; never a paid job nbimagine cannot see."""
    emu.inject("batch_create_lost")
    job = nbimagine.submit_batch(["a pear", "a plum"], **OPTIONS[provider])
    assert job.record.job_id and job.record.state != "submit_failed"
    created = posts(emu, "/batches") if provider == "openai" else posts(emu, ":batchGenerateContent")
    assert len(created) == 1  # the creation was not repeated
    result = job.wait(progress=False, poll=0.02)
    assert [r.ok for r in result] == [True, True] and len(nbimagine.history()) == 2


# --- many prompts now: Ctrl-C, a 429 storm ---------------------------------------------------------------------


def _interrupt_when(condition):
    def watch():
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        _thread.interrupt_main()  # what the kernel's SIGINT handler does

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.parametrize("surface", ["python", "magic"])
def test_ctrl_c_keeps_and_records_what_arrived_cancels_the_rest_and_says_how_many(ip, emu, surface):
    from nbimagine._many import _NotRun

    emu.latency = 0.3
    prompts = [f"a teapot, shade {i}" for i in range(8)]
    # Concurrency 2: when the 4th request reaches the provider, at least 2 answers are in.
    _interrupt_when(lambda: len(posts(emu, "/responses")) >= 4)
    with pytest.raises(SetInterrupted) as info:
        if surface == "python":
            nbimagine.generate_many(prompts, concurrency=2, progress=False, size="256x256")
        else:
            ip.run_cell_magic("imagine", "--each --concurrency 2 --size 256x256 -o teapots", "\n".join(prompts))
    stopped = info.value
    assert isinstance(stopped, KeyboardInterrupt)
    results = stopped.results
    done = [r for r in results if r.ok]
    assert len(results) == 8 and len(done) >= 2 and [r.prompt for r in results] == prompts
    cancelled = [r for r in results if isinstance(r.error, _NotRun)]
    assert len(done) + len(cancelled) == 8 and cancelled
    assert f"{len(done)} of 8 prompt(s) done" in str(stopped) and f"{len(cancelled)} cancelled" in str(stopped)
    # Every image on the results is recorded: one that came in while the set was being cancelled may reach the
    # history after the results were made (Ctrl-C waits for that a few seconds only), but it does reach it.
    images = sum(r.count for r in results)
    assert images >= len(done) and {e.id for e in results.entries} <= {e.id for e in nbimagine.history()}
    deadline = time.monotonic() + 30
    while len(nbimagine.history()) < images and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(nbimagine.history()) == images
    if surface == "magic":
        assert ip.user_ns["teapots"] is results
        assert "prompt(s) done" in ip.display_pub.outputs[-1]["data"]["text/plain"]


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_429_storm_with_retry_after_is_waited_out_as_one_never_stormed(session, emu, provider):
    wait = 0.15
    emu.inject(f"{provider}:http", status=429, times=5, retry_after=wait)
    prompts = [f"a lantern {i}" for i in range(6)]
    result = nbimagine.generate_many(prompts, concurrency=6, progress=False, **OPTIONS[provider])
    assert all(r.ok for r in result) and len(nbimagine.history()) == 6
    route = "/responses" if provider == "openai" else ":generateContent"
    sent = posts(emu, route)
    assert len(sent) == 6 + 5  # each 429 retried once it was allowed: no request sent twice needlessly
    # The provider asked for `wait` after each 429 and the whole set waited it out: no request arrived sooner
    # than that after a rejected one. OpenAI's first request goes alone (its limit is unknown), so its five
    # rejections come one at a time; Gemini's first wave of six arrives together, then the retries.
    times = [r.at for r in sent]
    if provider == "openai":
        assert all(later - earlier >= wait for earlier, later in itertools.pairwise(times[:6]))
    else:
        assert min(times[6:]) >= max(times[:5]) + wait
        assert all(later - earlier >= wait for earlier, later in itertools.pairwise(times[6:]))
    assert result.rejected == 5


def test_a_storm_longer_than_the_patience_fails_each_prompt_in_words(session, emu):
    emu.inject("openai:http", status=429, times=1000, retry_after=0.01)
    result = nbimagine.generate_many(["a", "b", "c"], concurrency=3, progress=False, size="256x256")
    assert not result.ok and all(r.error.status == 429 for r in result)
    assert len(posts(emu, "/responses")) <= 3 * 11  # ten retries each at most, never more
    assert "3 failed" in result.summary and len(nbimagine.history()) == 0


# --- kernels killed with SIGKILL ------------------------------------------------------------------------------


def _kernel(tmp_path, emu, code):
    """A fresh Python process of the same notebook (as a restarted kernel), talking to the test emulator."""
    env = {**os.environ, "NBIMAGINE_EMULATOR": emu.url,
           "JPY_SESSION_NAME": f"{nbimagine.history().notebook}.ipynb"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(process, condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the kernel never got there"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_kernel_killed_while_submitting_loses_no_job(ip, emu, tmp_path):
    prompts = [f"a shell {i}" for i in range(5)]
    child = _kernel(tmp_path, emu, f"import nbimagine\nnbimagine.submit_batch({prompts!r}, size='256x256')\n")
    # Killed once the creation has reached the provider: the job exists there, whatever the kernel wrote.
    _kill_when(child, lambda: bool(posts(emu, "/batches")))
    listing = repr(ip.run_line_magic("imagine", "jobs"))
    assert "openai/" in listing and len(nbimagine.jobs()) == 1
    result = nbimagine.jobs()[0].wait(progress=False, poll=0.02)  # found by its name if need be, collected
    assert [r.prompt for r in result] == prompts and all(r.ok for r in result)
    assert len(nbimagine.history()) == 5
    assert len(posts(emu, "/batches")) == 1


def test_a_kernel_killed_while_collecting_resumes_with_each_image_once(ip, emu, tmp_path):
    count = 200
    job = nbimagine.submit_batch([f"a tile {i}" for i in range(count)], size="256x256")
    status = job.status()
    while not status.done:
        time.sleep(0.05)
        status = job.status()
    index = Path(tmp_path) / ".nbimagine" / "index.sqlite"

    def collected():
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM job_lines WHERE job = ? AND outcome IS NOT NULL",
                                (job.record.id,)).fetchone()[0]

    child = _kernel(tmp_path, emu, "import nbimagine\nnbimagine.jobs()[0].wait(progress=False, poll=0.05)\n")
    _kill_when(child, lambda: collected() >= 50)
    assert collected() < count, "the kernel finished before it was killed"
    listing = repr(ip.run_line_magic("imagine", "jobs"))
    assert f"{collected()}/{count}" in listing
    result = nbimagine.jobs()[0].wait(progress=False, poll=0.02)
    assert len(result) == count and all(r.ok for r in result)
    history = nbimagine.history()
    ids = [line.custom_id for line in history.job_lines(job.record.id)]
    seen = [e.image.metadata["custom_id"] for e in history]
    assert sorted(seen) == sorted(ids)  # each image exactly once, none lost
    assert history.job(job.id).state == "collected"


def test_a_gemini_config_batch_through_a_killed_kernel(session, emu, tmp_path):
    """submit_batch with config= (not the session's options): reconnected from its stored config."""
    config = GeminiConfig(model="gemini-3.1-flash-image", base_url=emu.gemini_base_url, api_key="k",
                          image_config={"image_size": "512"})
    job = nbimagine.submit_batch(["a gull", "a tern"], config=config)
    code = "import nbimagine\nr = nbimagine.jobs()[0].wait(progress=False, poll=0.05)\nprint(len(r.entries))\n"
    env = {**os.environ, "NBIMAGINE_EMULATOR": emu.url, "GEMINI_API_KEY": "k",
           "JPY_SESSION_NAME": f"{nbimagine.history().notebook}.ipynb"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["2"] and nbimagine.history().job(job.id).state == "collected"


# --- the issue's own examples ------------------------------------------------------------------------------------


def test_the_progress_bar_shows_done_failed_and_running(session, emu, capsys):
    """tqdm's bar (text outside a notebook) counts the prompts and says done / failed / running."""
    made = nbimagine.generate_many(["a fox", "a whale [error:400]", "a tree"], size="256x256")
    assert [r.ok for r in made] == [True, False, True]
    bar = capsys.readouterr().err
    assert "3/3" in bar and "done=2" in bar and "failed=1" in bar and "running=" in bar


def test_submit_batch_with_a_config_and_tools_as_the_issue_writes_it(session, emu):
    from nbimagine.config import OpenAIResponsesConfig
    from nbimagine.tools import ImageGenerationTool

    config = OpenAIResponsesConfig(model="gpt-4.1", base_url=emu.openai_base_url, api_key="k")
    job = nbimagine.submit_batch(["a paper crane", "a paper boat"], config=config,
                                 tools=[ImageGenerationTool(size="256x256", quality="low")])
    assert job.id.startswith("batch_") and job.status().state in ("validating", "in_progress", "finalizing",
                                                                  "completed")
    result = job.wait(progress=False, poll=0.02)
    assert [e.prompt for e in result.entries] == ["a paper crane", "a paper boat"]
    assert result.entries[0].params == {"size": "256x256", "quality": "low"}
    assert [e.id for e in job.results().entries] == [e.id for e in result.entries]  # exactly once

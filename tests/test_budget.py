"""Budgets, ``%imagine cost``, ``--dry-run`` and the studio's budget line, in a real IPython shell against the
emulator (the ``ip`` fixture, conftest.py). A refused cell must send nothing: the emulator's log stays empty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from nbimagine._cost import estimate, format_usd
from nbimagine._generate import Generation
from nbimagine._history import History
from nbimagine._session import ImagineSession, get_session, set_emulator
from nbimagine.errors import BudgetError
from nbimagine.events import BinaryResult


@pytest.fixture(autouse=True)
def _no_session_budget() -> Any:
    session = get_session()
    session.budget_usd, session.spent_usd = None, 0.0
    session._holds.clear()
    yield
    session.budget_usd, session.spent_usd = None, 0.0
    session._holds.clear()


def imagine(shell: Any, line: str, cell: str) -> Any:
    return shell.run_cell_magic("imagine", line, cell)


def line(shell: Any, text: str) -> Any:
    return shell.run_line_magic("imagine", text)


def generation_estimate(line_options: dict[str, Any], prompt: str, n: int = 1) -> Any:
    """The estimate the magic computes for these options (the same Generation code path)."""
    gen = Generation(prompt, n=n, overrides=line_options, record=False, session=get_session())
    return gen.estimate()


def test_a_cell_over_the_notebook_budget_is_refused_before_any_request(ip: Any, emu: Any) -> None:
    line(ip, "budget 0.01")
    est = generation_estimate({}, "a lighthouse")
    assert est.high_usd > 0.01
    with pytest.raises(UsageError) as info:
        imagine(ip, "", "a lighthouse")
    message = str(info.value)
    assert emu.requests == []  # nothing was sent
    assert "\n" not in message and message.startswith("Not sent")
    for figure in ("spent $0.00", format_usd(0.01), format_usd(est.high_usd), "%imagine budget 0.", "budget off"):
        assert figure in message, (figure, message)
    assert len(ip.display_pub.outputs) == 0  # no progress slot either


def test_budget_counts_what_was_spent_and_guards_the_next_cell(ip: Any, emu: Any) -> None:
    options = "--quality low --size 1024x1024"
    imagine(ip, options, "a red bicycle")
    from nbimagine import history

    spent = history().cost().total_usd
    reply_cost = history()[-1].metadata["cost_usd"]
    assert spent == pytest.approx(reply_cost) and spent > 0
    est = generation_estimate({"quality": "low", "size": "1024x1024"}, "a red bicycle")
    # Exactly enough for what was spent plus one more such cell (at its high end): allowed, then refused.
    line(ip, f"budget {spent + est.high_usd + 1e-6:.6f}")
    imagine(ip, options, "a red bicycle")
    sent = len(emu.requests)
    with pytest.raises(UsageError, match="Not sent: this notebook has spent"):
        imagine(ip, options, "a red bicycle")
    assert len(emu.requests) == sent
    line(ip, "budget off")
    imagine(ip, options, "a red bicycle")
    assert len(emu.requests) == sent + 1


def test_session_budget_and_status(ip: Any, emu: Any) -> None:
    assert "No budget set" in repr(line(ip, "budget"))
    imagine(ip, "--quality low --size 1024x1024", "a kite")
    session = get_session()
    assert session.spent_usd > 0  # every priced reply of the session counts
    line(ip, f"budget {session.spent_usd:.6f} --session")
    status = repr(line(ip, "budget"))
    assert "Session budget" in status and "$0.00 left" in status and "Simulated" in status
    sent = len(emu.requests)
    with pytest.raises(UsageError, match=r"this session has spent .* --session"):
        imagine(ip, "--quality low --size 1024x1024", "a kite")
    assert len(emu.requests) == sent
    line(ip, "budget off --session")
    assert session.budget_usd is None


@pytest.mark.parametrize("bad", ["-1", "two", "nan", "1 2"])
def test_bad_budget_amounts_are_one_line_usage_errors(ip: Any, bad: str) -> None:
    with pytest.raises(UsageError):
        line(ip, f"budget {bad}")


def test_notebook_budget_survives_a_restart(ip: Any, tmp_path: Path) -> None:
    line(ip, "budget 2.50")
    from nbimagine import history

    notebook = history().notebook
    code = (f"from nbimagine._history import History; h = History({str(tmp_path)!r}, {notebook!r}); "
            "print(h.budget_usd)")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "2.5"


def test_a_version_2_index_gains_the_budget_column_and_keeps_its_images(tmp_path: Path) -> None:
    import sqlite3

    from nbimagine.events import BinaryResult

    with History(tmp_path, "old") as h:
        png = b"\x89PNG\r\n\x1a\n" + bytes(64)
        h.add(BinaryResult(png, {"cost_usd": 0.25}), prompt="kept")
        index = h.path / "index.sqlite"
    conn = sqlite3.connect(index)  # what the previous nbimagine wrote: schema 2, no budget column, no jobs
    conn.execute("ALTER TABLE notebooks DROP COLUMN budget_usd")
    conn.executescript("DROP TABLE job_lines; DROP TABLE jobs;")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    with History(tmp_path, "old") as h:
        assert [e.prompt for e in h] == ["kept"] and h.budget_usd is None
        h.set_budget(1.5)
        assert h.cost().total_usd == 0.25 and h.cost().budget_usd == 1.5


def test_unknown_price_cannot_pass_a_budget_silently(ip: Any, emu: Any) -> None:
    line(ip, "budget 5")
    with pytest.raises(UsageError, match="cannot be estimated"):
        imagine(ip, "-m some-unpriced-model", "a cat")
    assert emu.requests == []


def test_cost_report_by_day_provider_and_model(ip: Any, emu: Any) -> None:
    imagine(ip, "--quality low --size 1024x1024", "one")
    imagine(ip, "-p gemini", "two")
    imagine(ip, "-p gemini -n 2", "three")
    from nbimagine import history

    h = history()
    report = line(ip, "cost")
    assert report == h.cost()
    entries = list(h)
    assert report.images == len(entries) == 4
    assert report.total_usd == pytest.approx(sum(e.metadata["cost_usd"] for e in entries))
    assert report.simulated_usd == pytest.approx(report.total_usd)  # the emulator answered
    assert set(report.by("provider")) == {"openai", "gemini"}
    gemini = [r for r in report.rows if r.provider == "gemini"]
    assert [r.images for r in gemini] == [3] and gemini[0].model == "gemini-3.1-flash-image"
    openai = [r for r in report.rows if r.provider == "openai"]
    assert openai[0].model.startswith("gpt-4.1 + gpt-image")  # both models are billed
    bundle = report._repr_mimebundle_()
    assert "<svg" in bundle["text/html"] and "<table>" in bundle["text/html"]
    assert "gemini-3.1-flash-image" in bundle["text/plain"]
    assert json.dumps(report.to_records())  # plain data, e.g. for pandas.DataFrame


def test_dry_run_shows_estimate_and_request_and_sends_nothing(ip: Any, emu: Any) -> None:
    line(ip, "budget 0.01")
    imagine(ip, "--dry-run -n 2 --quality low --size 1024x1024", "a dog on a skateboard")
    assert emu.requests == []
    from nbimagine import history

    assert len(history()) == 0  # nothing recorded either
    [out] = ip.display_pub.outputs
    text = out["data"]["text/plain"]
    est = generation_estimate({"quality": "low", "size": "1024x1024"}, "a dog on a skateboard", n=2)
    assert "Dry run, nothing sent" in text and str(est) in text
    assert "Not sent: this notebook has spent" in text  # the budget verdict the real cell would get
    assert '"text": "a dog on a skateboard"' in text and '"authorization": "***"' in text
    assert "emulator-key" not in text
    # The shown request is the one a real run sends.
    line(ip, "budget off")
    imagine(ip, "--quality low --size 1024x1024", "a dog on a skateboard")
    shown = json.loads(text[text.index("{"):])
    assert shown["json"] == emu.requests[0].json


def test_studio_shows_the_budget_left_and_refuses_over_it(emu: Any, tmp_path: Path) -> None:
    from nbimagine._widgets import Studio

    set_emulator(emu)
    session = ImagineSession(emulator=True, quality="low", size="1024x1024")
    history = History(tmp_path, "studio")
    try:
        history.set_budget(1.0)
        studio = Studio(session, history, settings=False)
        assert "Notebook budget $1.00: $0.00 spent, $1.00 left" in studio.view.budget
        studio.view.prompt = "a boat"
        studio.view._handle_custom_msg({"action": "generate"}, [])  # what the page's Generate sends
        assert studio.wait(30)
        spent = history.cost().total_usd
        assert spent > 0 and f"{format_usd(spent)} spent" in studio.view.budget
        history.set_budget(spent)
        sent = len(emu.requests)
        assert studio.start() is None
        assert "Not sent" in studio.view.error and len(emu.requests) == sent
        studio.close()
    finally:
        set_emulator(None)
        history.close()


def test_generation_refusal_is_a_typed_error_with_its_figures(emu: Any, tmp_path: Path) -> None:
    set_emulator(emu)
    try:
        session = ImagineSession(emulator=True, budget_usd=0.001)
        gen = Generation("a fox", session=session, history=History(tmp_path, "typed"))
        with pytest.raises(BudgetError) as info:
            gen.start()
        error = info.value
        assert error.scope == "session" and error.budget_usd == 0.001 and error.spent_usd == 0
        agent = gen.build_agent()
        assert error.estimate_usd == estimate(agent.config, tools=agent.tools, inputs=["a fox"]).high_usd
        assert emu.requests == []
    finally:
        set_emulator(None)



# --- nothing gets past a budget: concurrency, kernels, the Python API ------------------------------------------


def _held(gen: Generation) -> Any:
    """``gen.hold_budget()``: the holds, or the BudgetError that refused them."""
    try:
        return gen.hold_budget()
    except BudgetError as exc:
        return exc


@pytest.mark.parametrize("scope", ["notebook", "session"])
def test_threads_holding_at_once_get_exactly_what_the_budget_has_room_for(emu: Any, tmp_path: Path,
                                                                          scope: str) -> None:
    # Each generation holds its estimate's high end under the budget's lock before any request: five threads
    # released together by a barrier, with room for two, get two holds and three one-line refusals.
    import threading

    set_emulator(emu)
    try:
        session = ImagineSession(emulator=True, quality="low", size="1024x1024")
        high = Generation("a kite", session=session, record=False).estimate().high_usd
        if scope == "session":
            session.budget_usd = 2.5 * high
        else:
            History(tmp_path, "shared").set_budget(2.5 * high)
        gens = [Generation("a kite", session=session, history=History(tmp_path, "shared")) for _ in range(5)]
        barrier = threading.Barrier(len(gens))
        outcomes: list[Any] = [None] * len(gens)

        def run(i: int) -> None:
            barrier.wait()
            outcomes[i] = _held(gens[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [o for o in outcomes if isinstance(o, BudgetError)]
        assert len(refused) == 3 and all(e.scope == scope for e in refused)
        assert all("held by requests in flight" in str(e) and "\n" not in str(e) for e in refused)
        assert emu.requests == []
        for o in outcomes:
            if not isinstance(o, BudgetError):
                o.release_all()
        assert not isinstance(_held(gens[0].__class__("a kite", session=session, history=History(tmp_path, "shared"))),
                              BudgetError)
    finally:
        set_emulator(None)


def _refusal(ip: Any, holder: str) -> str:
    """Send "a boat" the way ``holder`` does; return the refusal's text (fails if it was not refused)."""
    from nbimagine import history
    from nbimagine._widgets import Studio

    session = get_session()
    if holder == "magic cell":
        with pytest.raises(UsageError) as info:
            imagine(ip, "", "a boat")
        return str(info.value)
    if holder == "studio":
        studio = Studio(session, history(), settings=False)
        try:
            studio.view.prompt = "a boat"
            assert studio.start() is None
            return studio.view.error
        finally:
            studio.close()
    if holder in ("--each", "--batch"):
        with pytest.raises(UsageError) as info:
            imagine(ip, holder, "a boat\na boat")
        return str(info.value)
    import nbimagine

    with pytest.raises(BudgetError) as caught:
        if holder == "generate_many":
            nbimagine.generate_many(["a boat", "a boat"], progress=False)
        elif holder == "submit_batch":
            nbimagine.submit_batch(["a boat", "a boat"])
        else:
            session.build_agent().ask_sync("a boat")
    return str(caught.value)


SENDERS = ["magic cell", "studio", "python api", "generate_many", "--each", "submit_batch", "--batch"]


@pytest.mark.parametrize("holder", SENDERS)
def test_a_request_in_flight_holds_its_share_against_every_other_path(ip: Any, emu: Any, holder: str) -> None:
    # One generation holds (as it does while its request is in flight); then every other way of sending is
    # refused before anything is sent, and allowed once the hold is given back.
    from nbimagine import history

    session = get_session()
    session.use(quality="low", size="1024x1024")
    first = Generation("a boat", session=session, history=history())
    high = first.estimate().high_usd
    line(ip, f"budget {1.5 * high:.6f}")
    holds = first.hold_budget()
    try:
        assert "held by requests in flight" in _refusal(ip, holder)
        assert emu.requests == [] and history().jobs() == []
    finally:
        holds.release_all()
    imagine(ip, "", "a boat")
    assert len(emu.requests) == 1


@pytest.mark.parametrize(("scope", "sender"), [("notebook", s) for s in SENDERS] + [("session", "magic cell"),
                                                                                      ("session", "submit_batch")])
def test_a_set_in_flight_holds_the_whole_set_against_every_other_way_of_sending(ip: Any, emu: Any, scope: str,
                                                                                  sender: str) -> None:
    # A set of two prompts whose requests are at the provider (a minute of latency) holds both; a cell, the
    # studio, the Python API or another set are refused before sending anything; cancelled (Ctrl-C), the set
    # gives its hold back and nothing is charged for the requests that made nothing.
    from nbimagine import history
    from nbimagine._many import ManyRun, prepare_agent
    from nbimagine._sync import Job

    session = get_session()
    session.use(quality="low", size="1024x1024")
    agent, params = prepare_agent(None, (), {}, session)
    run = ManyRun(["a boat", "a boat"], agent=agent, params=params, n=1, overrides={}, record=True,
                  history=history(), concurrency=4, rate_limit=None)
    whole = max(run.generations, key=lambda g: len(g.prompt)).estimate(count=2).high_usd
    line(ip, f"budget {1.25 * whole:.6f}{' --session' if scope == 'session' else ''}")  # one set, no more
    emu.latency = 60.0
    run.hold_budget()
    job = Job(run.run())
    try:
        _wait_for(lambda: len(emu.requests) == 2)
        refusal = _refusal(ip, sender)
        assert f"Not sent: this {scope}" in refusal and "held by requests in flight" in refusal
        assert len(emu.requests) == 2 and history().jobs() == []
    finally:
        job.cancel()
        run.release()
    assert not session._holds and history().cost().held_usd == 0
    assert session.spent_usd == 0 and history().cost().spent_usd == 0  # cancelled before any answer
    emu.latency = 0.0
    imagine(ip, "", "a boat")
    assert len(history()) == 1


def _wait_for(condition: Any, limit: float = 60.0) -> None:
    """Wait until ``condition()`` (an event in another thread), failing after ``limit`` s."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_batch_job_holds_its_set_at_the_batch_price_until_its_lines_are_collected(ip: Any, emu: Any) -> None:
    # submit_batch returns at once; the job's lines are billed later, when the provider runs them. Until they are
    # collected (in any kernel) the job holds its estimate at the batch price, in the notebook's record (so a
    # restarted or second kernel sees it) and in the session that submitted it.
    import nbimagine
    from nbimagine import history

    emu.batch_time = 0.2
    session = get_session()
    session.use(quality="low", size="1024x1024")
    label = Generation("a boat", n=1, record=False)
    half = label.estimate(count=2, batch=True).high_usd
    assert half == pytest.approx(label.estimate(count=2).high_usd / 2)
    line(ip, f"budget {1.5 * half:.6f}")
    session.budget_usd = 1.5 * half
    job = nbimagine.submit_batch(["a boat", "a boat"])
    assert History(history().path.parent, history().notebook).cost().held_usd == pytest.approx(half)
    assert sum(session._holds.values()) == pytest.approx(half)
    sent = len(emu.requests)
    with pytest.raises(UsageError, match=r"held by requests in flight, \$.* of it by batch jobs not collected yet"):
        imagine(ip, "", "a boat")
    with pytest.raises(BudgetError, match="held by requests in flight"):
        nbimagine.submit_batch(["a boat", "a boat"])
    # %imagine budget says where the money is, for both budgets: in the job, until it is collected.
    shown = "\n".join(line(ip, "budget").lines)
    assert shown.count("of it by batch jobs not collected yet (%imagine jobs)") == 2, shown
    assert len(emu.requests) == sent and len(history().jobs()) == 1
    images = job.wait(progress=False, poll=0.05)
    paid = sum(e.metadata["cost_usd"] for e in images.entries)
    assert 0 < paid <= half
    report = history().cost()
    assert report.held_usd == 0 and report.spent_usd == pytest.approx(paid)
    assert not session._holds and session.spent_usd == pytest.approx(paid)
    job.results()  # collected again: counted once
    assert session.spent_usd == pytest.approx(paid)


@pytest.mark.parametrize("refusal", ["no batch path", "upload refused"])
def test_a_batch_that_is_not_submitted_holds_nothing(ip: Any, emu: Any, refusal: str) -> None:
    import nbimagine
    from nbimagine import history
    from nbimagine.config import VertexAIConfig
    from nbimagine.errors import ConfigError, ProviderError

    line(ip, "budget 5")
    get_session().budget_usd = 5.0
    if refusal == "no batch path":  # refused by the provider module, after the budgets were held
        with pytest.raises(ConfigError, match="generate_many"):
            nbimagine.submit_batch(["a boat"], config=VertexAIConfig(model="gemini-3.1-flash-image", api_key="k"))
    else:
        from nbimagine.config import OpenAIResponsesConfig
        from nbimagine.tools import ImageGenerationTool

        nowhere = OpenAIResponsesConfig(model="gpt-4.1", api_key="k", base_url="http://127.0.0.1:9/v1")
        with pytest.raises(ProviderError):  # nothing listens on port 9: the upload fails
            nbimagine.submit_batch(["a boat"], config=nowhere, tools=[ImageGenerationTool()])
        assert history().jobs()[0].state == "submit_failed"
    assert not get_session()._holds and history().cost().held_usd == 0


_KERNEL = """
import sys
from nbimagine._budget import hold
from nbimagine._cost import estimate
from nbimagine._history import History
from nbimagine._session import ImagineSession
from nbimagine.config import GeminiConfig
h = History(sys.argv[1], "shared")
holds = hold(ImagineSession(), h, lambda: estimate(GeminiConfig("gemini-2.5-flash-image", api_key="k")), 1)
print("held", flush=True)
sys.stdin.readline()
holds.release_all()
print("released", flush=True)
"""


def test_two_kernels_on_one_notebook_see_each_others_holds(tmp_path: Path) -> None:
    from nbimagine._budget import hold
    from nbimagine.config import GeminiConfig

    config = GeminiConfig("gemini-2.5-flash-image", api_key="k")
    high = estimate(config).high_usd
    History(tmp_path, "shared").set_budget(1.5 * high)  # room for one request

    def here() -> Any:
        try:
            return hold(ImagineSession(), History(tmp_path, "shared"), lambda: estimate(config), 1)
        except BudgetError as exc:
            return exc

    other = subprocess.Popen([sys.executable, "-c", _KERNEL, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        refused = here()
        assert isinstance(refused, BudgetError) and "held by requests in flight" in str(refused)
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "released"
        other.wait()
        mine = here()
        assert not isinstance(mine, BudgetError)
        mine.release_all()
        # A kernel that dies holding (kill -9 mid-request) does not hold the notebook's budget forever.
        crashed = subprocess.Popen([sys.executable, "-c", _KERNEL, str(tmp_path)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert crashed.stdout.readline().strip() == "held"
        assert isinstance(here(), BudgetError)
        crashed.kill()
        crashed.wait()
        assert not isinstance(here(), BudgetError)
    finally:
        for proc in (other, locals().get("crashed")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


PYTHON_API = {
    "ask_sync": lambda agent, prompt: agent.ask_sync(prompt),
    "stream": lambda agent, prompt: _streamed(agent, prompt),
}


def _streamed(agent: Any, prompt: str) -> Any:
    from nbimagine._sync import run_sync
    from nbimagine.events import ReplyEvent

    async def go() -> Any:
        async for event in agent.stream(prompt):
            if isinstance(event, ReplyEvent):
                return event.reply
        return None

    return run_sync(go())


@pytest.mark.parametrize("call", PYTHON_API)
@pytest.mark.parametrize("scope", ["notebook", "session"])
def test_python_api_requests_in_a_kernel_are_guarded_and_counted(ip: Any, emu: Any, call: str, scope: str) -> None:
    from nbimagine import history

    session = get_session()
    agent = session.build_agent(provider="gemini")
    flag = " --session" if scope == "session" else ""
    line(ip, f"budget 0.001{flag}")
    with pytest.raises(BudgetError, match=f"Not sent: this {scope}"):
        PYTHON_API[call](agent, "a lighthouse")
    assert emu.requests == []
    line(ip, f"budget 5{flag}")
    reply = PYTHON_API[call](agent, "a lighthouse")
    assert len(emu.requests) == 1 and reply.cost.usd > 0
    report = history().cost()
    # Not in the history as images, but this notebook's spending all the same (and the session's).
    assert report.images == 0 and report.total_usd == pytest.approx(reply.cost.usd)
    assert report.rows[0].unrecorded_usd == pytest.approx(reply.cost.usd)
    assert session.spent_usd == pytest.approx(reply.cost.usd)
    assert not session._holds and report.held_usd == 0


SPENT_ELSEWHERE = {
    "--no-history": ("--no-history -p gemini", "a fox"),
    "text-only answer": ("--quality low --size 1024x1024", "a fox [fault:text_only]"),
}


@pytest.mark.parametrize("case", SPENT_ELSEWHERE)
def test_spending_that_leaves_no_image_in_the_history_still_counts(ip: Any, emu: Any, case: str) -> None:
    from nbimagine import history

    options, prompt = SPENT_ELSEWHERE[case]
    imagine(ip, f"{options} -o out", prompt)
    reply = ip.user_ns["out"]
    assert reply.cost is not None and len(history()) == 0
    report = history().cost()
    assert reply.cost.usd > 0 and report.spent_usd == pytest.approx(reply.cost.usd)
    line(ip, f"budget {reply.cost.usd:.6f}")  # all spent: the next cell is refused
    sent = len(emu.requests)
    with pytest.raises(UsageError, match="Not sent: this notebook has spent"):
        imagine(ip, options, prompt)
    assert len(emu.requests) == sent


NO_USAGE = ["openai", "gemini", "images_api"]


@pytest.mark.parametrize("provider", NO_USAGE)
def test_an_answer_without_usage_is_charged_its_estimate_never_shown_as_a_cost(ip: Any, emu: Any, provider: str,
                                                                                request: Any) -> None:
    from nbimagine import history
    from nbimagine.config import OpenAIImagesConfig

    session = get_session()
    overrides: dict[str, Any] = {"provider": provider}
    if provider == "images_api":
        session.register("images_api", OpenAIImagesConfig(model="gpt-image-1", quality="low", size="1024x1024"))
        request.addfinalizer(lambda: session._registered.pop("images_api", None))
    elif provider == "openai":
        overrides.update(quality="low", size="1024x1024")
    options = " ".join(f"--{k} {v}" if k != "provider" else f"-p {v}" for k, v in overrides.items()) + " -n 2"
    line(ip, "budget 5")
    high = Generation("a fox [fault:no_usage]", session=session, n=2, overrides=overrides,
                      record=False).estimate().high_usd
    imagine(ip, f"{options} -o out", "a fox [fault:no_usage]")
    replies = ip.user_ns["out"]
    replies = replies if isinstance(replies, list) else [replies]
    assert all(r.cost is None for r in replies)  # unknown, never a guess
    entries = list(history())
    assert len(entries) == 2 and all("cost_usd" not in e.metadata for e in entries)
    assert "$" not in " ".join(e.caption for e in entries)
    from nbimagine._widgets import _metadata_rows

    [cost] = [value for label, value in _metadata_rows(entries[0]) if label == "cost"]
    assert cost.startswith("unknown (budgets count $")  # the studio's details say so, never a figure as the cost
    report = history().cost()
    assert report.total_usd == 0 and report.unpriced == 2
    assert report.charged_usd == pytest.approx(high)  # each request charged its share of the high end
    assert "unknown cost" in report.summary() and get_session().spent_usd == pytest.approx(high)
    line(ip, f"budget {high:.6f}")
    sent = len(emu.requests)
    with pytest.raises(UsageError, match="Not sent"):
        imagine(ip, options, "a fox")
    assert len(emu.requests) == sent


def test_the_studio_shows_a_budget_change_at_once(ip: Any, emu: Any) -> None:
    from nbimagine import history
    from nbimagine._widgets import Studio

    studio = Studio(get_session(), history(), settings=False)
    try:
        assert studio.view.budget == ""
        line(ip, "budget 0.75")  # what the page shows: its budget trait, synced to the browser
        assert "Notebook budget $0.75: $0.00 spent, $0.75 left" in studio.view.budget
        line(ip, "budget 0.40 --session")
        assert "Session budget $0.40" in studio.view.budget
        gen = Generation("a kite", session=get_session(), history=history())
        holds = gen.hold_budget()
        assert "held by requests in flight" in studio.view.budget
        holds.release_all()
        assert "held by" not in studio.view.budget
    finally:
        studio.close()


def test_budget_and_spending_without_images_come_back_with_a_repair(ip: Any, emu: Any, tmp_path: Path) -> None:
    from nbimagine import history, repair_history

    line(ip, "budget 1.25")
    imagine(ip, "--no-history -p gemini", "a fox")
    imagine(ip, "-p gemini", "a hen")
    before = history().cost()
    # A notebook with a budget and no image at all.
    History(tmp_path, "planned").set_budget(0.5)
    index = history().path / "index.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    from nbimagine._history import _forget_all

    _forget_all()
    repair_history(tmp_path)
    after = history(notebook=before.notebook).cost()
    assert after.budget_usd == 1.25 and after.spent_usd == pytest.approx(before.spent_usd)
    assert after.rows == before.rows
    assert History(tmp_path, "planned").budget_usd == 0.5


def test_a_budget_kept_only_in_an_older_index_survives_a_repair(tmp_path: Path) -> None:
    # Histories written before budgets had records: the readable index's budget is carried into the record.
    import sqlite3

    with History(tmp_path, "old") as h:
        h.add(BinaryResult(b"\x89PNG\r\n\x1a\n" + bytes(64), {}), prompt="kept")
        h.set_budget(3.0)
        uid = h._store.query("SELECT uid FROM notebooks WHERE name = 'old'")[0][0]
        h._store._write_notebook_record(uid, "old", "2026-01-01T00:00:00+00:00", budget_usd=None)
        h._store.update_notebook_record  # noqa: B018
        record = h.path / "notebooks" / f"{uid}.json"
        doc = json.loads(record.read_text())
        doc.pop("budget_usd")
        record.write_text(json.dumps(doc))
        conn = sqlite3.connect(h.path / "index.sqlite")
        assert conn.execute("SELECT budget_usd FROM notebooks").fetchone() == (3.0,)
        conn.close()
        h.repair()
        assert h.budget_usd == 3.0 and json.loads(record.read_text())["budget_usd"] == 3.0


# --- Ctrl-C and cancellation give back what was held ----------------------------------------------------------


CANCELLED = {
    "cell": lambda ip: imagine(ip, "", "a slow boat"),
    "--each": lambda ip: imagine(ip, "--each", "a slow boat\na slow kite"),
    "generate_many": lambda ip: __import__("nbimagine").generate_many(["a slow boat", "a slow kite"], progress=False),
    "python api": lambda ip: get_session().build_agent().ask_sync("a slow boat"),
}


@pytest.mark.parametrize("way", CANCELLED)
def test_ctrl_c_mid_request_gives_back_every_hold(ip: Any, emu: Any, ctrl_c_when_in_flight: Any, way: str) -> None:
    from nbimagine import history

    get_session().use(quality="low", size="1024x1024")
    high = generation_estimate({}, "a slow boat").high_usd
    line(ip, f"budget {2.5 * high:.6f}")
    get_session().budget_usd = 2.5 * high
    emu.latency = 30.0
    ctrl_c_when_in_flight()
    with pytest.raises(KeyboardInterrupt):
        CANCELLED[way](ip)
    # Nothing answered: nothing is spent, and nothing stays held (the next cells have the whole budget).
    assert not get_session()._holds and history().cost().held_usd == 0
    assert get_session().spent_usd == 0 and history().cost().spent_usd == 0
    emu.latency = 0.0
    imagine(ip, "--each", "a boat\na kite")
    assert len(history()) == 2


def test_a_generation_cancelled_before_its_coroutine_ran_gives_back_its_hold(ip: Any, emu: Any) -> None:
    # cancel() right after start(): whether or not the request had begun, nothing stays held.
    from nbimagine import history

    line(ip, "budget 5")
    for _ in range(3):
        gen = Generation("a boat", session=get_session(), history=history())
        gen.start()
        gen.cancel()
        assert not get_session()._holds and history().cost().held_usd == 0


# --- what a budget is: one rule for every way of setting one ---------------------------------------------------


BUDGET_AMOUNTS = [("2.00", 2.0), ("$2", 2.0), ("0", 0.0), ("-0", 0.0), ("1e-3", 0.001), ("off", None),
                  ("none", None), (2, 2.0), (0.5, 0.5), (None, None)]
NOT_BUDGETS = ["-1", "two", "nan", "inf", "1e400", "$", "", "abc", -0.5, float("nan"), float("inf"), True, [2]]


def _set_budget(way: str, value: Any, tmp_path: Path) -> float | None:
    if way == "history":
        with History(tmp_path, "amounts") as h:
            h.set_budget(value)
            return h.budget_usd
    if way == "session":
        session = ImagineSession()
        session.budget_usd = value
        return session.budget_usd
    return ImagineSession(budget_usd=value).budget_usd


@pytest.mark.parametrize("way", ["history", "session", "session(budget_usd=)"])
def test_every_way_of_setting_a_budget_takes_the_same_amounts(tmp_path: Path, way: str) -> None:
    from nbimagine.errors import ConfigError

    for value, usd in BUDGET_AMOUNTS:
        assert _set_budget(way, value, tmp_path) == usd, value
    for value in NOT_BUDGETS:
        with pytest.raises(ConfigError, match="A budget is an amount of US dollars"):
            _set_budget(way, value, tmp_path)


@pytest.mark.parametrize("bad", [str(v) for v in NOT_BUDGETS if isinstance(v, str) and v] + ["1 2"])
@pytest.mark.parametrize("scope", ["", " --session"])
def test_bad_budget_amounts_on_the_magic_line_change_nothing(ip: Any, bad: str, scope: str) -> None:
    from nbimagine import history

    line(ip, f"budget 1.5{scope}")
    with pytest.raises(UsageError) as info:
        line(ip, f"budget {bad}{scope}")
    assert "\n" not in str(info.value)
    assert (get_session().budget_usd if scope else history().budget_usd) == 1.5


def test_a_budget_of_zero_refuses_every_paid_request_and_says_how_to_raise_it(ip: Any, emu: Any) -> None:
    line(ip, "budget 0")
    for cell in ("a boat", "a boat\na kite"):
        with pytest.raises(UsageError, match=r"Not sent: this notebook has spent \$0.00 of its \$0.00 budget.*"
                                             r"%imagine budget 0\.\d\d"):
            imagine(ip, "--each" if "\n" in cell else "", cell)
    assert emu.requests == []


# --- figures a gateway or a tampered history gets wrong never give a budget back --------------------------------


def test_negative_or_malformed_token_counts_are_not_counted() -> None:
    from nbimagine._cost import gemini_usage, openai_usage, price

    hostile = openai_usage({"input_tokens": -10**9, "output_tokens": 5000, "output_tokens_details": {
        "text_tokens": 10**9}}, "gpt-image-1", image_model=True)
    assert hostile.input_tokens == 0 and hostile.output_image_tokens == 0
    assert price(hostile, "openai").usd >= 0
    odd = gemini_usage({"promptTokenCount": "12", "candidatesTokenCount": -7, "promptTokensDetails": [
        {"modality": "TEXT", "tokenCount": "12"}, "junk", {"modality": "IMAGE", "tokenCount": -3}]},
        "gemini-2.5-flash-image")
    assert (odd.input_tokens, odd.output_tokens, odd.input_text_tokens, odd.input_image_tokens) == (0, 0, 0, 0)


def test_a_negative_cost_in_the_history_is_not_spending_given_back(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    with History(tmp_path, "tampered") as h:
        h.add(BinaryResult(png, {"cost_usd": 0.25}), prompt="paid")
        h.add(BinaryResult(png, {"cost_usd": -100.0, "budget_charge_usd": -5}), prompt="forged")
        report = h.cost()
        assert report.total_usd == pytest.approx(0.25) and report.spent_usd == pytest.approx(0.25)


def test_a_repair_after_a_batch_was_collected_brings_back_no_hold(ip: Any, emu: Any) -> None:
    # A repair rebuilds a job's lines from the images that carry them: a line that failed has none and comes
    # back uncollected; the job is collected all the same, so it holds nothing.
    import nbimagine
    from nbimagine import history

    emu.batch_time = 0.2
    line(ip, "budget 5")
    job = nbimagine.submit_batch(["a boat", "a boat [error:400]"], quality="low")
    images = job.wait(progress=False, poll=0.05)
    assert len(images.ok) == 1 and len(images.failures) == 1
    assert history().cost().held_usd == 0
    history().repair()
    assert history().job(job.id).state == "collected" and history().cost().held_usd == 0


def test_a_paid_image_shows_its_cost_on_the_reply_its_caption_the_history_and_the_studio(ip: Any, emu: Any) -> None:
    from nbimagine import history
    from nbimagine._widgets import Studio

    imagine(ip, "-o out --quality low --size 1024x1024", "a lighthouse")
    reply = ip.user_ns["out"]
    usd = reply.cost.usd
    shown = f"{format_usd(usd)} simulated"  # the emulator's figure for the real call
    assert reply.files[0].metadata["cost_usd"] == pytest.approx(usd)
    assert any(shown in out["data"].get("text/plain", "") for out in ip.display_pub.outputs)
    [entry] = history().latest(1)
    assert entry.metadata["cost_usd"] == pytest.approx(usd) and entry.metadata["cost_simulated"] is True
    studio = Studio(get_session(), history(), settings=False)
    try:
        studio.open(entry.id)
        assert ["cost", shown] in studio.view.detail["meta"]
    finally:
        studio.close()


@pytest.mark.parametrize("record", ["--no-history", ""])
def test_a_set_counts_its_spending_with_or_without_the_history(ip: Any, emu: Any, record: str) -> None:
    from nbimagine import history

    line(ip, "budget 5")
    get_session().budget_usd = 5.0
    imagine(ip, f"--each {record} -p gemini -o out", "a fox\na kite")
    images = ip.user_ns["out"]
    paid = sum(reply.cost.usd for result in images.results for reply in result.replies)
    assert paid > 0 and len(history()) == (0 if record else 2)
    assert history().cost().spent_usd == pytest.approx(paid) and get_session().spent_usd == pytest.approx(paid)
    assert not get_session()._holds and history().cost().held_usd == 0

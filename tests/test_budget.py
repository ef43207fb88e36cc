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


@pytest.fixture(autouse=True)
def _no_session_budget() -> Any:
    session = get_session()
    session.budget_usd, session.spent_usd = None, 0.0
    yield
    session.budget_usd, session.spent_usd = None, 0.0


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

"""``%%imagine`` in a real IPython kernel driven over its ZMQ channels (jupyter_client), as a frontend sees it.

What is the kernel's own behaviour is checked here: which message types a cell sends (so that
frontends that ignore display updates still get the images), Ctrl-C delivered as SIGINT at timings
swept across the end of the request, and a history locked by another process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

jupyter_client = pytest.importorskip("jupyter_client")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from jupyter_client.manager import start_new_kernel

    folder = tmp_path_factory.mktemp("kernel")
    env = {**os.environ, "NBIMAGINE_EMULATOR": "1", "NBIMAGINE_HISTORY_BUSY_TIMEOUT": "0.3"}
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(folder), env=env, startup_timeout=120)
    try:
        run(kc, "import json\n%load_ext nbimagine\n%imagine history --notebook kernel_test")
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code: str, *, interrupt_after: float | None = None, trigger=None, km=None,
        timeout: float = 60) -> list[dict]:
    """Execute ``code``; return the IOPub messages of that execution (status messages left out).

    ``interrupt_after``: seconds after which the kernel gets SIGINT (Ctrl-C), counted from the
    request, or from the first message for which ``trigger(msg)`` is true.
    """
    msg_id = kc.execute(code)
    began = time.monotonic()
    start = began if trigger is None else None
    interrupted = interrupt_after is None
    messages = []
    while True:
        if not interrupted and start is not None and time.monotonic() - start >= interrupt_after:
            km.interrupt_kernel()
            interrupted = True
        try:
            msg = kc.get_iopub_msg(timeout=0.01 if not interrupted else 1)
        except Exception:
            if time.monotonic() - (start or began) > timeout:
                raise TimeoutError(f"no idle status after {timeout} s for {code!r}") from None
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if start is None and trigger(msg):
            start = time.monotonic()
        if msg["msg_type"] == "status":
            if msg["content"]["execution_state"] == "idle":
                break
            continue
        if msg["msg_type"] == "execute_input":
            continue
        messages.append(msg)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    return messages


def value(kc, expression: str):
    [msg] = [m for m in run(kc, f"print(json.dumps({expression}))") if m["msg_type"] == "stream"]
    return json.loads(msg["content"]["text"])


def images_in(messages: list[dict]) -> int:
    return sum(1 for m in messages if m["msg_type"] == "display_data"
               and any(k.startswith("image/") for k in m["content"]["data"]))


def no_traceback(messages: list[dict]) -> None:
    for m in messages:
        if m["msg_type"] == "error":
            assert len(m["content"]["traceback"]) <= 1, m["content"]["traceback"]
            assert "Traceback" not in "".join(m["content"]["traceback"])
        if m["msg_type"] == "stream":
            assert "Traceback" not in m["content"]["text"], m["content"]["text"]


def test_the_final_images_reach_frontends_that_only_render_display_data(kernel):
    _, kc = kernel
    messages = run(kc, "%%imagine --partial 2 -o r\na fox in the snow")
    kinds = [m["msg_type"] for m in messages]
    assert "error" not in kinds
    # The progress slot is one display_data updated in place (JupyterLab); the final image is a new
    # display_data, so qtconsole and euporie (which drop updates) show it too.
    assert images_in(messages) == 1
    assert not any(any(k.startswith("image/") for k in m["content"]["data"])
                   for m in messages if m["msg_type"] == "update_display_data")
    first = messages[0]
    assert first["msg_type"] == "display_data" and first["content"]["data"]["text/plain"].endswith("…")
    last_update = [m for m in messages if m["msg_type"] == "update_display_data"][-1]
    assert "1 image below" in last_update["content"]["data"]["text/plain"]
    assert value(kc, "len(r.files)") == 1


def _answer_streaming(msg: dict) -> bool:
    # The reply's text streams after the image call has completed: from here on the image is paid for.
    return msg["msg_type"] == "update_display_data" and "Here is" in msg["content"]["data"]["text/plain"]


# (seconds, counted from the request or from the moment the answer streams): before the answer,
# while it streams, while it is recorded and displayed, and after the cell has ended.
_TIMINGS = [(0.3, None), *((d, _answer_streaming) for d in (0.0, 0.03, 0.1, 0.25, 0.6, 1.0, 1.5)), (4.0, None)]


@pytest.mark.parametrize("n", [1, 2])
def test_ctrl_c_at_any_moment_tells_the_truth_and_loses_nothing(kernel, n):
    km, kc = kernel
    run(kc, "from nbimagine._history import history\nfrom nbimagine._session import emulator\n"
            "emulator().latency = 0.6\nemulator().stream_delay = 0.06")
    outcomes = []
    for delay, trigger in _TIMINGS:
        rows_before = value(kc, "len(history())")
        run(kc, "globals().pop('r', None)")
        messages = run(kc, f"%%imagine -n {n} -o r\na slow painting", interrupt_after=delay, trigger=trigger, km=km)
        no_traceback(messages)
        rows = value(kc, "len(history())") - rows_before
        bound = value(kc, "sum(len(x.files) for x in (r if isinstance(r, list) else [r])) if 'r' in globals() "
                          "else None")
        shown = images_in(messages)
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        outcomes.append((delay, shown, rows, bound, [e["evalue"] for e in errors]))
        assert rows == shown, outcomes[-1]  # every image recorded is shown, and only those
        assert bound == (shown or None), outcomes[-1]  # -o is set whenever images exist
        for error in errors:
            assert error["ename"] == "KeyboardInterrupt"
            if "nothing was recorded" in error["evalue"]:
                assert rows == 0, outcomes[-1]
        assert value(kc, "1 + 1") == 2  # the kernel is usable at once
    assert any(o[1] == 0 for o in outcomes) and any(o[1] == n for o in outcomes), outcomes  # the sweep spans the end
    run(kc, "emulator().latency = 0.0\nemulator().stream_delay = 0.0")


def test_a_history_locked_by_another_process_still_shows_and_binds_the_image(kernel):
    _, kc = kernel
    run(kc, "import json\nfrom nbimagine._history import history")
    index = Path(value(kc, "str(history().path / 'index.sqlite')"))
    holder = sqlite3.connect(index, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        messages = run(kc, "%%imagine -o locked\na kite")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    no_traceback(messages)
    assert [m for m in messages if m["msg_type"] == "error"] == []
    assert images_in(messages) == 1
    warnings = [m["content"]["data"]["text/plain"] for m in messages if m["msg_type"] == "display_data"
                and m["content"]["data"].get("text/plain", "").startswith("ImagineWarning:")]
    assert len(warnings) == 1 and "locked" in warnings[0] and warnings[0].count("\n") == 0
    assert value(kc, "len(locked.files)") == 1

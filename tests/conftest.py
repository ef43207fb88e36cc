"""Shared fixtures. Tests never see real keys and never leave 127.0.0.1."""

from __future__ import annotations

import os
import signal
import threading

import pytest

# A suite started as a background job of a non-interactive shell inherits SIGINT ignored (POSIX), and then every
# Ctrl-C test fails: the process, and the kernels and scripts it starts, get Python's own handler back.
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# httpx2 honours proxy variables; loopback must bypass them.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

KEY_VARS = (
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_CUSTOM_HEADERS",
    "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION",
    "AZURE_OPENAI_IMAGE_DEPLOYMENT",
    "GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE",
    "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_VERTEX_BASE_URL",
    "GOOGLE_GENAI_API_VERSION", "NBIMAGINE_EMULATOR",
)


@pytest.fixture(autouse=True)
def _no_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def emulator_server():
    from nbimagine.emulator import Emulator

    with Emulator() as server:
        yield server


@pytest.fixture
def emu(emulator_server):
    """The shared emulator, reset (no faults, no latency, empty request log) for each test."""
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ctrl_c_when_in_flight(emu):
    """Start a thread that presses Ctrl-C as soon as a request reaches the emulator.

    Returns a list that receives the moment it pressed. Waiting for the request (not a fixed delay)
    matters: run alone, the first call spends ~0.5 s importing the SDK before anything is sent.
    """
    import _thread
    import threading
    import time

    pressed: list[float] = []
    ended = threading.Event()

    def press() -> None:
        deadline = time.time() + 10
        while not emu.requests and time.time() < deadline and not ended.is_set():
            time.sleep(0.01)
        if ended.is_set():  # the test is over: a late press would land in another test
            return
        pressed.append(time.perf_counter())
        _thread.interrupt_main()  # what the kernel's SIGINT handler does

    def start() -> list[float]:
        threading.Thread(target=press, daemon=True).start()
        return pressed

    yield start
    ended.set()


def _reset(session) -> None:
    with session.hold_trait_notifications():
        for name, trait in session.traits().items():
            if not name.startswith("_") and trait.metadata.get("config", True) is not None:
                setattr(session, name, trait.default())


@pytest.fixture
def ip(emu, tmp_path, monkeypatch):
    """A real IPython shell with the extension loaded, the session reset and routed to the test emulator.

    Display output is captured with IPython's own ``CapturingDisplayPublisher`` (display-id updates
    included), on ``shell.display_pub.outputs``.
    """
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    from nbimagine._session import get_session, set_emulator

    monkeypatch.chdir(tmp_path)  # the history goes to tmp_path/.nbimagine
    shell = InteractiveShell.instance()
    if "imagine" not in shell.magics_manager.magics["cell"]:
        shell.run_line_magic("load_ext", "nbimagine")
    session = get_session()
    _reset(session)
    set_emulator(emu)
    session.use(emulator=True)
    publisher = CapturingDisplayPublisher()
    monkeypatch.setattr(shell, "display_pub", publisher)
    shell.user_ns.update(_outputs=publisher.outputs)
    yield shell
    _reset(session)
    set_emulator(None)


@pytest.fixture
def fresh_history(monkeypatch: pytest.MonkeyPatch):
    """No history store, view or notebook name left over from another test (nor from the environment)."""
    from nbimagine import _history

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    _history.set_notebook(None)
    _history._forget_all()
    yield
    _history.set_notebook(None)
    _history._forget_all()


@pytest.fixture
def no_learnt_limits(monkeypatch):
    """Rate limits learnt in one test (image sets) must not pace the next one."""
    from nbimagine import _many

    monkeypatch.setattr(_many, "_LEARNT", {})


@pytest.fixture
def session(emu, tmp_path, monkeypatch):
    """The session routed to the test emulator (OpenAI), the history in tmp_path, batch jobs quick."""
    from nbimagine._session import get_session, set_emulator

    monkeypatch.chdir(tmp_path)
    emu.batch_time = 0.2
    s = get_session()
    before = s.options()
    set_emulator(emu)
    s.use("openai", emulator=True)
    yield s
    s.use(**before)
    set_emulator(None)

"""Run coroutines from synchronous code, even inside a running event loop.

Jupyter's kernel already runs a loop in the main thread, so ``asyncio.run`` fails there. Every
blocking call instead runs on one long-lived background loop; the caller waits in short slices
so that Ctrl-C (``KeyboardInterrupt``) lands at once, cancels the coroutine (which aborts its HTTP
request), waits for it to unwind, and is re-raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared background event loop (started on first use, in a daemon thread)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="nbimagine-loop", daemon=True).start()
            _loop = loop
        return _loop


class Job(Generic[T]):
    """A coroutine running on the background loop."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._started = threading.Event()
        self._finished = threading.Event()
        self.future = asyncio.run_coroutine_threadsafe(self._run(coro), background_loop())

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        self._started.set()
        try:
            return await coro
        finally:
            self._finished.set()

    def result(self, poll: float = 0.05, on_poll: Callable[[], None] | None = None) -> T:
        """Wait for the result, calling ``on_poll`` between slices; Ctrl-C cancels and re-raises."""
        try:
            while True:
                try:
                    value = self.future.result(timeout=poll)
                except concurrent.futures.TimeoutError:
                    if on_poll is not None:
                        on_poll()
                    continue
                if on_poll is not None:
                    on_poll()
                return value
        except KeyboardInterrupt:
            self.cancel()
            raise

    def cancel(self, timeout: float = 5.0) -> None:
        """Cancel, and wait until the coroutine has unwound (its connections are closed, and whatever had
        arrived is recorded), at most ``timeout`` seconds.

        A second Ctrl-C meanwhile does not cut the wait short: the caller would then report (and show)
        what had arrived while it was still being recorded.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.future.cancel()
                if self._started.is_set():
                    self._finished.wait(max(0.0, deadline - time.monotonic()))
                return
            except KeyboardInterrupt:
                if time.monotonic() >= deadline:
                    raise

    def done(self) -> bool:
        return self.future.done()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    return Job(coro).result()

"""Budgets (``%imagine budget``): checked, and held, before a request is sent; settled when it ends.

A budget is checked against what was spent, what requests still in flight hold, and the new requests'
estimated high end; the new requests' share is held in the same step, under a lock: the session's in
this process, the notebook's under the history's write lock (so kernels that share a notebook see each
other's holds, and two cells, threads or kernels cannot both pass a budget that has room for one).

When a request ends, its spending is recorded first (on its images in the history, or in the notebook's
record when it left no image there: ``--no-history``, a text-only answer, a Python API call), then its
hold is given back. A request that made images whose cost is unknown (no usage reported, a stream cut
short after its image) is charged its estimate's high end: budgets count it, reports say so, and no
figure is shown as its cost.

Every path that sends requests goes through here: ``Generation`` (the magic, the studio) holds for all
its requests at once; an image set (``generate_many``, ``--each``) holds for all its prompts before the
first is sent, and each request gives back its share as it ends; a batch job (``submit_batch``,
``--batch``) holds the set at the batch price until its lines are collected; a bare ``Agent.ask`` in a
kernel where the extension is loaded holds for its one request (:func:`install` / :func:`guarded`).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._cost import format_usd
from .errors import BudgetError, ImagineWarning

if TYPE_CHECKING:
    from ._agent import Agent, Reply
    from ._cost import CostReport, Estimate
    from ._history import History
    from ._session import ImagineSession

__all__ = ["Holds", "Standing", "budget_amount", "budget_lines", "guarded", "hold", "install", "job_collected",
           "standings", "subscribe"]

_LOCK = threading.RLock()  # orders every check-and-hold of this process (the session's figures live here)
# Set while a generation's request runs: it holds for its requests itself, so Agent does not hold again.
accounted: ContextVar[bool] = ContextVar("nbimagine_budget_accounted", default=False)


# --- who is told ------------------------------------------------------------------------------------

_listeners: list[Callable[[], None]] = []


def subscribe(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback()`` (from any thread) whenever a budget, the spending or a hold changes; returns the
    function that unsubscribes (the studio's budget line follows ``%imagine budget`` at once)."""
    with _LOCK:
        _listeners.append(callback)

    def unsubscribe() -> None:
        with _LOCK, contextlib.suppress(ValueError):
            _listeners.remove(callback)

    return unsubscribe


def changed() -> None:
    for callback in list(_listeners):
        with contextlib.suppress(Exception):  # a closed widget must not break a request
            callback()


# --- checking and holding --------------------------------------------------------------------------


def budget_amount(value: Any) -> float | None:
    """A budget as given, in US dollars: a number or text (``2``, ``2.5``, ``"2.00"``, ``"$2"``) of 0 or
    more; ``None``, ``"off"`` or ``"none"`` lift it. Anything else (negative, NaN, infinite, ``"abc"``, a
    bool) is a ``ConfigError`` saying what a budget is: read by ``%imagine budget``, ``History.set_budget``
    and ``ImagineSession.budget_usd`` alike."""
    from .errors import ConfigError

    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    usd: float | None = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            usd = float(value.strip().removeprefix("$").strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        usd = float(value)
    if usd is None or not math.isfinite(usd) or usd < 0:
        raise ConfigError(f"A budget is an amount of US dollars, 0 or more (e.g. 2.00), or off to lift it; "
                          f"not {value!r}")
    return usd + 0.0  # -0.0 is 0.0


@dataclass(frozen=True)
class Standing:
    """Where one budget stands: ``spent`` of ``budget`` (US dollars), ``held`` by requests in flight, of which
    ``held_jobs`` by batch jobs whose results are not collected yet (``%imagine jobs``)."""

    scope: str  # "notebook" or "session"
    budget: float
    spent: float
    held: float = 0.0
    held_jobs: float = 0.0

    @property
    def left(self) -> float:
        return self.budget - self.spent - self.held

    def held_text(self) -> str:
        """``$0.08 held by requests in flight`` (and what of it batch jobs hold), or ``""``."""
        if self.held <= 1e-12:
            return ""
        jobs = (f", {format_usd(self.held_jobs)} of it by batch jobs not collected yet (%imagine jobs)"
                if self.held_jobs > 1e-12 else "")
        return f"{format_usd(self.held)} held by requests in flight{jobs}"

    def problem(self, estimate: Estimate) -> str | None:
        """The one-line refusal when ``estimate`` could take this budget past its amount, else None."""
        whose = "this session" if self.scope == "session" else "this notebook"
        flag = " --session" if self.scope == "session" else ""
        if not estimate.known:
            return (f"Not sent: {whose} has a budget of {format_usd(self.budget)}, and the cost of this request "
                    f"cannot be estimated ({estimate.assumptions[-1] if estimate.assumptions else 'no price is known'}"
                    f"). Use a model with a known price, or lift the budget with %imagine budget off{flag}.")
        high = estimate.high_usd or 0.0
        if self.spent + self.held + high <= self.budget + 1e-9:
            return None
        raise_to = math.ceil((self.spent + self.held + high) * 20) / 20  # the next 5 cents that lets it through
        in_flight = f" (and {self.held_text().replace(' held', ' is held', 1)})" if self.held_text() else ""
        what = "this request" if estimate.n == 1 else f"these {estimate.n} requests"
        return (f"Not sent: {whose} has spent {format_usd(self.spent)} of its {format_usd(self.budget)} budget"
                f"{in_flight} and {what} could cost up to {format_usd(high)}"
                f"{' (simulated)' if estimate.simulated else ''}. Raise the budget with %imagine budget "
                f"{raise_to:.2f}{flag}, or lift it with %imagine budget off{flag}.")


def session_standing(session: ImagineSession) -> Standing | None:
    """The session's budget, if set, with what its requests in flight and its batch jobs hold."""
    with _LOCK:
        if session.budget_usd is None:
            return None
        return Standing("session", session.budget_usd, session.spent_usd, sum(session._holds.values()),
                        sum(usd for token, usd in session._holds.items() if token.startswith("job-")))


def notebook_standing(report: CostReport) -> Standing | None:
    """The notebook's budget from its cost report, if set."""
    if report.budget_usd is None:
        return None
    return Standing("notebook", report.budget_usd, report.spent_usd, report.held_usd, report.held_jobs_usd)


def standings(session: ImagineSession, history: History | None) -> list[Standing]:
    """The notebook's and the session's budgets that are set (what ``--dry-run`` and the studio show)."""
    found = [notebook_standing(history.cost())] if history is not None else []
    return [s for s in (*found, session_standing(session)) if s is not None]


@dataclass
class Holds:
    """What one generation (``count`` requests) holds of the budgets, and how its spending is counted.

    ``estimate`` is the estimate of all ``count`` requests (None when it could not be made). ``history`` is
    the notebook whose spending the requests are; ``session`` the kernel session's."""

    session: ImagineSession
    history: History | None
    estimate: Estimate | None
    count: int
    _token: str = field(default_factory=lambda: secrets.token_hex(8))
    _notebook_token: str | None = None
    _open: int = 0

    @property
    def share(self) -> float | None:
        """One request's part of the estimate's high end (what an unknown cost is charged)."""
        if self.estimate is None or self.estimate.high_usd is None:
            return None
        return self.estimate.high_usd / self.count

    def settle(self, reply: Reply | None, images: int, recorded: int, *, provider: str, model: str) -> str | None:
        """Count one request's spending, then give back its share of the holds. ``images`` is how many images
        it made, ``recorded`` how many of them are in the history (they carry their cost). Never raises: a
        problem is returned as a line for a warning (the images are fine)."""
        cost = reply.cost if reply is not None else None
        usd, charged = (cost.usd, False) if cost is not None else (self.share or 0.0, True)
        if charged and not images:
            usd = 0.0  # nothing came back: no image was made, and a failed request is not billed
        try:
            if usd > 0:
                with _LOCK:
                    self.session.spent_usd += usd
                elsewhere = usd if not images else usd * (images - recorded) / images
                if self.history is not None and elsewhere > 1e-12:
                    self.history.add_spending(provider, model or "?", elsewhere, charged=charged,
                                              simulated=bool(cost is not None and cost.simulated))
        except Exception as exc:
            return (f"this request's cost ({format_usd(usd)}) could not be counted in the notebook's history "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); the session's budget counts it")
        finally:
            self._release()
        return None

    def release_all(self) -> None:
        """Give back every hold still open (requests that were never sent), in one step."""
        self._release(everything=True)

    def _release(self, *, everything: bool = False) -> None:
        """Give back one request's share (or all that is still open)."""
        with _LOCK:
            if not self._open:
                return
            self._open = 0 if everything else self._open - 1
            share = self.session._holds.get(self._token, 0.0) / (self._open + 1)
            if self._open:
                self.session._holds[self._token] -= share
            else:
                self.session._holds.pop(self._token, None)
        if self._notebook_token is not None and self.history is not None:
            try:
                self.history.release_budget(self._notebook_token, None if not self._open else share)
            except Exception as exc:  # the hold expires with this process
                warnings.warn(f"nbimagine could not release a budget hold in the history: {exc}", ImagineWarning,
                              stacklevel=3)
        changed()


def hold(session: ImagineSession, history: History | None, estimate: Callable[[], Estimate], count: int, *,
         notebook_required: bool = True, job: str | None = None) -> Holds:
    """Check the session's and the notebook's budgets for ``count`` requests and hold their estimate's high
    end; ``BudgetError`` (one line: spent, held, estimate, budget, how to raise it) when one would be passed.

    ``estimate`` is called once. ``history`` is the notebook the requests are for (None: none known); when
    its budget cannot be read, ``notebook_required`` says whether that is an error (the history is needed
    anyway) or means no notebook budget applies. ``job``: the requests are the lines of the batch job of
    that id: once it is submitted, drop the ``Holds`` without settling it; the notebook's hold is given
    back as its lines are collected (in any kernel), the session's by :func:`job_collected`."""
    try:
        budget = history.budget_usd if history is not None else None
    except Exception:
        if notebook_required:
            raise
        history, budget = None, None
    found: Estimate | None = None
    if budget is not None or session.budget_usd is not None:
        found = estimate()
    else:
        with contextlib.suppress(Exception):  # only needed to charge an unknown cost later
            found = estimate()
    holds = Holds(session, history, found, count)
    if job is not None:
        holds._token = _job_token(job)
    high = found.high_usd if found is not None and found.known else 0.0
    with _LOCK:
        mine = session_standing(session)
        if mine is not None:
            assert found is not None
            problem = mine.problem(found)
            if problem:
                raise BudgetError(problem, scope="session", spent_usd=mine.spent, estimate_usd=found.high_usd,
                                  budget_usd=mine.budget)
        if budget is not None and history is not None:
            assert found is not None

            def check(report: CostReport) -> None:
                standing = notebook_standing(report)
                problem = standing.problem(found) if standing is not None else None
                if problem:
                    raise BudgetError(problem, scope="notebook", spent_usd=report.spent_usd,
                                      estimate_usd=found.high_usd, budget_usd=budget)

            holds._notebook_token = history.hold_budget(high, check, job=job)
        session._holds[holds._token] = high
        holds._open = count
    changed()
    return holds


def _job_token(job: str) -> str:
    return f"job-{job}"


def job_collected(session: ImagineSession, job: str, usd: float) -> None:
    """Batch job ``job``'s lines are collected: when this session submitted it, what they cost (``usd``)
    counts as its spending and its hold is given back (once)."""
    with _LOCK:
        if session._holds.pop(_job_token(job), None) is None:
            return
        session.spent_usd += usd
    changed()


# --- requests made outside a generation (Agent.ask in a kernel) ---------------------------------------

_scopes: Callable[[], tuple[ImagineSession, History | None]] | None = None


def install(scopes: Callable[[], tuple[ImagineSession, History | None]] | None) -> None:
    """Guard every ``Agent`` request of this process with the budgets ``scopes()`` names (the session and the
    running notebook's history); ``%load_ext nbimagine`` installs it, ``None`` removes it."""
    global _scopes
    _scopes = scopes


@contextlib.asynccontextmanager
async def guarded(agent: Agent, inputs: Sequence[Any]) -> AsyncIterator[Callable[[Reply | None, int], None]]:
    """Around one ``Agent`` request: hold the budgets first (``BudgetError`` before anything is sent), and
    yield ``done(reply, images)``, which counts its spending. Does nothing where no guard is installed, or
    inside a generation (which holds for its requests itself)."""
    import asyncio

    scopes = _scopes
    if scopes is None or accounted.get():
        yield lambda reply, images: None
        return
    from ._cost import estimate

    def begin() -> Holds:
        session, history = scopes()
        return hold(session, history, lambda: estimate(agent.config, tools=agent.tools, inputs=inputs), 1,
                    notebook_required=False)

    holds = await asyncio.to_thread(begin)
    settled = False

    def done(reply: Reply | None, images: int) -> None:
        nonlocal settled
        if not settled:
            settled = True
            provider = (reply.provider if reply is not None else None) or agent.config.provider
            model = (reply.model if reply is not None else None) or agent.config.model or "?"
            problem = holds.settle(reply, images, 0, provider=provider, model=model)
            if problem:
                warnings.warn(f"nbimagine: {problem}", ImagineWarning, stacklevel=3)

    try:
        yield done
    finally:
        if not settled:
            await asyncio.shield(asyncio.to_thread(holds.release_all))


# --- showing -----------------------------------------------------------------------------------------


def budget_lines(session: ImagineSession, history: History) -> list[str]:
    """One line per budget set, e.g. ``Notebook budget $2.00: $0.42 spent, $1.58 left`` (also the studio's)."""
    report = history.cost()
    lines = []
    for standing in (notebook_standing(report), session_standing(session)):
        if standing is None:
            continue
        left = standing.left
        line = (f"{standing.scope.capitalize()} budget {format_usd(standing.budget)}: {format_usd(standing.spent)} "
                f"spent, " + (f"{format_usd(left)} left" if left >= -1e-12 else f"{format_usd(-left)} over"))
        if standing.held_text():
            line += f" ({standing.held_text()})"
        lines.append(line)
    if not lines:
        lines.append(f"No budget set; this notebook has spent {format_usd(report.spent_usd)}. "
                     "%imagine budget 2.00 sets one (--session for this kernel session only).")
    elif report.simulated_usd:
        lines.append("Simulated (emulator) figures count too: they are what the real calls would cost.")
    if report.charged_usd:
        lines.append(f"Requests of unknown cost are counted at their estimate's high end "
                     f"({format_usd(report.charged_usd)} in this notebook).")
    return lines

"""Image sets on the providers' batch engines: ``submit_batch`` and :class:`BatchJob`.

A job is written to the notebook's history (its prompts, parameters, parents and how to reach the
provider again, never a secret) before anything is uploaded, and gets the provider's id the moment
the provider answers, so ``nbimagine.jobs()`` / ``%imagine jobs`` find it after a kernel restart.
Collecting results is idempotent: each line (job + ``custom_id``) is recorded in one transaction
that first checks whether it already was, so collecting twice (or from two kernels) adds nothing.

Providers implement the batch side of ``_providers/_base.Provider``: OpenAI uploads a JSONL file of
``/v1/responses`` lines (Files + Batches API), Gemini a JSONL file of ``GenerateContentRequest``s
(Files API + ``batchGenerateContent``). Batch is about half price on both (issue 13's cost module
reads ``JobRecord.params`` and the ``batch_id`` metadata on each image).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._many import ImageSet, PromptResult, as_prompts, prepare_agent
from ._providers._base import BatchStatus, Turn, jsonl_line
from .errors import BatchError, ConfigError, ImagineError, ProviderError

if TYPE_CHECKING:
    from ._agent import Agent
    from ._history import History, JobRecord
    from .config import ProviderConfig

__all__ = ["BatchJob", "jobs", "submit_batch"]

# Lines recorded per history transaction while collecting (one fsync'd commit per chunk, not per line).
_CHUNK = 50
_POLL_FIRST, _POLL_MAX = 0.2, 30.0
# Public config fields that say where a job lives; credentials come from the environment on reconnect.
_CONNECTION_FIELDS = ("model", "base_url", "azure_endpoint", "api_version", "project", "location", "organization",
                      "store")


def submit_batch(
    prompts: Iterable[str] | Any,
    *,
    config: ProviderConfig | None = None,
    tools: Sequence[object] = (),
    n: int = 1,
    history: History | None = None,
    **options: Any,
) -> BatchJob:
    """Send ``prompts`` (a list, or a pandas / polars column) through the provider's batch API and
    return the :class:`BatchJob` at once (results come within the provider's window, 24 h).

    Provider and parameters as :func:`nbimagine.generate_many`: the session's (with ``options``), or
    ``config`` + ``tools``. ``n`` variants per prompt become ``n`` lines. Every request line is built
    (and checked) before anything is uploaded; the job and its prompts are in the history before the
    provider is called. Raises ``ConfigError`` for bad input, a provider without a batch API
    (Vertex AI, Azure) or a set larger than one batch may be (OpenAI: 50,000 requests, a 200 MB
    input file; Gemini: a 2 GB file), ``BudgetError`` when the set could take spending past a budget
    (at the batch price, half; held until its lines are collected), ``ProviderError`` when the
    provider refuses the upload or creation (the job is then marked ``submit_failed``). When the
    answer to the creation is lost (a dropped connection, a timeout, Ctrl-C, a killed kernel), the
    job may exist: it is looked up by its name at once, and again by ``status()`` / ``%imagine jobs
    wait`` if that fails too, so a job that runs (and is paid for) is never lost.
    """
    from ._generate import MAX_VARIANTS, Generation
    from ._session import get_session

    items = as_prompts(prompts)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_VARIANTS:
        raise ConfigError(f"n is the number of variants per prompt, an integer from 1 to {MAX_VARIANTS}, not {n!r}")
    session = get_session()
    agent, params = prepare_agent(config, tools, options, session)
    local_id = uuid.uuid4().hex[:12]
    # The longest prompt stands for all in the budget check, at the batch price (what the lines are
    # billed, see batch_priced), held until the lines are collected.
    label = Generation(max(items, key=len), n=n, overrides=options if config is None else {}, session=session,
                       agent=agent, params=params, history=history)
    holds = label.hold_budget(count=len(items), job=local_id)
    try:
        job = _submit(items, n, label, agent, local_id, options if config is None else None)
    except BaseException:
        try:
            unknown = label.history.job(local_id).state == "submitting"  # it may exist: keep holding
        except KeyError:
            unknown = False
        if not unknown:
            holds.release_all()  # nothing was sent, or the provider refused the job: nothing to hold
        raise
    return job


def _submit(items: list[str], n: int, label: Any, agent: Agent, local_id: str,
            options: dict[str, Any] | None) -> BatchJob:
    """Build every line, record the job, then upload and create it (``submit_batch``)."""
    from ._agent import normalize_inputs

    params = label.params
    if n > 1:
        params["n"] = n
    provider = agent._provider
    max_requests, max_bytes = provider.batch_limits
    where = f"{type(agent.config).__name__}'s batch API"
    if max_requests is not None and len(items) * n > max_requests:
        raise ConfigError(f"A batch holds at most {max_requests:,} requests on {where}; this one would hold "
                          f"{len(items) * n:,} ({len(items):,} prompts x {n}): split the prompts, e.g. "
                          f"submit_batch(prompts[:{max_requests // n}]) and "
                          f"submit_batch(prompts[{max_requests // n}:])")
    lines: list[tuple[str, str]] = []
    data = bytearray()
    for index, prompt in enumerate(items):
        for variant in range(n):
            custom_id = str(index) if n == 1 else f"{index}.{variant}"
            turn = Turn(inputs=normalize_inputs([prompt]), history=None, instructions=None, stream=False)
            data += jsonl_line(provider.batch_request(custom_id, turn))
            lines.append((custom_id, prompt))
            if max_bytes is not None and len(data) > max_bytes:  # said before the whole file is built
                raise ConfigError(f"The batch input file would pass the {max_bytes / 1e6:,.0f} MB {where} takes "
                                  f"(at prompt {index} of {len(items):,}, {len(data) / 1e6:,.0f} MB so far): split "
                                  "the prompts into smaller batches, or shorten them")
    history = label.history
    connection = _connection(agent.config, options, label.session.emulator)
    history.add_job(local_id, provider=label.provider, kind=type(agent.config).provider, model=label.model,
                    params=params, parents=(), connection=connection, lines=lines)
    name = job_name(local_id)
    started = time.time()
    try:
        file_id = _call(provider.batch_upload(bytes(data), name=name))
    except ProviderError:
        history.update_job(local_id, state="submit_failed")  # no job without its input file
        raise
    # Ctrl-C (or a killed kernel) while creating leaves the job "submitting": status() looks it up by name.
    try:
        status = _call(provider.batch_create(file_id, name=name))
    except ProviderError as exc:
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
            history.update_job(local_id, state="submit_failed")  # refused: no job was made
            raise
        # The answer was lost (dropped, timed out, a server error): the job may exist all the same.
        try:
            found = _call(provider.batch_find(name, started))
        except ProviderError:
            raise ProviderError(f"{exc}; the batch job may have been created all the same: nbimagine.jobs() "
                                f"(%imagine jobs wait {local_id}) looks for it again", provider=exc.provider,
                                status=exc.status, code=exc.code, request_id=exc.request_id) from None
        if found is None:
            history.update_job(local_id, state="submit_failed")
            raise
        status = found
    history.update_job(local_id, state=status.state, job_id=status.job_id)
    return BatchJob(history.job(local_id), history=history, agent=agent, last=status)


def _call(coroutine: Any) -> Any:
    """Run a provider's batch call; an error leaving it loses its chain (the SDK errors it was made from
    hold HTTP requests with credential headers), as errors leaving an Agent do."""
    from ._sync import run_sync

    try:
        return run_sync(coroutine)
    except ImagineError as exc:
        exc.detach()
        raise


def job_name(local_id: str) -> str:
    """The name a job is created under at the provider (OpenAI metadata, Gemini display name)."""
    return f"nbimagine-{local_id}"


def jobs(history: History | None = None) -> list[BatchJob]:
    """The batch jobs of this notebook's history, newest first (after a restart too)."""
    if history is None:
        from ._history import history as current_history

        history = current_history()
    return [BatchJob(record, history=history) for record in history.jobs()]


def _connection(config: Any, options: dict[str, Any] | None, emulator: bool) -> dict[str, Any]:
    fields = {name: getattr(config, name) for name in _CONNECTION_FIELDS if getattr(config, name, None) is not None}
    for name in ("base_url", "azure_endpoint"):
        if name in fields:
            fields[name] = _public_url(fields[name])
    out: dict[str, Any] = {"config": type(config).__name__, "fields": fields, "emulator": emulator}
    if options is not None:
        out["options"] = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return out


def _public_url(url: str) -> str:
    """``url`` without user info or query (where credentials hide); the history never holds a secret."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class BatchJob:
    """A batch job on a provider's batch engine, as stored in the notebook's history.

    ``id`` is the provider's job id. ``status()`` asks the provider; ``wait()`` polls until the job
    ends and then collects; ``results()`` collects a finished job's lines into the history (exactly
    once) and returns them as an :class:`~nbimagine.ImageSet`; ``cancel()`` asks the provider to
    stop. A job that ends ``failed``, ``expired`` or ``cancelled`` raises :class:`BatchError` from
    ``wait()`` / ``results()``, carrying every line that did complete.
    """

    def __init__(self, record: JobRecord, *, history: History, agent: Agent | None = None,
                 last: BatchStatus | None = None) -> None:
        self.record = record
        self.history = history
        self._agent = agent
        self.last = last

    @property
    def id(self) -> str:
        return self.record.job_id or self.record.id

    @property
    def prompts(self) -> list[str]:
        return [line.prompt for line in self.history.job_lines(self.record.id)]

    def __repr__(self) -> str:
        state = str(self.last) if self.last is not None else self.record.state
        return (f"BatchJob({self.id!r}, {self.record.provider}/{self.record.model}, {self.record.total} request(s), "
                f"{state})")

    # --- provider calls ----------------------------------------------------------------------------

    def _provider(self) -> Any:
        if self._agent is None:
            self._agent = _reconnect(self.record)
        return self._agent._provider

    def _require_id(self) -> str:
        if self.record.job_id is None and self.record.state == "submitting":
            self._look_up()
        if self.record.job_id is None:
            raise ConfigError(f"batch job {self.record.id} was never created on the provider "
                              f"(state {self.record.state}); submit the prompts again")
        return self.record.job_id

    def _look_up(self) -> None:
        """A job whose creation was never answered (a lost connection, a kernel killed while submitting):
        ask the provider for the job of that name. Found: it is followed as any other. Not there: it was
        never made. The provider cannot be asked: still unknown, said so."""
        from ._budget import job_collected
        from ._session import get_session

        since = self.record.created_at.timestamp()
        try:
            found = _call(self._provider().batch_find(job_name(self.record.id), since))
        except ProviderError as exc:
            raise ProviderError(f"batch job {self.record.id} was being submitted when its kernel stopped, and the "
                                f"provider cannot be asked whether it was created ({exc}); try again later",
                                provider=self.record.provider) from None
        if found is None:
            self.history.update_job(self.record.id, state="submit_failed")  # the notebook's hold ends with it
            job_collected(get_session(), self.record.id, 0.0)
        else:
            self.history.update_job(self.record.id, state=found.state, job_id=found.job_id)
            self.last = found
        self.record = self.history.job(self.record.id)

    def status(self) -> BatchStatus:
        """The job's state as the provider reports it now (also stored in the history)."""
        status = _call(self._provider().batch_status(self._require_id()))
        self._remember(status)
        return status

    def cancel(self) -> BatchStatus:
        """Ask the provider to cancel; lines already done are still collected by ``results()``."""
        status = _call(self._provider().batch_cancel(self._require_id()))
        self._remember(status)
        return status

    def _remember(self, status: BatchStatus) -> None:
        self.last = status
        if self.record.state != "collected":
            self.history.update_job(self.record.id, state=status.state)
            self.record = self.history.job(self.record.id)

    def wait(self, *, timeout: float | None = None, poll: float | None = None, progress: bool = True) -> ImageSet:
        """Poll until the job ends (every ``poll`` s, by default from 0.2 s growing to 30 s), then
        return ``results()``. ``TimeoutError`` after ``timeout`` s; Ctrl-C stops waiting, not the job."""
        from ._many import ProgressBar

        started = time.monotonic()
        delay = poll or _POLL_FIRST
        status = self.status()
        bar = _JobBar(self.record.total, enabled=progress and not status.done, bar=ProgressBar)
        try:
            while not status.done:
                bar.update(status)
                if timeout is not None and time.monotonic() - started > timeout:
                    raise TimeoutError(f"batch job {self.id} is still {status.state} after {timeout:g} s; "
                                       f"wait again later (%imagine jobs wait {self.id})")
                time.sleep(delay)
                delay = poll or min(delay * 1.5, _POLL_MAX)
                status = self.status()
            bar.update(status)
        finally:
            bar.close()
        return self.results(status)

    def results(self, status: BatchStatus | None = None) -> ImageSet:
        """Collect every line of the finished job into the history (exactly once) and return them.

        Raises ``ConfigError`` while the job is still running, :class:`BatchError` (with
        ``.results``) when it ended failed, expired or cancelled.
        """

        status = status or self.status()
        if not status.done:
            raise ConfigError(f"batch job {self.id} is still {status}; use wait() (%imagine jobs wait {self.id})")
        from ._budget import job_collected
        from ._session import get_session

        started = time.perf_counter()
        self._new_replies: list[Any] = []
        lines = {line.custom_id: line for line in self.history.job_lines(self.record.id)}
        collected: dict[str, PromptResult] = {}
        _call(self._collect(status, lines, collected))
        unreported = status.state if status.state != "completed" else "missing from the results"
        missing = [custom_id for custom_id in lines if custom_id not in collected]
        for at in range(0, len(missing), _CHUNK):  # one transaction per chunk, as for the results
            with self.history.batch():
                for custom_id in missing[at:at + _CHUNK]:
                    error = ProviderError(f"not executed: the job ended {status.state}" if status.state != "completed"
                                          else "the provider returned no result for this request",
                                          provider=self.record.provider,
                                          code=f"batch_{unreported}".replace(" ", "_"))
                    entries = self._record(custom_id, [], None, str(error))
                    collected[custom_id] = PromptResult(0, lines[custom_id].prompt, [], entries, error, custom_id)
        results = self._by_prompt(lines, collected)
        images = ImageSet(results, elapsed=time.perf_counter() - started, job_id=self.id, state=status.state)
        self.history.update_job(self.record.id, state="collected" if status.state == "completed" else status.state)
        # Every line has its outcome: the notebook's hold on the job is spent; the session's, when it
        # submitted the job, becomes what the lines cost.
        job_collected(get_session(), self.record.id, sum(r.cost.usd for r in self._new_replies if r.cost))
        self.record = self.history.job(self.record.id)
        if status.state != "completed":
            detail = f" ({'; '.join(status.errors)})" if status.errors else ""
            raise BatchError(f"batch job {self.id} ended {status.state}{detail}: {len(images.ok)} of {len(images)} "
                             "prompt(s) done; their images are in the history and on .results",
                             state=status.state, job_id=self.id, results=images, provider=self.record.provider)
        return images

    async def _collect(self, status: BatchStatus, lines: dict[str, Any], out: dict[str, PromptResult]) -> None:
        import asyncio

        chunk: list[Any] = []

        def record(batch: list[Any]) -> None:
            with self.history.batch():
                for item in batch:
                    self._absorb(item, lines, out)

        async for item in self._provider().batch_results(status):
            if item.custom_id not in lines:
                continue  # not ours (a line we never sent): ignore rather than guess
            chunk.append(item)
            if len(chunk) >= _CHUNK:
                await asyncio.to_thread(record, chunk)
                chunk = []
        if chunk:
            await asyncio.to_thread(record, chunk)

    def _absorb(self, item: Any, lines: dict[str, Any], out: dict[str, PromptResult]) -> None:
        from ._agent import _attach_cost

        line = lines[item.custom_id]
        reply, error = item.reply, item.error
        if reply is not None:
            _attach_cost(reply, self._provider(), batch=True)  # cost_usd on each image, at the batch price
        images = list(reply.files) if reply is not None else list(getattr(error, "files", []) or [])
        # The job and line on each image: what links them again after a repair of the history.
        images = [type(image)(image.data, {**image.metadata, "batch_id": self.id, "batch_job": self.record.id,
                                           "custom_id": item.custom_id})
                  for image in images]
        entries, new = self.history.collect_line(
            self.record, item.custom_id, images, text=(reply.body if reply is not None else None) or None,
            error=None if error is None else f"{type(error).__name__}: {error}")
        if new and reply is not None:
            self._new_replies.append(reply)
        replies = [] if entries or reply is None else [reply]
        out[item.custom_id] = PromptResult(0, line.prompt, replies, entries, error, item.custom_id)

    def _record(self, custom_id: str, images: list[Any], text: str | None, error: str | None) -> list[Any]:
        entries, _ = self.history.collect_line(self.record, custom_id, images, text=text or None, error=error)
        return entries

    def _by_prompt(self, lines: dict[str, Any], collected: dict[str, PromptResult]) -> list[PromptResult]:
        grouped: dict[int, PromptResult] = {}
        for custom_id, line in sorted(lines.items(), key=lambda kv: kv[1].position):
            index = int(custom_id.split(".")[0])
            part = collected[custom_id]
            target = grouped.setdefault(index, PromptResult(index, line.prompt, custom_id=custom_id.split(".")[0]))
            target.replies += part.replies
            target.entries += part.entries
            target.error = target.error or part.error
        return [grouped[i] for i in sorted(grouped)]


class _JobBar:
    def __init__(self, total: int, *, enabled: bool, bar: Any) -> None:
        self._bar = bar(total, enabled=enabled, desc="batch")

    def update(self, status: BatchStatus) -> None:
        inner = self._bar._bar
        if inner is None:
            return
        finished = (status.completed or 0) + (status.failed or 0)
        if finished > inner.n:
            inner.update(finished - inner.n)
        inner.set_postfix(state=status.state, failed=status.failed or 0, refresh=True)

    def close(self) -> None:
        if self._bar._bar is not None:
            self._bar._bar.close()


def _reconnect(record: JobRecord) -> Agent:
    """An agent that reaches the provider holding ``record`` (credentials from the environment)."""
    from . import config as configs
    from ._agent import Agent
    from ._session import _route_to_emulator, get_session

    connection = dict(record.connection)
    session = get_session()
    if connection.get("emulator") and not session.emulator:
        raise ConfigError(f"batch job {record.job_id or record.id} was made on the emulator; run "
                          "%imagine emulator on (or set NBIMAGINE_EMULATOR=1) to reach it")
    if "options" in connection:
        built = session.build_agent(**{**connection["options"], "provider": record.provider})
        return Agent(built.name, config=built.config.replace(max_retries=0), tools=built.tools)
    cls = getattr(configs, str(connection.get("config")), None)
    if not isinstance(cls, type) or not issubclass(cls, configs.ProviderConfig):
        raise ConfigError(f"batch job {record.job_id or record.id} names an unknown config "
                          f"{connection.get('config')!r}")
    config = cls(**dict(connection.get("fields") or {}))
    if connection.get("emulator"):
        config = _route_to_emulator(config)
    return Agent(f"imagine-{record.provider}", config=config.replace(max_retries=0))

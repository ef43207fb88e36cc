"""Batch engines: OpenAI Files + Batches and Gemini ``batchGenerateContent`` (+ its Files API).

Wire shapes follow the SDKs' own types (``openai.types.Batch``, ``FileObject``; google-genai's
``_BatchJob_from_mldev``, ``_InlinedResponse_from_mldev``, the resumable upload in
``_api_client._async_upload_fd``) and the vendors' reference pages (OpenAI "Batch API" guide and
``/v1/batches`` reference; Google "Batch API" reference, ``GenerateContentBatch`` / ``BatchStats``).

Each line of a batch is executed by the emulator's own route for that endpoint, so a line behaves
exactly as the same request sent on its own: ``[error:NNN]`` / ``[fault:NAME]`` tokens in a prompt
make that line fail, and whatever the synchronous route validates, the batch validates too.

Time is compressed: a job moves through its states over ``State.batch_time`` seconds
(OpenAI: validating -> in_progress -> finalizing -> completed; Gemini: PENDING -> RUNNING ->
SUCCEEDED), and expires after ``State.batch_expiry`` seconds (the real 24 h window) with the
lines done so far in the output and the rest reported as expired. Job faults
(``emu.inject("batch_expired")``, ``"batch_failed"``, ``"batch_create_lost"``) apply to the next batch
created. The limits of one batch are the client's (``nbimagine.config``): OpenAI refuses an input file over
200 MB at upload and fails a batch of more than 50,000 requests at validation; Gemini takes files up to 2 GB.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..config import GEMINI_BATCH_MAX_BYTES, OPENAI_BATCH_MAX_BYTES, OPENAI_BATCH_MAX_REQUESTS
from ._server import Answer, Request, State

__all__ = ["BATCH_FAULTS", "route"]

# Job-level faults (per-line failures use the ordinary [error:NNN] / [fault:NAME] prompt tokens).
BATCH_FAULTS = {
    "batch_expired": "the next batch expires half-way: the lines done so far are in the output, the rest "
                     "fail with batch_expired (OpenAI) / the job ends BATCH_STATE_EXPIRED (Gemini)",
    "batch_failed": "the next batch fails validation: status failed (OpenAI, with errors.data) / "
                    "BATCH_STATE_FAILED (Gemini)",
    "batch_create_lost": "the next batch is created, but the connection drops before its answer is sent (the "
                         "client must find the job by its name, or it runs and is paid for unseen)",
}
# OpenAI: every endpoint a batch accepts (openai.types.batch_create_params.BatchCreateParams.endpoint).
OPENAI_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos")
# OpenAI FileObject.purpose values accepted on upload.
OPENAI_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_GEMINI_STATES = {"validating": "BATCH_STATE_PENDING", "in_progress": "BATCH_STATE_RUNNING",
                  "finalizing": "BATCH_STATE_RUNNING", "cancelling": "BATCH_STATE_RUNNING",
                  "completed": "BATCH_STATE_SUCCEEDED", "failed": "BATCH_STATE_FAILED",
                  "cancelled": "BATCH_STATE_CANCELLED", "expired": "BATCH_STATE_EXPIRED"}
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})

_OPENAI_FILE = re.compile(r"^(?:/openai)?/v1/files(?:/(?P<id>[^/]+)(?P<content>/content)?)?$")
_OPENAI_BATCH = re.compile(r"^(?:/openai)?/v1/batches(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?$")
_GEMINI_CREATE = re.compile(r"^/(?P<version>v1beta|v1alpha|v1)/models/(?P<model>[^/:]+):batchGenerateContent$")
_GEMINI_BATCH = re.compile(r"^/(?P<version>v1beta|v1alpha|v1)/batches(?:/(?P<id>[^/:]+)(?P<cancel>:cancel)?)?$")
_GEMINI_UPLOAD = re.compile(r"^/upload/(?P<version>v1beta|v1alpha|v1)/files$")
_GEMINI_FILE = re.compile(
    r"^(?:/download)?/(?P<version>v1beta|v1alpha|v1)/files/(?P<id>[^/:]+)(?P<download>:download)?$")


# --- jobs ------------------------------------------------------------------------------------------------


@dataclass
class _Line:
    key: str  # OpenAI custom_id / Gemini key (or the request's index for inline requests)
    body: Any  # the request body
    metadata: Any = None  # Gemini inline request metadata, echoed back
    status: int | None = None  # HTTP status of its execution; None while pending
    answer: Any = None  # JSON answer of its execution
    request_id: str = ""


@dataclass
class _Job:
    vendor: str  # "openai" | "gemini"
    id: str
    lines: list[_Line]
    execute: Callable[[_Line], tuple[int, Any, str]]
    created: float
    info: dict[str, Any]  # vendor fields fixed at creation (endpoint, model, display name, files...)
    status: str = "validating"
    stamps: dict[str, float] = field(default_factory=dict)  # status -> when it was entered
    errors: list[dict[str, Any]] = field(default_factory=list)
    fault: str | None = None
    cancel_requested: bool = False
    output_file: str | None = None
    error_file: str | None = None

    @property
    def done(self) -> int:
        return sum(1 for line in self.lines if line.status is not None)

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.status is not None and line.status != 200)

    def enter(self, status: str) -> None:
        self.status = status
        self.stamps[status] = time.time()


def _jobs(state: State) -> dict[str, _Job]:
    with state.lock:
        return state.store.setdefault("batch:jobs", {})


def _files(state: State) -> dict[str, dict[str, Any]]:
    with state.lock:
        return state.store.setdefault("batch:files", {})


def _start(state: State, job: _Job) -> None:
    fault = state.fault(job.vendor, "", route="batch")  # one per creation: how the job ends, or its answer lost
    job.fault = fault.name if fault is not None else None
    with state.lock:
        _jobs(state)[job.id] = job
    threading.Thread(target=_work, args=(state, job), name=f"emulator-batch-{job.id}", daemon=True).start()


def _work(state: State, job: _Job) -> None:
    """Move ``job`` through its states; execute its lines during in_progress."""

    def alive() -> bool:  # reset() (or a delete) drops the job: its worker stops
        return job.id in _jobs(state)

    total = max(state.batch_time, 0.0)
    started = time.monotonic()
    expiry = state.batch_expiry
    if job.fault == "batch_expired":
        expiry = None  # expires after half the lines, whatever the time
    time.sleep(total * 0.1)
    if not alive():
        return
    if job.fault == "batch_failed":
        job.errors.append({"code": "invalid_request", "line": 1, "message": "The batch input file is invalid "
                           "(emulated batch_failed fault).", "param": None})
        job.enter("failed")
        return
    with state.lock:
        if not job.cancel_requested:
            job.enter("in_progress")
    budget = total * 0.7
    outcome = "completed"
    for index, line in enumerate(job.lines):
        if not alive():
            return
        if job.cancel_requested:
            outcome = "cancelled"
            break
        if job.fault == "batch_expired" and index >= len(job.lines) // 2:
            outcome = "expired"
            break
        if expiry is not None and time.monotonic() - started > expiry:
            outcome = "expired"
            break
        try:
            line.status, line.answer, line.request_id = job.execute(line)
        except Exception as exc:  # an emulator bug: the line fails, the job goes on
            line.status, line.answer, line.request_id = 500, {"error": {
                "message": f"nbimagine emulator internal error: {exc!r}", "type": "server_error"}}, ""
        # Spread the lines over the in_progress phase so that progress is visible.
        ahead = started + total * 0.1 + budget * (index + 1) / max(len(job.lines), 1) - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    if not alive():
        return
    if job.cancel_requested:
        outcome = "cancelled"
    if outcome == "cancelled":
        with state.lock:
            job.enter("cancelling")
        time.sleep(total * 0.1)
    elif outcome == "completed":
        with state.lock:
            job.enter("finalizing")
        time.sleep(total * 0.2)
    if not alive():
        return
    with state.lock:
        _finish(state, job, outcome)
        job.enter(outcome)


def _finish(state: State, job: _Job, outcome: str) -> None:
    if job.vendor == "openai":
        _openai_output(state, job, outcome)
    else:
        _gemini_output(state, job, outcome)


def _cancel(state: State, job: _Job) -> None:
    with state.lock:
        if job.status in TERMINAL or job.cancel_requested:
            return
        job.cancel_requested = True
        job.enter("cancelling")  # the real API answers the cancel call with status cancelling


def _execute_route(state: State, method: str, path: str, headers: dict[str, str],
                   body: Any) -> tuple[int, Any, str]:
    from ._server import _route

    raw = json.dumps(body).encode()
    request = Request(method, path, {}, headers, raw, body, state.next_request_id())
    answer = _route(request, state)
    if answer.sse is not None:  # a stream cannot be batched: the real service refuses such a line
        for _ in answer.sse:
            pass
        return 400, {"error": {"message": "Streaming is not supported in batch requests.",
                               "type": "invalid_request_error", "param": "stream", "code": None}}, request.request_id
    if answer.break_after is not None:
        return 500, {"error": {"message": "The server had an error while processing your request.",
                               "type": "server_error", "param": None, "code": None}}, request.request_id
    return answer.status, answer.json, request.request_id


def _created(job: _Job, answer: Any) -> Answer:
    """The answer to a batch creation (dropped mid-body under the batch_create_lost fault: the job exists)."""
    return Answer(json=answer, break_after=0 if job.fault == "batch_create_lost" else None)


def _auth_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k in ("authorization", "api-key", "x-goog-api-key")}


# --- routing ------------------------------------------------------------------------------------------


def route(request: Request, state: State) -> Answer | None:
    """The answer for a Files / Batches request, or None when the path is not one of them."""
    path = request.path.rstrip("/")
    for pattern, handler in ((_OPENAI_FILE, _openai_files), (_OPENAI_BATCH, _openai_batches),
                             (_GEMINI_CREATE, _gemini_create), (_GEMINI_BATCH, _gemini_batches),
                             (_GEMINI_UPLOAD, _gemini_upload), (_GEMINI_FILE, _gemini_file)):
        match = pattern.match(path)
        if match:
            return handler(request, state, match)
    return None


# --- OpenAI ----------------------------------------------------------------------------------------------


def _oa_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
              type_: str = "invalid_request_error") -> Answer:
    return Answer(status, json={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _oa_authorised(request: Request) -> bool:
    auth = request.headers.get("authorization", "")
    return bool((auth.lower().startswith("bearer ") and auth[7:].strip()) or request.headers.get("api-key"))


_NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
           "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def _file_object(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("id", "object", "bytes", "created_at", "filename", "purpose", "status",
                                 "expires_at", "status_details")}


def _store_openai_file(state: State, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
    created = int(time.time())
    meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data), "created_at": created,
            "filename": filename, "purpose": purpose, "status": "processed",
            # Batch files expire after 30 days by default (OpenAI Files API reference, expires_after).
            "expires_at": created + 30 * 86400 if purpose in ("batch", "batch_output") else None,
            "status_details": None, "vendor": "openai", "data": data}
    _files(state)[meta["id"]] = meta
    return meta


def _multipart(request: Request) -> dict[str, tuple[bytes, str | None]]:
    """Form fields of a multipart/form-data body: name -> (bytes, filename)."""
    ctype = request.headers.get("content-type", "")
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    fields: dict[str, tuple[bytes, str | None]] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_payload(decode=True) or b"", part.get_filename())
    return fields


def _openai_files(request: Request, state: State, match: re.Match[str]) -> Answer:
    if not _oa_authorised(request):
        return _oa_error(401, _NO_KEY, code="invalid_api_key")
    file_id = match["id"]
    if file_id is None:
        if request.method == "GET":
            data = [_file_object(m) for m in _files(state).values() if m.get("vendor") == "openai"]
            return Answer(json={"object": "list", "data": data, "has_more": False,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None})
        if request.method != "POST":
            return _oa_error(405, f"Method {request.method} is not allowed on {request.path}.")
        fields = _multipart(request)
        if "file" not in fields:
            return _oa_error(400, "Missing required parameter: 'file'.", param="file",
                             code="missing_required_parameter")
        if "purpose" not in fields:
            return _oa_error(400, "Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
        purpose = fields["purpose"][0].decode(errors="replace")
        if purpose == "batch" and len(fields["file"][0]) > OPENAI_BATCH_MAX_BYTES:
            return _oa_error(400, f"File is too large ({len(fields['file'][0]):,} bytes): a batch input file can be "
                             f"up to {OPENAI_BATCH_MAX_BYTES // 1_000_000} MB.", param="file",
                             code="file_too_large")
        if purpose not in OPENAI_PURPOSES:
            return _oa_error(400, f"Invalid value: '{purpose}'. Supported values are: "
                             + ", ".join(f"'{p}'" for p in OPENAI_PURPOSES) + ".", param="purpose",
                             code="invalid_value")
        data, filename = fields["file"]
        if purpose == "batch":
            problem = _check_jsonl(data)
            if problem:
                return _oa_error(400, problem, param="file", code="invalid_file_format")
        meta = _store_openai_file(state, data, filename or "upload", purpose)
        return Answer(json=_file_object(meta))
    meta = _files(state).get(file_id)
    if meta is None or meta.get("vendor") != "openai":
        return _oa_error(404, f"No such File object: {file_id}", param="id")
    if match["content"]:
        if request.method != "GET":
            return _oa_error(405, f"Method {request.method} is not allowed on {request.path}.")
        return Answer(body=meta["data"])
    if request.method == "DELETE":
        del _files(state)[file_id]
        return Answer(json={"id": file_id, "object": "file", "deleted": True})
    return Answer(json=_file_object(meta))


def _check_jsonl(data: bytes) -> str | None:
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            json.loads(raw)
        except ValueError:
            return f"Invalid file format for Batch API. Line {number} is not valid JSON. Must be .jsonl"
    return None


def _openai_batch_object(job: _Job) -> dict[str, Any]:
    stamp = {k: int(v) for k, v in job.stamps.items()}
    done, failed = job.done, job.failed
    return {
        "id": job.id, "object": "batch", "endpoint": job.info["endpoint"], "model": job.info.get("model"),
        "errors": {"object": "list", "data": job.errors} if job.errors else None,
        "input_file_id": job.info["input_file_id"], "completion_window": "24h", "status": job.status,
        "output_file_id": job.output_file, "error_file_id": job.error_file,
        "created_at": int(job.created), "in_progress_at": stamp.get("in_progress"),
        "expires_at": int(job.created) + 86400, "finalizing_at": stamp.get("finalizing"),
        "completed_at": stamp.get("completed"), "failed_at": stamp.get("failed"),
        "expired_at": stamp.get("expired"), "cancelling_at": stamp.get("cancelling"),
        "cancelled_at": stamp.get("cancelled"),
        "request_counts": {"total": len(job.lines), "completed": done - failed, "failed": failed},
        "usage": None, "metadata": job.info.get("metadata") or None,
    }


def _openai_batches(request: Request, state: State, match: re.Match[str]) -> Answer:
    if not _oa_authorised(request):
        return _oa_error(401, _NO_KEY, code="invalid_api_key")
    batch_id = match["id"]
    if batch_id is None:
        if request.method == "GET":
            jobs = [j for j in _jobs(state).values() if j.vendor == "openai"]
            data = [_openai_batch_object(j) for j in sorted(jobs, key=lambda j: -j.created)]
            return Answer(json={"object": "list", "data": data, "has_more": False,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None})
        if request.method != "POST":
            return _oa_error(405, f"Method {request.method} is not allowed on {request.path}.")
        return _openai_create(request, state)
    job = _jobs(state).get(batch_id)
    if job is None or job.vendor != "openai":
        return _oa_error(404, f"No batch found with id '{batch_id}'.", param="batch_id")
    if match["cancel"]:
        if request.method != "POST":
            return _oa_error(405, f"Method {request.method} is not allowed on {request.path}.")
        if job.status in TERMINAL:
            return _oa_error(409, f"Cannot cancel a batch with status '{job.status}'.")
        _cancel(state, job)
    elif request.method != "GET":
        return _oa_error(405, f"Method {request.method} is not allowed on {request.path}.")
    with state.lock:
        return Answer(json=_openai_batch_object(job))


def _openai_create(request: Request, state: State) -> Answer:
    body = request.json if isinstance(request.json, dict) else None
    if body is None:
        return _oa_error(400, "We could not parse the JSON body of your request.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not body.get(name):
            return _oa_error(400, f"Missing required parameter: '{name}'.", param=name,
                             code="missing_required_parameter")
    if body["completion_window"] != "24h":
        return _oa_error(400, f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'.",
                         param="completion_window", code="invalid_value")
    endpoint = body["endpoint"]
    if endpoint not in OPENAI_ENDPOINTS:
        return _oa_error(400, f"Invalid value: '{endpoint}'. Supported values are: "
                         + ", ".join(f"'{e}'" for e in OPENAI_ENDPOINTS) + ".", param="endpoint",
                         code="invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
            for k, v in metadata.items())):
        return _oa_error(400, "Invalid 'metadata': at most 16 pairs, keys up to 64 and values up to 512 "
                              "characters, both strings.", param="metadata", code="invalid_value")
    meta = _files(state).get(body["input_file_id"])
    if meta is None or meta.get("vendor") != "openai":
        return _oa_error(404, f"No such File object: {body['input_file_id']}", param="input_file_id")
    if meta["purpose"] != "batch":
        return _oa_error(400, f"File {meta['id']} has purpose '{meta['purpose']}'; a batch needs a file "
                              "uploaded with purpose 'batch'.", param="input_file_id")
    lines: list[_Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model = None
    for number, raw in enumerate(meta["data"].splitlines(), 1):
        if not raw.strip():
            continue
        item = json.loads(raw)
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        problem = None
        if not isinstance(custom_id, str) or not custom_id:
            problem = ("missing_required_parameter", "Missing required parameter: 'custom_id'.", "custom_id")
        elif custom_id in seen:
            problem = ("duplicate_custom_id", f"The custom_id '{custom_id}' is used more than once. Each "
                       "request in a batch needs a unique custom_id.", "custom_id")
        elif item.get("method") != "POST":
            problem = ("invalid_value", "Only the POST method is supported in a batch.", "method")
        elif item.get("url") != endpoint:
            problem = ("mismatched_endpoint", f"The url '{item.get('url')}' does not match the batch's endpoint "
                       f"'{endpoint}'.", "url")
        elif not isinstance(item.get("body"), dict):
            problem = ("missing_required_parameter", "Missing required parameter: 'body'.", "body")
        if problem:
            errors.append({"code": problem[0], "message": problem[1], "param": problem[2], "line": number})
            continue
        seen.add(custom_id)
        model = model or item["body"].get("model")
        lines.append(_Line(custom_id, item["body"]))
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None,
                       "line": None})
    if len(lines) > OPENAI_BATCH_MAX_REQUESTS:
        errors.append({"code": "too_many_requests", "message": f"The input file has {len(lines):,} requests; a "
                       f"batch can contain up to {OPENAI_BATCH_MAX_REQUESTS:,}.", "param": None, "line": None})
    headers = _auth_headers(request)
    prefix = "/openai" if request.path.startswith("/openai/") else ""

    def execute(line: _Line) -> tuple[int, Any, str]:
        return _execute_route(state, "POST", prefix + endpoint, headers, line.body)

    job = _Job("openai", f"batch_{uuid.uuid4().hex[:24]}", lines, execute, time.time(),
               {"endpoint": endpoint, "input_file_id": meta["id"], "metadata": metadata, "model": model})
    job.enter("validating")
    if errors:  # the real service rejects the whole file when a line is malformed
        job.errors = errors
        job.enter("failed")
        with state.lock:
            _jobs(state)[job.id] = job
    else:
        _start(state, job)
    with state.lock:
        return _created(job, _openai_batch_object(job))


def _openai_output(state: State, job: _Job, outcome: str) -> None:
    ok: list[bytes] = []
    bad: list[bytes] = []
    for line in job.lines:
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.key}
        if line.status is None:
            code, message = {
                "expired": ("batch_expired", "This request could not be executed before the completion window "
                                             "expired."),
                "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
            }.get(outcome, ("batch_failed", "This request was not executed."))
            record.update(response=None, error={"code": code, "message": message})
            bad.append(json.dumps(record).encode())
            continue
        record.update(response={"status_code": line.status, "request_id": line.request_id, "body": line.answer},
                      error=None)
        (ok if line.status == 200 else bad).append(json.dumps(record).encode())
    if ok:
        job.output_file = _store_openai_file(state, b"\n".join(ok) + b"\n", f"{job.id}_output.jsonl",
                                             "batch_output")["id"]
    if bad:
        job.error_file = _store_openai_file(state, b"\n".join(bad) + b"\n", f"{job.id}_error.jsonl",
                                            "batch_output")["id"]


# --- Gemini ----------------------------------------------------------------------------------------------


def _g_error(status: int, message: str) -> Answer:
    from ._gemini import error

    return error(status, message)


def _g_authorised(request: Request) -> bool:
    auth = request.headers.get("authorization", "")
    return bool(request.headers.get("x-goog-api-key") or (auth.lower().startswith("bearer ") and auth[7:].strip()))


_G_NO_KEY = ("Method doesn't allow unregistered callers (callers without established identity). Please use API "
             "Key or other form of API consumer identity to call this API.")


def _rfc3339(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _gemini_operation(job: _Job) -> dict[str, Any]:
    done, failed = job.done, job.failed
    state = _GEMINI_STATES[job.status]
    stats = {"requestCount": str(len(job.lines)), "successfulRequestCount": str(done - failed),
             "failedRequestCount": str(failed), "pendingRequestCount": str(len(job.lines) - done)}
    batch: dict[str, Any] = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": f"models/{job.info['model']}", "name": job.id, "displayName": job.info["display_name"],
        "createTime": _rfc3339(job.created), "updateTime": _rfc3339(max(job.stamps.values())),
        "batchStats": stats, "state": state,
        "inputConfig": {"fileName": job.info["file_name"]} if job.info.get("file_name") else {"requests": {}},
    }
    terminal = job.status in TERMINAL
    if terminal:
        batch["endTime"] = _rfc3339(job.stamps[job.status])
    output = job.info.get("output")
    if output is not None:
        batch["output"] = output
    operation: dict[str, Any] = {"name": job.id, "metadata": batch}
    if terminal:
        operation["done"] = True
        if job.status == "cancelled":
            operation["error"] = {"code": 1, "message": "The batch was cancelled."}
        elif job.status == "failed":
            operation["error"] = {"code": 3, "message": job.errors[0]["message"] if job.errors else "failed"}
        elif output is not None:
            operation["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
                **output}
    return operation


def _gemini_create(request: Request, state: State, match: re.Match[str]) -> Answer:
    if not _g_authorised(request):
        return _g_error(403, _G_NO_KEY)
    if request.method != "POST":
        return _g_error(404, f"The emulator has no Gemini route {request.method} {request.path}")
    body = request.json if isinstance(request.json, dict) else None
    batch = body.get("batch") if body else None
    if not isinstance(batch, dict):
        return _g_error(400, "* BatchGenerateContentRequest.batch: required field is not set")
    input_config = batch.get("inputConfig", batch.get("input_config"))
    if not isinstance(input_config, dict):
        return _g_error(400, "* BatchGenerateContentRequest.batch.input_config: required field is not set")
    model = match["model"]
    version = match["version"]
    requests = input_config.get("requests")
    file_name = input_config.get("fileName", input_config.get("file_name"))
    if (requests is None) == (file_name is None):
        return _g_error(400, "* BatchGenerateContentRequest.batch.input_config.source: exactly one of "
                             "file_name and requests must be set")
    lines: list[_Line] = []
    if requests is not None:
        items = requests.get("requests") if isinstance(requests, dict) else None
        if not isinstance(items, list) or not items:
            return _g_error(400, "* BatchGenerateContentRequest.batch.input_config.requests.requests: "
                                 "must not be empty")
        size = len(request.body)
        # Google's limit for inline requests (Batch API guide: "keep the total request size under 20MB").
        if size > 20 * 1024 * 1024:
            return _g_error(400, f"Request payload size exceeds the limit: {size} bytes (inline batch requests "
                                 "are limited to 20 MB; upload a JSONL file with the Files API instead).")
        for index, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                return _g_error(400, f"* BatchGenerateContentRequest.batch.input_config.requests.requests[{index}]"
                                     ".request: required field is not set")
            lines.append(_Line(str(index), item["request"], item.get("metadata")))
    else:
        meta = _files(state).get(str(file_name).removeprefix("files/"))
        if meta is None or meta.get("vendor") != "gemini":
            return _g_error(404, f"File {file_name} not found or you do not have permission to access it.")
        for index, raw in enumerate(meta["data"].splitlines()):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError:
                return _g_error(400, f"Line {index + 1} of {file_name} is not valid JSON.")
            if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                return _g_error(400, f"Line {index + 1} of {file_name} has no 'request' object.")
            lines.append(_Line(str(item.get("key", index)), item["request"]))
    headers = _auth_headers(request)

    def execute(line: _Line) -> tuple[int, Any, str]:
        target = str(line.body.get("model") or model).removeprefix("models/")
        body = {k: v for k, v in line.body.items() if k != "model"}
        return _execute_route(state, "POST", f"/{version}/models/{target}:generateContent", headers, body)

    display = batch.get("displayName", batch.get("display_name")) or "batch"
    job = _Job("gemini", f"batches/{uuid.uuid4().hex[:20]}", lines, execute, time.time(),
               {"model": model, "display_name": display, "file_name": file_name, "version": version})
    job.enter("validating")
    _start(state, job)
    with state.lock:
        return _created(job, _gemini_operation(job))


def _gemini_batches(request: Request, state: State, match: re.Match[str]) -> Answer:
    if not _g_authorised(request):
        return _g_error(403, _G_NO_KEY)
    batch_id = match["id"]
    if batch_id is None:
        if request.method != "GET":
            return _g_error(404, f"The emulator has no Gemini route {request.method} {request.path}")
        jobs = sorted((j for j in _jobs(state).values() if j.vendor == "gemini"), key=lambda j: -j.created)
        with state.lock:
            return Answer(json={"operations": [_gemini_operation(j) for j in jobs]})
    job = _jobs(state).get(f"batches/{batch_id}")
    if job is None:
        return _g_error(404, f"Batch batches/{batch_id} not found.")
    if match["cancel"]:
        if request.method != "POST":
            return _g_error(404, f"The emulator has no Gemini route {request.method} {request.path}")
        if job.status in TERMINAL:
            return _g_error(400, f"Batch {job.id} is already in a terminal state ({_GEMINI_STATES[job.status]}).")
        _cancel(state, job)
        return Answer(json={})
    if request.method == "DELETE":
        with state.lock:
            _jobs(state).pop(job.id, None)
        return Answer(json={})
    if request.method != "GET":
        return _g_error(404, f"The emulator has no Gemini route {request.method} {request.path}")
    with state.lock:
        return Answer(json=_gemini_operation(job))


def _status(answer: Any, status: int) -> dict[str, Any]:
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        return {k: error[k] for k in ("code", "message", "details") if k in error}
    return {"code": status, "message": "The request failed."}


def _gemini_output(state: State, job: _Job, outcome: str) -> None:
    if outcome not in ("completed", "expired", "cancelled"):
        return
    results: list[tuple[_Line, dict[str, Any]]] = []
    for line in job.lines:
        if line.status is None:
            continue  # never executed: no entry (the job's state says why)
        if line.status == 200:
            results.append((line, {"response": line.answer}))
        else:
            results.append((line, {"error": _status(line.answer, line.status)}))
    if job.info.get("file_name"):
        # Output file lines carry the input line's key (Batch API guide, "Input file").
        text = b"".join(json.dumps({"key": line.key, **item}).encode() + b"\n" for line, item in results)
        meta = _store_gemini_file(state, text, "application/jsonl", source="GENERATED",
                                  name=f"batch-{job.id.removeprefix('batches/')}", version=job.info["version"])
        job.info["output"] = {"responsesFile": meta["name"]}
    else:
        inlined = []
        for line, item in results:
            if line.metadata is not None:
                item = {**item, "metadata": line.metadata}
            inlined.append(item)
        job.info["output"] = {"inlinedResponses": {"inlinedResponses": inlined}}


def _gemini_file_resource(meta: dict[str, Any]) -> dict[str, Any]:
    out = {"name": meta["name"], "mimeType": meta["mime_type"], "sizeBytes": str(len(meta["data"])),
           "createTime": _rfc3339(meta["created"]), "updateTime": _rfc3339(meta["created"]),
           "expirationTime": _rfc3339(meta["created"] + 48 * 3600),  # Files API: kept for 48 hours
           "sha256Hash": base64.b64encode(hashlib.sha256(meta["data"]).hexdigest().encode()).decode(),
           "uri": meta["uri"], "state": "ACTIVE", "source": meta["source"]}
    if meta.get("display_name"):
        out["displayName"] = meta["display_name"]
    if meta["source"] == "GENERATED":
        out["downloadUri"] = meta["uri"] + ":download?alt=media"
    return out


def _store_gemini_file(state: State, data: bytes, mime_type: str, *, source: str, name: str | None = None,
                       display_name: str | None = None, version: str = "v1beta") -> dict[str, Any]:
    file_id = name or uuid.uuid4().hex[:12]
    meta = {"vendor": "gemini", "name": f"files/{file_id}", "mime_type": mime_type, "data": data,
            "created": time.time(), "source": source, "display_name": display_name,
            "uri": f"https://generativelanguage.googleapis.com/{version}/files/{file_id}"}
    _files(state)[file_id] = meta
    return meta


def _gemini_upload(request: Request, state: State, match: re.Match[str]) -> Answer:
    """The resumable upload protocol: a ``start`` request, then ``upload[, finalize]`` chunks."""
    upload_id = request.query.get("upload_id")
    command = request.headers.get("x-goog-upload-command", "").replace(" ", "")
    if upload_id is None:
        if not _g_authorised(request):
            return _g_error(403, _G_NO_KEY)
        if request.headers.get("x-goog-upload-protocol") != "resumable" or command != "start":
            return _g_error(400, "Uploads need X-Goog-Upload-Protocol: resumable and X-Goog-Upload-Command: start.")
        body = request.json if isinstance(request.json, dict) else {}
        file = body.get("file") or {}
        upload_id = uuid.uuid4().hex
        with state.lock:
            state.store[f"batch:upload:{upload_id}"] = {
                "data": bytearray(), "mime_type": request.headers.get("x-goog-upload-header-content-type")
                or file.get("mimeType") or "application/octet-stream",
                "display_name": file.get("displayName"), "version": match["version"],
                "size": int(request.headers.get("x-goog-upload-header-content-length") or 0)}
        host = request.headers.get("host", "127.0.0.1")
        url = f"http://{host}/upload/{match['version']}/files?upload_id={upload_id}&upload_protocol=resumable"
        return Answer(headers={"x-goog-upload-url": url, "x-goog-upload-status": "active",
                               "x-goog-upload-chunk-granularity": "8388608"}, json={})
    with state.lock:
        upload = state.store.get(f"batch:upload:{upload_id}")
    if upload is None:
        return _g_error(404, "Unknown upload session.")
    offset = int(request.headers.get("x-goog-upload-offset") or 0)
    if offset != len(upload["data"]):
        return _g_error(400, f"Upload offset {offset} does not match the {len(upload['data'])} bytes received.")
    upload["data"] += request.body
    if len(upload["data"]) > GEMINI_BATCH_MAX_BYTES:  # Files API: up to 2 GB per file
        with state.lock:
            state.store.pop(f"batch:upload:{upload_id}", None)
        return _g_error(400, f"File size exceeds the limit of {GEMINI_BATCH_MAX_BYTES:,} bytes.")
    if "finalize" not in command.split(","):
        return Answer(headers={"x-goog-upload-status": "active"}, json={})
    with state.lock:
        state.store.pop(f"batch:upload:{upload_id}", None)
    meta = _store_gemini_file(state, bytes(upload["data"]), upload["mime_type"], source="UPLOADED",
                              display_name=upload["display_name"], version=upload["version"])
    return Answer(headers={"x-goog-upload-status": "final"}, json={"file": _gemini_file_resource(meta)})


def _gemini_file(request: Request, state: State, match: re.Match[str]) -> Answer:
    if not _g_authorised(request):
        return _g_error(403, _G_NO_KEY)
    meta = _files(state).get(match["id"])
    if meta is None or meta.get("vendor") != "gemini":
        return _g_error(404, f"File files/{match['id']} not found or you do not have permission to access it.")
    if match["download"]:
        if meta["source"] != "GENERATED":
            return _g_error(400, "Only generated files can be downloaded.")
        return Answer(body=meta["data"])
    if request.method == "DELETE":
        _files(state).pop(match["id"], None)
        return Answer(json={})
    return Answer(json=_gemini_file_resource(meta))

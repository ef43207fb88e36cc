"""Microsoft Foundry project routes, as ``azure-ai-projects`` and its OpenAI client call them.

``Emulator().foundry_endpoint`` is a project endpoint (``{url}/api/projects/emulator``); under it:

- ``GET|DELETE agents/{name}``, ``GET agents``, ``POST|GET agents/{name}/versions``,
  ``GET|DELETE agents/{name}/versions/{version}`` (``?api-version=v1``, JSON shapes of
  ``azure.ai.projects.models``: ``AgentDetails``, ``AgentVersionDetails``, ``ApiErrorResponse``);
- ``POST openai/v1/responses`` with ``agent_reference`` (the agent's definition supplies the model,
  instructions and tools), and the background routes ``GET openai/v1/responses/{id}``, ``POST …/cancel``.

Every route needs ``Authorization: Bearer <token>`` (Microsoft Entra ID); the Responses routes also
take Azure's ``api-key`` header. The rules the real service enforces, and where they come from, are
listed in :mod:`nbimagine._providers.foundry`; they are checked here the same way.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import replace
from typing import Any

from ._server import Answer, Request, State

PROJECT_PATH = re.compile(r"^/api/projects/([^/]+)(/.*)?$")
_AGENT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class EmulatorCredential:
    """A ``TokenCredential`` for the emulator: any bearer token is accepted there, never a real one."""

    def __init__(self, token: str = "emulator-token") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


def _error(status: int, code: str, message: str, *, param: str | None = None) -> Answer:
    """Foundry's error envelope (``ApiErrorResponse``); the Responses route uses OpenAI's (same keys)."""
    return Answer(status, json={"error": {"code": code, "message": message, "param": param,
                                          "type": "invalid_request_error"}})


def _agents(state: State, project: str) -> dict[str, list[dict[str, Any]]]:
    with state.lock:
        return state.store.setdefault(f"foundry:agents:{project}", {})


def handle(req: Request, state: State) -> Answer:
    match = PROJECT_PATH.match(req.path.rstrip("/"))
    assert match is not None
    project, rest = match.group(1), (match.group(2) or "")
    bearer = req.headers.get("authorization", "")
    has_bearer = bearer.lower().startswith("bearer ") and bearer[7:].strip()
    if rest.startswith("/openai/"):
        if not (has_bearer or req.headers.get("api-key", "").strip()):
            return _unauthorised()
        return _openai_route(req, state, project, rest)
    if not has_bearer:
        return _unauthorised()
    fault = state.fault("foundry", "", route="foundry")  # injected ones only: management calls carry no prompt
    if fault is not None and fault.name == "http":
        status = fault.status or 500
        return _error(status, {401: "Unauthorized", 403: "PermissionDenied", 404: "NotFound", 429: "TooManyRequests"}
                      .get(status, "InternalServerError" if status >= 500 else "BadRequest"),
                      fault.message or f"Injected HTTP {status} (emulated).")
    if not req.query.get("api-version"):
        return _error(400, "BadRequest", "Missing required query parameter: api-version (use api-version=v1).",
                      param="api-version")
    parts = [p for p in rest.split("/") if p]
    if not parts or parts[0] != "agents":
        return _error(404, "NotFound", f"The emulator has no Foundry route {req.method} {req.path}.")
    agents = _agents(state, project)
    if len(parts) == 1:
        if req.method != "GET":
            return _method(req)
        data = [_details(name, versions) for name, versions in sorted(agents.items()) if versions]
        return Answer(json=_page(data))
    name = parts[1]
    if len(parts) == 2:
        if req.method == "GET":
            versions = agents.get(name)
            return Answer(json=_details(name, versions)) if versions else _no_agent(name)
        if req.method == "DELETE":
            if not agents.get(name):
                return _no_agent(name)
            with state.lock:
                del agents[name]
            return Answer(json={"object": "agent.deleted", "name": name, "deleted": True})
        return _method(req)
    if parts[2] != "versions" or len(parts) > 4:
        return _error(404, "NotFound", f"The emulator has no Foundry route {req.method} {req.path}.")
    if len(parts) == 3:
        if req.method == "POST":
            return _create_version(req, state, agents, name)
        if req.method == "GET":
            versions = agents.get(name)
            if not versions:
                return _no_agent(name)
            newest_first = list(reversed(versions))
            after = req.query.get("after")
            if after:
                ids = [v["id"] for v in newest_first]
                newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
            return Answer(json=_page(newest_first))
        return _method(req)
    version = _find_version(agents.get(name) or [], parts[3])
    if version is None:
        return _error(404, "not_found", f"Agent '{name}' has no version '{parts[3]}'.")
    if req.method == "GET":
        return Answer(json=version)
    if req.method == "DELETE":
        with state.lock:
            agents[name].remove(version)
        return Answer(json={"object": "agent.version.deleted", "name": name, "version": version["version"],
                            "deleted": True})
    return _method(req)


def _unauthorised() -> Answer:
    return _error(401, "Unauthorized", "Access token is missing, invalid, audience is incorrect "
                                       "(https://ai.azure.com), or have expired (emulated).")


def _method(req: Request) -> Answer:
    return _error(405, "MethodNotAllowed", f"Method {req.method} is not supported on {req.path}.")


def _no_agent(name: str) -> Answer:
    return _error(404, "not_found", f"Agent '{name}' not found.")


def _page(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


def _details(name: str, versions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "agent", "id": name, "name": name, "state": "enabled", "configuration_state": "enabled",
            "versions": {"latest": versions[-1]}}


def _find_version(versions: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    return next((v for v in versions if v["version"] == version), None)


def _create_version(req: Request, state: State, agents: dict[str, list[dict[str, Any]]], name: str) -> Answer:
    if not _AGENT_NAME.match(name):
        return _error(400, "invalid_value", f"Invalid agent name '{name}': it must start and end with a letter or "
                                            "digit, contain only letters, digits and hyphens, and be at most 63 "
                                            "characters long.", param="agent_name")
    body = req.json if isinstance(req.json, dict) else None
    definition = body.get("definition") if body else None
    if not isinstance(definition, dict):
        return _error(400, "missing_required_parameter", "Missing required parameter: 'definition'.",
                      param="definition")
    if definition.get("kind") != "prompt":
        return _error(400, "invalid_value", f"The emulator models prompt agents (kind 'prompt'), not "
                                            f"{definition.get('kind')!r}.", param="definition.kind")
    if not isinstance(definition.get("model"), str) or not definition["model"]:
        return _error(400, "missing_required_parameter", "Missing required parameter: 'definition.model'.",
                      param="definition.model")
    for index, tool in enumerate(definition.get("tools") or []):
        problem = _check_tool(tool, f"definition.tools[{index}]")
        if problem is not None:
            return problem
    with state.lock:
        versions = agents.setdefault(name, [])
        number = str(int(versions[-1]["version"]) + 1) if versions else "1"
        version = {"object": "agent.version", "id": f"{name}:{number}", "name": name, "version": number,
                   "description": body.get("description"), "created_at": int(time.time()),
                   "definition": definition, "metadata": body.get("metadata") or {}, "status": "active",
                   "agent_guid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"nbimagine-emulator/{name}"))}
        versions.append(version)
    return Answer(json=version)


def _check_tool(tool: Any, param: str) -> Answer | None:
    if not isinstance(tool, dict) or not tool.get("type"):
        return _error(400, "invalid_value", "Each tool needs a 'type'.", param=param)
    if tool["type"] != "image_generation":
        return None
    # ImageGenTool's closed value sets and size limit: the provider's table, which a test checks against
    # azure.ai.projects.models.ImageGenTool (one source for the client check and the emulator).
    from .._providers.foundry import IMAGE_GEN_TOOL_FIELDS, MAX_PIXELS

    for key, allowed in IMAGE_GEN_TOOL_FIELDS.items():
        if allowed is not None and key in tool and tool[key] not in allowed:
            return _error(400, "invalid_value", f"Invalid value '{tool[key]}' for '{param}.{key}'. Supported values "
                                                f"are: {', '.join(repr(a) for a in allowed)}.", param=f"{param}.{key}")
    size = tool.get("size")
    if isinstance(size, str) and "x" in size:
        width, _, height = size.partition("x")
        if width.isdigit() and height.isdigit() and int(width) * int(height) > MAX_PIXELS:
            return _error(400, "invalid_value", f"Invalid value '{size}' for '{param}.size': the maximum supported "
                                                "resolution is 3840x2160.", param=f"{param}.size")
    return None


# -- the project's OpenAI route ----------------------------------------------------------------------
def _openai_route(req: Request, state: State, project: str, rest: str) -> Answer:
    from . import _background, _openai

    path = rest.rstrip("/")
    match = re.fullmatch(r"/openai/v1/responses/([^/]+?)(/cancel)?", path)
    if match:
        resp_id, cancel = match.groups()
        if cancel:
            return _background.cancel(req, state, resp_id) if req.method == "POST" else _method(req)
        return _background.retrieve(req, state, resp_id) if req.method == "GET" else _method(req)
    if path != "/openai/v1/responses":
        return _error(404, "NotFound", f"The emulator has no Foundry route {req.method} {req.path}.")
    body = req.json if isinstance(req.json, dict) else None
    if req.method != "POST" or body is None or "agent_reference" not in body:
        if body is not None and "agent" in body:
            return _openai._error(400, "The 'agent' property is deprecated. Use 'agent_reference' instead.",
                                  param="agent", code="invalid_payload")
        return _openai.handle(req, state)  # a plain model request through the project's route
    reference = body["agent_reference"]
    if not isinstance(reference, dict) or reference.get("type") != "agent_reference" or not reference.get("name"):
        return _openai._error(400, "agent_reference needs type 'agent_reference' and a name.",
                              param="agent_reference", code="invalid_payload")
    for key in ("tools", "tool_choice"):
        if key in body:
            return _openai._error(400, "Not allowed when agent is specified.", param=key, code="invalid_payload")
    versions = _agents(state, project).get(str(reference["name"])) or []
    wanted = reference.get("version")
    version = _find_version(versions, str(wanted)) if wanted is not None else (versions[-1] if versions else None)
    if version is None:
        what = f"Agent '{reference['name']}'" + (f" version '{wanted}'" if wanted is not None else "")
        return _openai._error(404, f"{what} not found.", param="agent_reference", code="not_found")
    definition = version["definition"]
    if body.get("model") not in (None, definition["model"]):
        return _openai._error(400, f"The model '{body['model']}' does not match the agent's model "
                                   f"'{definition['model']}'; leave model out when an agent is specified.",
                              param="model", code="invalid_payload")
    effective = {k: v for k, v in body.items() if k != "agent_reference"}
    effective["model"] = definition["model"]
    instructions = [text for text in (definition.get("instructions"), body.get("instructions")) if text]
    if instructions:
        effective["instructions"] = "\n".join(instructions)
    if definition.get("tools"):
        effective["tools"] = definition["tools"]
    if definition.get("tool_choice") is not None:
        effective["tool_choice"] = definition["tool_choice"]
    effective["agent_reference"] = {"type": "agent_reference", "name": version["name"], "version": version["version"]}
    return _openai.handle(replace(req, json=effective), state)

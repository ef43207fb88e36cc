"""Microsoft Foundry Agent Service through the real ``azure-ai-projects`` and ``openai`` SDKs, over HTTP,
against the emulator's project routes, with fake (but real, protocol-implementing) token credentials."""

from __future__ import annotations

import asyncio
import time
import typing
import uuid

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.pipeline.transport import AsyncioRequestsTransport
from openai import BadRequestError, NotFoundError

from nbimagine import Agent
from nbimagine.config import FoundryAgentConfig
from nbimagine.errors import ConfigError, ContentPolicyError, ProviderError
from nbimagine.events import ImageInput, PartialImageEvent, ReplyEvent, StatusEvent
from nbimagine.tools import ImageGenerationTool

SCOPE = "https://ai.azure.com/.default"
DEPLOYMENT = "gpt-image-1"


class FakeTokenCredential:
    """``azure.core.credentials.TokenCredential``: hands out a fresh opaque token per call, remembers them."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.issued: list[str] = []

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: object) -> AccessToken:
        self.scopes.append(scopes)
        token = f"fake-entra-token-{uuid.uuid4().hex}"
        self.issued.append(token)
        return AccessToken(token, int(time.time()) + 3600)


class FakeAsyncTokenCredential(FakeTokenCredential):
    """``azure.core.credentials_async.AsyncTokenCredential``."""

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:  # type: ignore[override]
        return FakeTokenCredential.get_token(self, *scopes, **kwargs)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FakeAsyncTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class BrokenCredential:
    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        from azure.identity import CredentialUnavailableError

        raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token (emulated)")


def config(emu, credential=None, **changes: object) -> FoundryAgentConfig:
    base = {"model": "gpt-4.1", "project_endpoint": emu.foundry_endpoint, "agent_name": "painter",
            "image_deployment": DEPLOYMENT, "credential": credential or FakeTokenCredential(), "max_retries": 0}
    return FoundryAgentConfig(**{**base, **changes})


def tool(**params: object) -> ImageGenerationTool:
    return ImageGenerationTool(**{"size": "256x256", **params})


def requests_to(emu, fragment: str, method: str | None = None) -> list:
    return [r for r in emu.requests if fragment in r.path and (method is None or r.method == method)]


def project_client(emu, credential=None):
    from azure.ai.projects.aio import AIProjectClient

    return AIProjectClient(emu.foundry_endpoint, credential or FakeAsyncTokenCredential(),
                           transport=AsyncioRequestsTransport())


# --- the SDKs themselves against the emulator's project routes ------------------------------------------

async def test_azure_ai_projects_and_its_openai_client_against_the_emulator(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    credential = FakeAsyncTokenCredential()
    async with project_client(emu, credential) as project:
        agent = await project.agents.create_version(
            agent_name="MyAgent",
            definition=PromptAgentDefinition(model="gpt-4.1", instructions="Generate images based on user prompts",
                                             tools=[ImageGenTool(model=DEPLOYMENT, quality="low", size="1024x1024")]),
            description="Agent for image generation.", enforce_https=False,
        )
        assert (agent.name, agent.version, agent.object) == ("MyAgent", "1", "agent.version")
        assert agent.definition.tools[0].quality == "low"
        again = await project.agents.create_version(
            agent_name="MyAgent", definition=PromptAgentDefinition(model="gpt-4.1"), enforce_https=False)
        assert again.version == "2"
        details = await project.agents.get("MyAgent", enforce_https=False)
        assert details.versions.latest.version == "2"
        listed = [v.version async for v in project.agents.list_versions("MyAgent", enforce_https=False)]
        assert listed == ["2", "1"]
        assert (await project.agents.get_version("MyAgent", "1", enforce_https=False)).definition.model == "gpt-4.1"
        await project.agents.delete_version("MyAgent", "2", enforce_https=False)
        with pytest.raises(ResourceNotFoundError):
            await project.agents.get_version("MyAgent", "2", enforce_https=False)

        async with project.get_openai_client() as openai_client:
            response = await openai_client.responses.create(
                input="Generate an image of Microsoft logo.",
                extra_headers={"x-ms-oai-image-generation-deployment": DEPLOYMENT},
                extra_body={"agent_reference": {"name": agent.name, "type": "agent_reference"}},
            )
    image_data = [output.result for output in response.output if output.type == "image_generation_call"]
    assert image_data and image_data[0]
    assert response.model == "gpt-4.1" and response.model_extra["agent_reference"]["version"] == "1"
    assert (SCOPE,) in credential.scopes
    posted = requests_to(emu, "/openai/v1/responses", "POST")[-1]
    assert posted.headers["authorization"] == "***" and posted.json["agent_reference"]["name"] == "MyAgent"


def test_the_seed_example_with_the_synchronous_client(emu, tmp_path, monkeypatch) -> None:
    # The seed's Python example, against the emulator: only the endpoint, the credential, enforce_https (plain
    # http on loopback) and the body key (agent_reference, see below) differ.
    import base64
    import os

    from azure.ai.projects import AIProjectClient
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZURE_AI_MODEL_DEPLOYMENT_NAME", "gpt-4.1")
    project_client = AIProjectClient(endpoint=emu.foundry_endpoint, credential=FakeTokenCredential())
    openai_client = project_client.get_openai_client()
    with project_client:
        agent = project_client.agents.create_version(
            agent_name="MyAgent",
            definition=PromptAgentDefinition(
                model=os.environ["AZURE_AI_MODEL_DEPLOYMENT_NAME"],
                instructions="Generate images based on user prompts",
                tools=[ImageGenTool(quality="low", size="1024x1024")],
            ),
            description="Agent for image generation.",
            enforce_https=False,
        )
        response = openai_client.responses.create(
            input="Generate an image of Microsoft logo.",
            extra_headers={"x-ms-oai-image-generation-deployment": "gpt-image-1"},
            extra_body={"agent_reference": {"name": agent.name, "type": "agent_reference"}},
        )
        image_data = [output.result for output in response.output if output.type == "image_generation_call"]
        if image_data and image_data[0]:
            with open("microsoft.png", "wb") as f:
                f.write(base64.b64decode(image_data[0]))
    assert (tmp_path / "microsoft.png").read_bytes().startswith(b"\x89PNG")
    assert (agent.id, agent.version) == ("MyAgent:1", "1")


async def test_the_seeds_agent_key_is_refused_as_the_service_does_today(emu) -> None:
    # The seed's REST example uses "agent"; Foundry now answers 400 and asks for "agent_reference".
    async with project_client(emu) as project, project.get_openai_client() as client:
        with pytest.raises(BadRequestError, match=r"The 'agent' property is deprecated\. Use 'agent_reference'"):
            await client.responses.create(input="Hi", extra_body={"agent": {"name": "x", "type": "agent_reference"}})


async def test_project_routes_enforce_the_services_rules(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    async with project_client(emu) as project, project.get_openai_client() as client:
        await project.agents.create_version(
            agent_name="painter", enforce_https=False,
            definition=PromptAgentDefinition(model="gpt-4.1", tools=[ImageGenTool(model=DEPLOYMENT)]))
        ref = {"agent_reference": {"name": "painter", "type": "agent_reference"}}
        headers = {"x-ms-oai-image-generation-deployment": DEPLOYMENT}
        with pytest.raises(BadRequestError, match="Not allowed when agent is specified"):
            await client.responses.create(input="Hi", tools=[{"type": "image_generation"}], extra_body=ref,
                                          extra_headers=headers)
        with pytest.raises(BadRequestError, match="does not match the agent's model"):
            await client.responses.create(input="Hi", model="gpt-5", extra_body=ref, extra_headers=headers)
        with pytest.raises(BadRequestError, match="x-ms-oai-image-generation-deployment"):
            await client.responses.create(input="Hi", extra_body=ref)
        with pytest.raises(NotFoundError, match="Agent 'nobody' not found"):
            await client.responses.create(input="Hi", extra_body={"agent_reference": {"name": "nobody",
                                                                                       "type": "agent_reference"}})
        with pytest.raises(HttpResponseError) as bad_quality:
            await project.agents.create_version(
                agent_name="painter", enforce_https=False,
                definition=PromptAgentDefinition(model="gpt-4.1", tools=[ImageGenTool(quality="xhigh")]))
        assert bad_quality.value.status_code == 400 and "quality" in str(bad_quality.value)
        with pytest.raises(HttpResponseError) as bad_name:
            await project.agents.create_version(agent_name="bad_name", enforce_https=False,
                                                definition=PromptAgentDefinition(model="gpt-4.1"))
        assert bad_name.value.status_code == 400
        with pytest.raises(ResourceNotFoundError):
            await project.agents.get("nobody", enforce_https=False)


async def test_project_routes_require_a_bearer_token(emu) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        agents = await http.get(f"{emu.foundry_endpoint}/agents/painter?api-version=v1")
        keyed = await http.get(f"{emu.foundry_endpoint}/agents/painter?api-version=v1", headers={"api-key": "k"})
        responses = await http.post(f"{emu.foundry_endpoint}/openai/v1/responses", json={"input": "hi"})
    assert agents.status_code == keyed.status_code == responses.status_code == 401
    assert agents.json()["error"]["code"] == "Unauthorized"


# --- FoundryAgentConfig: agent versions ------------------------------------------------------------------

async def test_tools_create_an_agent_version_then_reuse_it(emu) -> None:
    credential = FakeTokenCredential()
    cfg = config(emu, credential)
    first = await Agent("designer", config=cfg, tools=[tool(quality="low")]).ask("A red fox")
    assert len(first.files) == 1 and first.files[0].metadata["provider"] == "foundry"
    created = requests_to(emu, "/agents/painter/versions", "POST")
    assert len(created) == 1
    definition = created[0].json["definition"]
    assert definition["kind"] == "prompt" and definition["model"] == "gpt-4.1"
    assert definition["tools"] == [{"type": "image_generation", "model": DEPLOYMENT, "quality": "low",
                                    "size": "256x256"}]
    posted = requests_to(emu, "/openai/v1/responses", "POST")[-1]
    assert posted.json["agent_reference"] == {"type": "agent_reference", "name": "painter", "version": "1"}
    assert not {"model", "tools", "tool_choice", "instructions"} & set(posted.json)
    assert posted.headers["x-ms-oai-image-generation-deployment"] == DEPLOYMENT

    # Another agent (another process, say) with the same tools: the latest version is reused.
    await Agent("designer", config=config(emu), tools=[tool(quality="low")]).ask("A blue fox")
    assert len(requests_to(emu, "/agents/painter/versions", "POST")) == 1
    assert requests_to(emu, "/openai/v1/responses", "POST")[-1].json["agent_reference"]["version"] == "1"

    # Changed tools: a new version.
    await Agent("designer", config=config(emu), tools=[tool(quality="high")]).ask("A green fox")
    assert len(requests_to(emu, "/agents/painter/versions", "POST")) == 2
    assert requests_to(emu, "/openai/v1/responses", "POST")[-1].json["agent_reference"]["version"] == "2"
    assert all(scopes == (SCOPE,) for scopes in credential.scopes)


async def test_the_same_agent_asks_again_without_management_calls(emu) -> None:
    agent = Agent("designer", config=config(emu), tools=[tool()])
    await agent.ask("A red fox")
    before = len(requests_to(emu, "/agents/"))
    await agent.ask("A blue fox")
    assert len(requests_to(emu, "/agents/")) == before


async def test_concurrent_variants_create_one_version(emu) -> None:
    agent = Agent("designer", config=config(emu), tools=[tool()])
    replies = await asyncio.gather(*(agent.ask(f"A fox, variant {i}") for i in range(3)))
    assert all(len(r.files) == 1 for r in replies)
    assert len(requests_to(emu, "/agents/painter/versions", "POST")) == 1


async def test_a_version_made_elsewhere_with_the_same_definition_is_reused(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    async with project_client(emu) as project:
        await project.agents.create_version(
            agent_name="painter", enforce_https=False,
            definition=PromptAgentDefinition(model="gpt-4.1", instructions="Draw.",
                                             tools=[ImageGenTool(model=DEPLOYMENT, size="256x256")]))
    await Agent("designer", config=config(emu, instructions="Draw."), tools=[tool()]).ask("A fox")
    assert len(requests_to(emu, "/agents/painter/versions", "POST")) == 1  # only the one made above


async def test_instructions_go_into_the_definition(emu) -> None:
    await Agent("designer", config=config(emu), tools=[tool()], instructions="Flat pastel style.").ask("A fox")
    assert requests_to(emu, "/versions", "POST")[0].json["definition"]["instructions"] == "Flat pastel style."
    await Agent("designer", config=config(emu, instructions="Ink style.", tool_choice="image_generation"),
                tools=[tool()], instructions="ignored: the config's instructions win").ask("A fox")
    definition = requests_to(emu, "/versions", "POST")[1].json["definition"]
    assert definition["instructions"] == "Ink style." and definition["tool_choice"] == {"type": "image_generation"}


# every ImageGenerationTool parameter, as ImageGenTool receives it
TOOL_PARAMS = [
    ("quality", "medium"), ("size", "1024x1536"), ("background", "transparent"), ("output_format", "webp"),
    ("output_compression", 80), ("partial_images", 2), ("moderation", "low"), ("input_fidelity", "high"),
    ("action", "generate"), ("model", "gpt-image-1.5"),
]


@pytest.mark.parametrize("name, value", TOOL_PARAMS, ids=[p[0] for p in TOOL_PARAMS])
async def test_every_image_tool_parameter_reaches_image_gen_tool(emu, name: str, value: object) -> None:
    params = {name: value}
    if name == "output_compression":
        params["output_format"] = "webp"
    agent = Agent("designer", config=config(emu), tools=[ImageGenerationTool(**params)])
    reply = await agent.ask("A fox")
    sent = requests_to(emu, "/versions", "POST")[0].json["definition"]["tools"][0]
    assert sent[name] == value
    assert len(reply.files) == 1


async def test_the_mask_reaches_image_gen_tool(emu) -> None:
    from nbimagine.emulator._draw import render

    mask = ImageInput(data=render("mask", 256, 256, transparent=True))
    await Agent("designer", config=config(emu), tools=[tool(input_image_mask=mask)]).ask("A fox")
    sent = requests_to(emu, "/versions", "POST")[0].json["definition"]["tools"][0]
    assert sent["input_image_mask"]["image_url"].startswith("data:image/png;base64,")
    await Agent("designer", config=config(emu), tools=[tool(input_image_mask=ImageInput(file_id="file-m1"))]).ask("x")
    assert requests_to(emu, "/versions", "POST")[1].json["definition"]["tools"][0]["input_image_mask"] == {
        "file_id": "file-m1"}


def test_image_gen_tool_table_matches_the_installed_sdk() -> None:
    from azure.ai.projects import models
    from azure.ai.projects.models import ImageGenTool

    from nbimagine._providers.foundry import IMAGE_GEN_TOOL_FIELDS
    from nbimagine.tools import ImageGenerationTool as Ours

    hints = typing.get_type_hints(ImageGenTool, localns={"_models": models})
    sdk_fields = {name for name in hints if name not in ("type", "name", "description", "tool_configs")}
    ours = {f for f in Ours.__dataclass_fields__}
    assert set(IMAGE_GEN_TOOL_FIELDS) == ours  # every parameter of ours is mapped...
    assert ours <= sdk_fields  # ...onto a field ImageGenTool has
    for name, allowed in IMAGE_GEN_TOOL_FIELDS.items():
        literals = _literal_values(hints[name])
        if allowed is None:
            assert literals is None or str in _types(hints[name]), name  # open (any string / int)
        else:
            assert set(allowed) == literals, name


def _types(hint: object) -> set[object]:
    out: set[object] = set()
    for arg in typing.get_args(hint) or (hint,):
        out |= _types(arg) if typing.get_args(arg) and typing.get_origin(arg) is typing.Union else {arg}
    return out


def _literal_values(hint: object) -> set[str] | None:
    values: set[str] = set()
    open_ended = False
    for arg in typing.get_args(hint) or (hint,):
        if typing.get_origin(arg) is typing.Literal:
            values |= set(typing.get_args(arg))
        elif arg is not type(None):
            open_ended = True
    return None if open_ended or not values else values


@pytest.mark.parametrize("params, fragment", [
    ({"quality": "xhigh"}, "quality"),
    ({"quality": "max"}, "quality"),
    ({"size": "3840x3840"}, "3840x2160"),
])
def test_values_image_gen_tool_lacks_are_refused_before_any_request(emu, params: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Agent("designer", config=config(emu), tools=[ImageGenerationTool(**params)])
    assert not emu.requests


@pytest.mark.parametrize("changes, tools, fragment", [
    ({"agent_version": "3"}, True, "agent_version"),
    ({"tool_choice": "image_generation"}, False, "tool_choice"),
])
def test_contradictory_settings_are_config_errors(emu, changes: dict, tools: bool, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Agent("designer", config=config(emu, **changes), tools=[tool()] if tools else [])


@pytest.mark.parametrize("changes, fragment", [
    ({"model": None}, "orchestrator deployment"),
    ({"project_endpoint": None}, "AZURE_AI_PROJECT_ENDPOINT"),
    ({"image_deployment": None}, "IMAGE_GENERATION_MODEL_DEPLOYMENT_NAME"),
])
async def test_missing_settings_are_config_errors_before_any_request(emu, changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        await Agent("designer", config=config(emu, **changes), tools=[tool()]).ask("A fox")
    assert not emu.requests


async def test_settings_come_from_the_environment_microsofts_samples_use(emu, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_AI_PROJECT_ENDPOINT", emu.foundry_endpoint)
    monkeypatch.setenv("AZURE_AI_MODEL_DEPLOYMENT_NAME", "gpt-4.1")
    monkeypatch.setenv("IMAGE_GENERATION_MODEL_DEPLOYMENT_NAME", DEPLOYMENT)
    cfg = FoundryAgentConfig(agent_name="painter", credential=FakeTokenCredential(), max_retries=0)
    assert len((await Agent("designer", config=cfg, tools=[tool()]).ask("A fox")).files) == 1


@pytest.mark.parametrize("name", ["", "-x", "x-", "under_score", "a" * 64, None])
def test_agent_names_follow_foundrys_rule(name: object) -> None:
    with pytest.raises(ConfigError, match="agent_name"):
        FoundryAgentConfig("gpt-4.1", agent_name=name)  # type: ignore[arg-type]


# --- an existing agent, by name and version ----------------------------------------------------------------

async def test_without_tools_an_existing_agent_is_used_as_it_is(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    async with project_client(emu) as project:
        for quality in ("low", "high"):
            await project.agents.create_version(
                agent_name="painter", enforce_https=False,
                definition=PromptAgentDefinition(model="gpt-4.1", tools=[ImageGenTool(model=DEPLOYMENT,
                                                                                       quality=quality)]))
    emu.requests.clear()
    latest = await Agent("designer", config=config(emu, model=None)).ask("A fox")
    pinned = await Agent("designer", config=config(emu, model=None, agent_version="1")).ask("A fox")
    assert latest.files[0].metadata["quality"] == "high" and pinned.files[0].metadata["quality"] == "low"
    refs = [r.json["agent_reference"] for r in requests_to(emu, "/openai/v1/responses", "POST")]
    assert refs == [{"type": "agent_reference", "name": "painter"},
                    {"type": "agent_reference", "name": "painter", "version": "1"}]
    assert not requests_to(emu, "/agents/")  # nothing managed


async def test_instructions_for_an_existing_agent_go_with_each_request(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    async with project_client(emu) as project:
        await project.agents.create_version(
            agent_name="painter", enforce_https=False,
            definition=PromptAgentDefinition(model="gpt-4.1", instructions="Draw.",
                                             tools=[ImageGenTool(model=DEPLOYMENT)]))
    await Agent("designer", config=config(emu, model=None, instructions="In ink.")).ask("A fox")
    await Agent("designer", config=config(emu, model=None), instructions="In chalk.").ask("A fox")
    sent = [r.json.get("instructions") for r in requests_to(emu, "/openai/v1/responses", "POST")]
    assert sent == ["In ink.", "In chalk."]


async def test_an_unknown_agent_is_a_clear_provider_error(emu) -> None:
    with pytest.raises(ProviderError, match="Agent 'painter' not found") as caught:
        await Agent("designer", config=config(emu, model=None)).ask("A fox")
    assert caught.value.status == 404 and "check the agent name and version" in str(caught.value)


# --- the Responses behaviour, as on Azure ----------------------------------------------------------------

async def test_streaming_partial_images(emu) -> None:
    agent = Agent("designer", config=config(emu), tools=[tool(partial_images=2)])
    events = [e async for e in agent.stream("A fox")]
    assert [e.index for e in events if isinstance(e, PartialImageEvent)] == [0, 1]
    assert isinstance(events[-1], ReplyEvent) and len(events[-1].reply.files) == 1


@pytest.mark.parametrize("store", [True, False])
async def test_edits_and_multi_turn(emu, store: bool) -> None:
    agent = Agent("designer", config=config(emu, store=store), tools=[tool()])
    first = await agent.ask("A cat")
    second = await first.ask("Give it a hat")
    assert second.files[0].metadata["action"] == "edit"
    posted = requests_to(emu, "/openai/v1/responses", "POST")[-1].json
    assert ("previous_response_id" in posted) is store
    edited = await agent.ask("Make it blue", ImageInput.from_result(first.files[0]))
    assert edited.files[0].metadata["action"] == "edit"
    by_id = await agent.ask("Make it red", ImageInput(file_id="file-abc123"))
    assert by_id.files[0].metadata["action"] == "edit"
    assert requests_to(emu, "/openai/v1/responses", "POST")[-1].json["input"][0]["content"][1] == {
        "type": "input_image", "file_id": "file-abc123", "detail": "auto"}


async def test_errors_are_typed(emu) -> None:
    agent = Agent("designer", config=config(emu), tools=[tool()])
    with pytest.raises(ContentPolicyError) as blocked:
        await agent.ask("A fox [fault:image_moderation]")
    assert blocked.value.provider == "foundry"
    with pytest.raises(ProviderError) as failed:
        await agent.ask("A fox [error:500]")
    assert failed.value.status == 500


async def test_background_responses_on_the_project_route(emu) -> None:
    emu.background_duration = 0.2
    agent = Agent("designer", config=config(emu, background=True, poll_interval=0.05), tools=[tool()])
    events = [e async for e in agent.stream("A fox")]
    assert [e.status for e in events if isinstance(e, StatusEvent)][:2] == ["queued", "in_progress"]
    assert len(events[-1].reply.files) == 1
    reply = await agent.ask("A slow fox")
    assert len(reply.files) == 1
    assert requests_to(emu, f"/openai/v1/responses/{reply.response_id}", "GET")

    emu.background_duration = 60
    emu.requests.clear()
    task = asyncio.ensure_future(agent.ask("A fox that never ends"))
    while not requests_to(emu, "/openai/v1/responses/", "GET"):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert requests_to(emu, "/cancel", "POST")


async def test_a_dropped_background_stream_resumes_on_the_project_route(emu) -> None:
    emu.background_duration = 0.3
    emu.inject("broken_stream", family="openai")  # the Responses stream drops after the first partial image
    agent = Agent("designer", config=config(emu, background=True, poll_interval=0.05), tools=[tool(partial_images=2)])
    events = [e async for e in agent.stream("A fox")]
    assert [e.index for e in events if isinstance(e, PartialImageEvent)] == [0, 1]
    assert len(events[-1].reply.files) == 1
    resumed = [r for r in requests_to(emu, "/openai/v1/responses/", "GET") if r.query.get("stream") == "true"]
    assert resumed and resumed[0].query["starting_after"] == "6"


# --- credentials and secrets ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [FakeTokenCredential, FakeAsyncTokenCredential], ids=["sync", "async"])
async def test_sync_and_async_credentials_both_work_and_tokens_are_cached(emu, make) -> None:
    credential = make()
    agent = Agent("designer", config=config(emu, credential), tools=[tool()])
    await agent.ask("A fox")
    await agent.ask("Another fox")
    assert credential.scopes and set(credential.scopes) == {(SCOPE,)}
    assert len(credential.issued) == 1  # one token for the management calls and both requests
    assert all(r.headers.get("authorization") == "***" for r in requests_to(emu, "/api/projects/"))


async def test_a_credential_that_cannot_get_a_token_is_a_config_error(emu) -> None:
    with pytest.raises(ConfigError, match="az login"):
        await Agent("designer", config=config(emu, BrokenCredential()), tools=[tool()]).ask("A fox")
    with pytest.raises(ConfigError, match="az login"):
        await Agent("designer", config=config(emu, BrokenCredential(), model=None)).ask("A fox")


async def test_api_key_authenticates_the_responses_route(emu) -> None:
    from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

    async with project_client(emu) as project:
        await project.agents.create_version(
            agent_name="painter", enforce_https=False,
            definition=PromptAgentDefinition(model="gpt-4.1", tools=[ImageGenTool(model=DEPLOYMENT)]))
    key = "foundry-key-0123456789abcdef"
    cfg = FoundryAgentConfig(project_endpoint=emu.foundry_endpoint, agent_name="painter", api_key=key,
                             image_deployment=DEPLOYMENT, max_retries=0)
    assert key not in repr(cfg)
    emu.requests.clear()
    reply = await Agent("designer", config=cfg).ask("A fox")  # no credential: DefaultAzureCredential is never made
    assert len(reply.files) == 1
    assert [(r.method, r.path) for r in emu.requests] == [("POST", "/api/projects/emulator/openai/v1/responses")]
    assert emu.requests[0].headers["authorization"] == "***"


async def test_tokens_never_appear_in_errors(emu) -> None:
    credential = FakeTokenCredential()
    emu.inject("http", status=403, times=1)  # the management call (agents.get) is refused
    with pytest.raises(ProviderError) as caught:
        await Agent("designer", config=config(emu, credential), tools=[tool()]).ask("A fox")
    assert caught.value.status == 403
    assert credential.issued
    _assert_no_secret(caught.value, credential.issued)


def _assert_no_secret(error: BaseException, secrets: list[str]) -> None:
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        text = f"{exc!s} {exc!r} {vars(exc)!r}"
        assert not any(secret in text for secret in secrets), f"a token is reachable from {type(exc).__name__}"
        stack += [e for e in (exc.__cause__, exc.__context__) if e is not None]


def test_config_repr_shows_the_credential_type_never_the_key() -> None:
    cfg = FoundryAgentConfig("gpt-4.1", agent_name="painter", credential=FakeTokenCredential(), api_key="sk-secret-1")
    assert "credential=<FakeTokenCredential>" in repr(cfg) and "sk-secret-1" not in repr(cfg)


@pytest.mark.parametrize("changes, fragment", [
    ({"organization": "org-1"}, "organization"),
    ({"project": "proj_1"}, "project"),
    ({"credential": "a token string"}, "TokenCredential"),
    ({"project_endpoint": "https://x/api/projects/p", "base_url": "https://x/openai/v1"}, "base_url"),
])
def test_foundry_config_is_validated(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FoundryAgentConfig("gpt-4.1", agent_name="painter", **changes)


# --- what a new user gets wrong, and what the service does behind their back (session 3) ------------------

BAD_ENDPOINTS = [
    ("notaurl", "is a URL such as"),
    ("ftp://res.services.ai.azure.com/api/projects/p", "is a URL such as"),
    ("http://res.services.ai.azure.com/api/projects/p", "must use https"),
    ("https://res.services.ai.azure.com", "ends with /api/projects/<project>"),  # the resource, not the project
    ("https://res.services.ai.azure.com/api/projects/", "ends with /api/projects/<project>"),
    ("https://res.openai.azure.com/openai/v1", "ends with /api/projects/<project>"),
]


@pytest.mark.parametrize("endpoint, fragment", BAD_ENDPOINTS)
def test_a_wrong_project_endpoint_is_refused_before_any_request(emu, monkeypatch, endpoint, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FoundryAgentConfig("gpt-4.1", agent_name="painter", project_endpoint=endpoint)
    # The same rule for the variable Microsoft's samples use, when the config names no endpoint.
    monkeypatch.setenv("AZURE_AI_PROJECT_ENDPOINT", endpoint)
    cfg = FoundryAgentConfig(agent_name="painter", credential=FakeTokenCredential(), max_retries=0)
    with pytest.raises(ConfigError, match=f"AZURE_AI_PROJECT_ENDPOINT: .*{fragment}"):
        Agent("designer", config=cfg).ask_sync("A fox")
    assert not emu.requests


async def test_an_unreachable_project_names_the_setting_to_check(unused_port: int) -> None:
    endpoint = f"http://127.0.0.1:{unused_port}/api/projects/p"
    with pytest.raises(ProviderError, match=r"Could not reach the API .*check project_endpoint"):
        await Agent("designer", config=FoundryAgentConfig(project_endpoint=endpoint, agent_name="painter",
                                                          credential=FakeTokenCredential(), max_retries=0)).ask("x")


async def test_a_version_deleted_on_the_server_is_made_again(emu) -> None:
    agent = Agent("designer", config=config(emu), tools=[tool()])
    assert len((await agent.ask("A fox")).files) == 1
    async with project_client(emu) as project:  # someone deletes the agent in the portal
        await project.agents.delete("painter", enforce_https=False)
    emu.requests.clear()
    assert len((await agent.ask("A second fox")).files) == 1
    asked = requests_to(emu, "/openai/v1/responses", "POST")
    assert [r.json["agent_reference"].get("version") for r in asked] == ["1", "1"]  # 404, then the new one
    assert len(requests_to(emu, "/versions", "POST")) == 1


async def test_a_pinned_version_that_was_deleted_is_not_replaced(emu) -> None:
    # A version the user chose is theirs: its 404 is the answer, nothing is created in its place.
    async with project_client(emu) as project:
        from azure.ai.projects.models import ImageGenTool, PromptAgentDefinition

        for _ in range(2):
            await project.agents.create_version("painter", enforce_https=False, definition=PromptAgentDefinition(
                model="gpt-4.1", tools=[ImageGenTool(model=DEPLOYMENT)]))
        await project.agents.delete_version("painter", "2", enforce_https=False)
    with pytest.raises(ProviderError, match="version '2' not found") as caught:
        await Agent("designer", config=config(emu, model=None, agent_version="2")).ask("A fox")
    assert caught.value.status == 404 and not requests_to(emu, "/versions", "POST")[2:]


def test_no_credential_at_all_is_one_config_error_without_azure_identitys_log(emu, monkeypatch, caplog) -> None:
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
                "IDENTITY_ENDPOINT", "MSI_ENDPOINT", "AZURE_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no az / azd / pwsh to ask
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")  # developer tools only: no managed identity probe
    caplog.set_level("WARNING")
    cfg = FoundryAgentConfig(project_endpoint=emu.foundry_endpoint, agent_name="painter", max_retries=0)
    with pytest.raises(ConfigError, match=r"No usable Azure credential .*az login"):
        Agent("designer", config=cfg).ask_sync("A fox")
    assert not [r for r in caplog.records if r.name.startswith("azure.identity")], caplog.text

"""The OpenAI-compatible API against a real in-process mesh, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import httpx2
import openai
import pytest

from mesh_llm.api import client_settings
from mesh_llm.api.app import create_app
from mesh_llm.governance import keys as member_keys
from mesh_llm.governance.signing import sign
from mesh_llm.pb import router_pb2
from tests.api_helpers import PROMPT, api_mesh, client, governed_config

QUESTION = "What is the capital of France?"


async def _router_answer(mesh, **fields):
    """The text (the router's final text, which streaming ends on too) and summary of a direct Generate."""
    _, done = await mesh.generate(**fields)
    return done.text, done


async def test_models_list_mesh_families_and_model_ids(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        models = await client(api).models.list()
        ids = [m.id for m in models.data]
        assert ids[0] == "mesh"
        assert any(i.startswith("family-") for i in ids) and tiny_loaded.model_id in ids
        mesh_entry = models.data[0].model_extra["mesh"]
        assert sorted(mesh_entry["experts"]) == sorted(e.link.expert_id for e in mesh.experts)
        assert (await client(api).models.retrieve(tiny_loaded.model_id)).id == tiny_loaded.model_id
        family = await client(api).models.retrieve(mesh_entry["family"])  # a full fingerprint names its family
        assert family.id == "family-" + mesh_entry["family"][:12]


async def test_chat_completion_whole_and_streamed_equal_the_routers_answer(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        expected, done = await _router_answer(mesh, prompt=QUESTION, chat=True, k=2, max_tokens=10)
        c = client(api)
        reply = await c.chat.completions.create(model="mesh", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=10, extra_body={"k": 2})
        assert reply.object == "chat.completion" and reply.model == "mesh"
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == ("length" if done.finish_reason == "length" else "stop")
        assert reply.usage.prompt_tokens == done.prompt_tokens
        assert reply.usage.completion_tokens == done.completion_tokens
        assert reply.usage.total_tokens == done.prompt_tokens + done.completion_tokens
        assert sum(reply.model_extra["mesh"]["tokens_by_expert"].values()) == 2 * done.completion_tokens

        stream = await c.chat.completions.create(model="mesh", messages=[{"role": "user", "content": QUESTION}],
                                                 temperature=0, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"k": 2})
        pieces, expert_sets, usage, finish = [], [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            extra = (chunk.model_extra or {}).get("mesh") or {}
            if "token_id" in extra:
                expert_sets.append(extra["experts"])
        assert "".join(pieces) == expected
        assert len(expert_sets) == done.completion_tokens and all(len(s) == 2 for s in expert_sets)
        assert usage.completion_tokens == done.completion_tokens and finish in ("stop", "length")


async def test_completions_whole_and_streamed(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        expected, done = await _router_answer(mesh, prompt=PROMPT, k=1, max_tokens=8)
        c = client(api)
        reply = await c.completions.create(model="mesh", prompt=PROMPT, temperature=0, max_tokens=8,
                                           extra_body={"k": 1, "policy": "random", "mix": "geometric", "top_k": 32})
        assert reply.object == "text_completion" and reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == done.prompt_tokens
        stream = await c.completions.create(model=tiny_loaded.model_id, prompt=PROMPT, temperature=0, max_tokens=8,
                                            stream=True, extra_body={"k": 1})
        text = "".join([choice.text async for chunk in stream for choice in chunk.choices])
        assert text == expected


async def test_seeded_sampling_is_reproducible_and_stop_is_honoured(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        c = client(api)
        runs = [(await c.completions.create(model="mesh", prompt=PROMPT, temperature=0.9, top_p=0.9, seed=7,
                                            max_tokens=12)).choices[0].text for _ in range(2)]
        assert runs[0] == runs[1]
        greedy = (await c.completions.create(model="mesh", prompt=PROMPT, temperature=0, max_tokens=12)).choices[0]
        if len(greedy.text.strip()) > 2:
            stop = greedy.text.strip()[1:3]
            cut = await c.completions.create(model="mesh", prompt=PROMPT, temperature=0, max_tokens=12, stop=[stop])
            assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


async def test_conversation_is_rendered_with_the_family_chat_template(tiny_loaded, tmp_path):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name a river."},
                {"role": "assistant", "content": "The sea."},
                {"role": "user", "content": QUESTION}]
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        templated = tiny_loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected, done = await _router_answer(mesh, prompt=templated, chat=False, k=2, max_tokens=8)
        reply = await client(api).chat.completions.create(model="mesh", messages=messages, temperature=0,
                                                          max_tokens=8, extra_body={"k": 2})
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == done.prompt_tokens == len(tiny_loaded.tokenizer(templated).input_ids)


async def test_response_format_json_schema_constrains_the_answer(tiny_loaded, tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        reply = await client(api).chat.completions.create(
            model="mesh", messages=[{"role": "user", "content": QUESTION}], max_tokens=60, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert list(json.loads(reply.choices[0].message.content)) == ["city"]
        with pytest.raises(openai.BadRequestError):
            await client(api).chat.completions.create(model="mesh", messages=[{"role": "user", "content": "x"}],
                                                      response_format={"type": "json_schema", "json_schema": {}})


async def test_in_process_client_through_asgi_transport(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded], tmp_path) as (mesh, api):
        transport = httpx2.ASGITransport(app=create_app(api.context))
        async with httpx2.AsyncClient(transport=transport, base_url="http://mesh.test/v1") as http:
            c = openai.AsyncOpenAI(base_url="http://mesh.test/v1", api_key="x", http_client=http, max_retries=0)
            reply = await c.chat.completions.create(model="mesh", messages=[{"role": "user", "content": "Hi"}],
                                                    temperature=0, max_tokens=4)
            assert reply.usage.completion_tokens >= 1


async def test_keys_refuse_requests_without_a_valid_bearer_key(tiny_loaded, tmp_path, mesh_home):
    mesh_home.mkdir(parents=True, exist_ok=True)
    (mesh_home / "api_keys").write_text("# operators\nfile-key-123456\n")
    (mesh_home / "api_keys").chmod(0o600)  # a keys file others can read is refused
    async with api_mesh([tiny_loaded], tmp_path, keys=("cli-key-123456",), console=True) as (mesh, api):
        for bad in ("wrong-key-123456", "none-needed"):
            with pytest.raises(openai.AuthenticationError) as refused:
                await client(api, bad).models.list()
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        async with httpx2.AsyncClient(base_url=api.origin) as http:
            for path in ("/v1/models", "/console/api/status"):
                bare = await http.get(path)
                assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
                assert set(bare.json()["error"]) == {"message", "type", "param", "code"}
            assert (await http.get("/console")).status_code == 200  # the page itself asks for the key
            scrape = await http.get("/metrics")  # a Prometheus scrape on this machine needs no key ...
            assert scrape.status_code == 200 and "mesh_router_completion_tokens_total" in scrape.text
            assert "_created" not in scrape.text
        remote = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api.server.config.app, client=("203.0.113.9", 4242)),
                                    base_url="http://mesh")
        async with remote:  # ... one from another host does
            assert (await remote.get("/metrics")).status_code == 401
            assert (await remote.get("/metrics", headers={"Authorization": "Bearer cli-key-123456"})).status_code == 200
        for good in ("cli-key-123456", "file-key-123456"):
            assert (await client(api, good).models.list()).data[0].id == "mesh"
        assert "export OPENAI_API_KEY=cli-key-123456" in client_settings(api)


async def test_errors_in_the_openai_shape(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path) as (mesh, api):
        c = client(api)
        user = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.BadRequestError) as bad_n:
            await c.chat.completions.create(model="mesh", messages=user, n=2)
        assert bad_n.value.status_code == 400 and bad_n.value.param == "n" and "n must be 1" in bad_n.value.message
        with pytest.raises(openai.NotFoundError) as unknown:
            await c.chat.completions.create(model="gpt-4o", messages=user)
        assert unknown.value.code == "model_not_found" and "mesh" in unknown.value.message
        with pytest.raises(openai.BadRequestError) as big_k:
            await c.completions.create(model="mesh", prompt="Hi", extra_body={"k": 5})
        assert "k=5" in big_k.value.message and big_k.value.code == "invalid_argument"
        with pytest.raises(openai.BadRequestError) as policy:
            await c.completions.create(model="mesh", prompt="Hi", extra_body={"policy": "psychic"})
        assert "psychic" in policy.value.message
        with pytest.raises(openai.BadRequestError) as temp:
            await c.completions.create(model="mesh", prompt="Hi", temperature=3)
        assert temp.value.param == "temperature"
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="mesh", messages=user, stream=True, extra_body={"k": 9})
        async with httpx2.AsyncClient(base_url=api.origin) as http:
            broken = await http.post("/v1/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
            assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
            missing = await http.get("/v1/nothing-here")
            assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
            console_off = await http.get("/console")
            assert console_off.status_code == 404 and "--console" in console_off.json()["error"]["message"]


async def test_no_experts_is_a_clear_503(tmp_path):
    async with api_mesh([], tmp_path) as (mesh, api):
        with pytest.raises(openai.InternalServerError) as empty:
            await client(api).completions.create(model="mesh", prompt="Hi")
        assert empty.value.status_code == 503 and "no experts online" in empty.value.message


async def test_halted_mesh_answers_503_at_once_and_mid_stream(tiny_loaded, tmp_path):
    config = governed_config(tmp_path)
    async with api_mesh([tiny_loaded] * 2, tmp_path, router_config=config,
                        expert_kw={"delay_ms": 20}) as (mesh, api):
        c = client(api)
        stream = await c.chat.completions.create(model="mesh", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=200, stream=True, extra_body={"k": 2})
        got = 0
        with pytest.raises(openai.APIError) as mid:
            async for _ in stream:
                got += 1
                if got == 3:
                    msg = sign(member_keys.load_key("alice"), "alice", {"action": "halt", "reason": "api test"})
                    mesh.router.governance.halt(msg)
        assert "halted" in mid.value.message and "api test" in mid.value.message
        for streamed in (False, True):
            with pytest.raises(openai.InternalServerError) as refused:
                await asyncio.wait_for(c.chat.completions.create(
                    model="mesh", messages=[{"role": "user", "content": "Hi"}], stream=streamed), 5)
            assert refused.value.status_code == 503 and refused.value.code == "mesh_halted"
            assert "api test" in refused.value.message and "mesh resume" in refused.value.message


async def test_a_client_that_goes_away_ends_its_generation(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded], tmp_path, expert_kw={"delay_ms": 20}) as (mesh, api):
        async with httpx2.AsyncClient(base_url=api.origin, timeout=30) as http:
            body = {"model": "mesh", "prompt": PROMPT, "max_tokens": 200, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
        for _ in range(30):  # 200 tokens at 20 ms a step would take 4 s: the generation must end well before
            status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
            if status.active_generations == 0:
                break
            await asyncio.sleep(0.05)
        assert status.active_generations == 0


def test_cli_serve_prints_client_settings_and_serves(mesh_home):
    from tests.real_model import free_port

    env = dict(os.environ, MESH_HOME=str(mesh_home), COLUMNS="250")
    api_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", "0",
                             "--api-port", str(api_port), "--console", "--api-key", "cli-key-123456"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "metrics:" in line:
                break
        out = "".join(lines)
        assert f"export OPENAI_BASE_URL=http://127.0.0.1:{api_port}/v1" in out, out
        assert "export OPENAI_API_KEY=cli-key-123456" in out and "model: mesh" in out
        assert re.search(rf"console: http://127.0.0.1:{api_port}/console", out)
        reply = httpx2.get(f"http://127.0.0.1:{api_port}/v1/models",
                           headers={"Authorization": "Bearer cli-key-123456"}, timeout=10)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "mesh"
    finally:
        proc.terminate()
        proc.wait(timeout=20)

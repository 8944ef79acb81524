"""Oversized requests are refused with errors that say what to do: gRPC INVALID_ARGUMENT, HTTP 400 in OpenAI's shape."""

from __future__ import annotations

import grpc
import httpx2
import pytest

from mesh_llm.node import RouterConfig
from tests.api_helpers import PROMPT, api_mesh

CONTEXT = 256  # the tiny test model's context limit


async def refused_grpc(mesh, **fields) -> grpc.aio.AioRpcError:
    """The error of a Generate call that must be refused."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate(**{"prompt": PROMPT, "k": 1, **fields})
    return err.value


async def post(api, path: str, body: dict) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=api.base_url, timeout=60) as http:
        return await http.post(path, json={"model": "mesh", **body})


def assert_openai_400(reply: httpx2.Response, *words: str) -> None:
    """HTTP 400 with an OpenAI error body whose message has every one of words."""
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert all(w in error["message"] for w in words), error["message"]


async def test_max_tokens_above_the_context_is_refused_not_clipped(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded], tmp_path) as (mesh, api):
        err = await refused_grpc(mesh, max_tokens=CONTEXT + 1)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_tokens {CONTEXT + 1}" in err.details() and f"context of {CONTEXT}" in err.details()
        assert_openai_400(await post(api, "/completions", {"prompt": PROMPT, "max_tokens": CONTEXT + 1}),
                          "max_tokens", str(CONTEXT))
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}
        assert_openai_400(await post(api, "/chat/completions", chat), "max_tokens 10000")
        # a request that fits is still served after the refusals
        _, done = await mesh.generate(prompt=PROMPT, k=1, max_tokens=3)
        assert done.completion_tokens == 3


async def test_prompt_above_the_configured_length_is_refused(tiny_loaded, tmp_path):
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", max_prompt_chars=40)
    async with api_mesh([tiny_loaded], tmp_path, router_config=config) as (mesh, api):
        err = await refused_grpc(mesh, prompt="x" * 41, max_tokens=2)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "41 characters" in err.details() and "at most 40" in err.details()
        assert_openai_400(await post(api, "/completions", {"prompt": "y" * 50, "max_tokens": 2}),
                          "50 characters", "shorter prompt")
        _, done = await mesh.generate(prompt="x" * 40, k=1, max_tokens=2)
        assert done.completion_tokens == 2


async def test_top_k_above_the_bound_is_refused(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded], tmp_path) as (mesh, api):
        err = await refused_grpc(mesh, top_k=tiny_loaded.vocab_size + 1, max_tokens=2)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.details()
        assert_openai_400(await post(api, "/completions", {"prompt": PROMPT, "max_tokens": 2, "top_k": 5000}),
                          "top_k")
        assert_openai_400(await post(api, "/completions", {"prompt": PROMPT, "max_tokens": 2, "top_k": 1000}),
                          "top_k 1000 exceeds")


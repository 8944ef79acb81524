"""End to end: router plus tiny experts over real gRPC in one process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import RouterUnavailable, RouterUnreachable, stream_generate
from mesh_llm.testing.tiny_model import build_tiny_llama
from tests.mesh_helpers import greedy_reference, local_mesh

PROMPT = "The capital of France is"


async def test_k1_greedy_equals_single_model(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        tokens, done = await mesh.generate(prompt=PROMPT, k=1, max_tokens=12, trace=True)
    prompt_ids = tiny_loaded.tokenizer(PROMPT).input_ids
    expected = greedy_reference(tiny_loaded, prompt_ids, 12)
    got = [t.token_id for t in tokens]
    eos = set(tiny_loaded.eos_token_ids)
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert got[:cut] == expected[:cut]
    assert done.finish_reason in ("length", "eos") and done.prompt_tokens == len(prompt_ids)
    assert all(len(t.trace.calls) == 1 and t.trace.calls[0].outcome == "ok" for t in tokens)


async def test_k_equals_n_with_identical_experts_equals_single_model(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path) as mesh:
        for rule in ("linear", "geometric"):
            tokens, _ = await mesh.generate(prompt=PROMPT, k=3, max_tokens=10, mix=rule)
            assert all(len(t.expert_ids) == 3 for t in tokens)
            expected = greedy_reference(tiny_loaded, tiny_loaded.tokenizer(PROMPT).input_ids, 10)
            assert [t.token_id for t in tokens] == expected[:len(tokens)]


async def test_seeded_sampling_is_reproducible_and_text_matches_tokens(tiny_loaded, tiny_model_dir_b, tmp_path):
    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    async with local_mesh([tiny_loaded, other, tiny_loaded], tmp_path) as mesh:
        runs = [await mesh.generate(prompt=PROMPT, k=2, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
                for _ in range(2)]
    (t1, d1), (t2, d2) = runs
    assert [t.token_id for t in t1] == [t.token_id for t in t2]
    assert [list(t.expert_ids) for t in t1] == [list(t.expert_ids) for t in t2]
    assert "".join(t.text for t in t1) == d1.text


async def test_killed_expert_does_not_stop_generation(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path) as mesh:
        victim = mesh.experts[0]
        seen, done = await mesh.generate_killing(victim, 3, prompt=PROMPT, k=2, max_tokens=24, trace=True,
                                                 policy="random", seed=1)
        assert done.finish_reason in ("length", "eos") and len(seen) >= 4
        dead_id = victim.link.expert_id
        assert any(c.expert_id == dead_id and c.outcome.startswith("error") for t in seen for c in t.trace.calls)
        assert all(len(t.expert_ids) == 2 for t in seen)


async def test_slow_expert_does_not_slow_k_of_k_plus_one(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 2, tmp_path) as mesh:
        slow = await mesh.add_expert(tiny_loaded, delay_ms=1500)
        tokens, done = await mesh.generate(prompt=PROMPT, k=2, extra=1, max_tokens=6, trace=True)
    slow_id = slow.link.expert_id
    assert done.finish_reason in ("length", "eos")
    for t in tokens:
        assert slow_id not in t.expert_ids
        assert any(c.expert_id == slow_id and c.outcome == "late" for c in t.trace.calls)
    assert done.tokens_per_second > 1 / 1.5


async def test_experts_that_missed_tokens_catch_up(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path) as mesh:
        tokens, _ = await mesh.generate(prompt=PROMPT, k=1, max_tokens=15, policy="random", seed=3)
    expected = greedy_reference(tiny_loaded, tiny_loaded.tokenizer(PROMPT).input_ids, 15)
    assert [t.token_id for t in tokens] == expected[:len(tokens)]
    assert len({t.expert_ids[0] for t in tokens}) > 1  # several experts took turns and caught up


@pytest.mark.parametrize("fields, code, words", [
    ({"k": 5}, grpc.StatusCode.INVALID_ARGUMENT, "only 1 expert"),
    ({"policy": "psychic"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown selection policy"),
    ({"mix": "median"}, grpc.StatusCode.INVALID_ARGUMENT, "median"),
    ({"prompt": "word " * 400}, grpc.StatusCode.INVALID_ARGUMENT, "context limit"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"model_family": "f" * 64}, grpc.StatusCode.NOT_FOUND, "tokenizer family"),
])
async def test_bad_requests_get_clear_errors(tiny_loaded, tmp_path, fields, code, words):
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(**{"prompt": PROMPT, "max_tokens": 4, **fields})
        assert err.value.code() == code and words in err.value.details()
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=2, k=1)
        assert done.completion_tokens == 2


async def test_a_router_refusing_is_not_taken_for_a_router_gone(tmp_path):
    async def generate(address: str) -> None:
        async for _ in stream_generate(address, router_pb2.GenerateRequest(prompt=PROMPT), timeout=10):
            pass

    async with local_mesh([], tmp_path) as mesh:
        with pytest.raises(RouterUnavailable) as answered:  # UNAVAILABLE from the router itself: it is there
            await generate(mesh.router.address)
        assert not isinstance(answered.value, RouterUnreachable) and "no experts online" in str(answered.value)
        address = mesh.router.address
    with pytest.raises(RouterUnreachable, match="no router answers"):  # the same address with the router stopped
        await generate(address)


async def test_no_experts_wrong_secret_and_mixed_tokenizers(tiny_loaded, tmp_path):
    async with local_mesh([], tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt=PROMPT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no experts online" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.RegisterExpert(router_pb2.RegisterExpertRequest(mesh_secret="wrong", address="x:1"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        odd = load(LoadOptions(model=str(build_tiny_llama(tmp_path / "odd", vocab_size=300)), device="cpu"))
        await mesh.add_expert(tiny_loaded)
        await mesh.add_expert(tiny_loaded)
        await mesh.add_expert(odd)
        tokens, done = await mesh.generate(prompt=PROMPT, k=2, max_tokens=4)
        assert any("another tokenizer family" in n for n in done.notes)
        odd_id = mesh.experts[-1].link.expert_id
        assert all(odd_id not in t.expert_ids for t in tokens)


async def test_status_lists_experts_and_dead_expert_is_noticed(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 2, tmp_path) as mesh:
        status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
        assert len(status.experts) == 2 and all(e.state == "online" for e in status.experts)
        dead = mesh.experts[0]
        await dead.stop(0)
        for _ in range(60):
            await asyncio.sleep(0.1)
            states = {e.expert_id: e.state for e in
                      (await mesh.stub.ListExperts(router_pb2.ListExpertsRequest())).experts}
            if states[dead.link.expert_id] == "gone":
                break
        assert states[dead.link.expert_id] == "gone"  # noticed within 6 s

"""The Expert gRPC service against in-process log_softmax, rollbacks, eviction and bad input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh_llm.expert.sessions import SessionLimits
from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2
from tests.expert_helpers import decode_reply, reference_logprobs, running_expert

PROMPT = [5, 17, 42, 99, 3, 250, 7]


def assert_matches(dist, ref_row, k):
    """Sparse distribution equals the top-k of a reference log_softmax row within 1e-4."""
    order = np.argsort(-ref_row, kind="stable")[:k]
    assert set(dist.ids.tolist()) == set(order.tolist())
    np.testing.assert_allclose(dist.logprobs, ref_row[dist.ids], atol=1e-4)
    rest = np.logaddexp.reduce(np.delete(ref_row, dist.ids))
    assert abs(dist.rest_logmass - rest) < 1e-4


async def step(stub, sid, start, tokens, k=16, all_positions=False, encoding=expert_pb2.LOGPROB_F32):
    return await stub.Step(expert_pb2.StepRequest(session_id=sid, start_position=start, tokens=tokens, top_k=k,
                                                  all_positions=all_positions, encoding=encoding))


async def test_prefill_incremental_rollback_and_verify_match_log_softmax(tiny_loaded):
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (_, stub):
        full = PROMPT + [11, 12, 13, 14]
        ref = reference_logprobs(tiny_loaded, full)
        reply = await step(stub, "s", 0, PROMPT)
        assert reply.session_length == len(PROMPT)
        assert_matches(decode_reply(reply, vocab)[0], ref[len(PROMPT) - 1], 16)
        for i, tok in enumerate(full[len(PROMPT):]):
            pos = len(PROMPT) + i
            reply = await step(stub, "s", pos, [tok])
            assert_matches(decode_reply(reply, vocab)[0], ref[pos], 16)
        # roll back two tokens through the Rollback call, then re-append different ones
        assert (await stub.Rollback(expert_pb2.RollbackRequest(session_id="s", length=9))).session_length == 9
        alt = full[:9] + [200, 201]
        ref_alt = reference_logprobs(tiny_loaded, alt)
        reply = await step(stub, "s", 9, [200, 201], k=32, all_positions=True)
        dists = decode_reply(reply, vocab)
        assert len(dists) == 2
        assert_matches(dists[0], ref_alt[9], 32)
        assert_matches(dists[1], ref_alt[10], 32)
        # a start_position shorter than held rolls back implicitly (rejected draft)
        reply = await step(stub, "s", 4, full[4:7], all_positions=True)
        assert reply.session_length == 7
        for j, d in enumerate(decode_reply(reply, vocab)):
            assert_matches(d, ref[4 + j], 16)
        # rolling back to zero and starting over
        await stub.Rollback(expert_pb2.RollbackRequest(session_id="s", length=0))
        reply = await step(stub, "s", 0, PROMPT[:3])
        assert_matches(decode_reply(reply, vocab)[0], ref[2], 16)


async def test_full_vocabulary_topk_has_no_rest_mass_and_f16_is_smaller(tiny_loaded):
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (_, stub):
        reply = await step(stub, "a", 0, PROMPT, k=vocab)
        dist = decode_reply(reply, vocab)[0]
        assert dist.rest_logmass == -np.inf and len(dist.ids) == vocab
        half = await step(stub, "b", 0, PROMPT, k=256, encoding=expert_pb2.LOGPROB_F16)
        full = await step(stub, "c", 0, PROMPT, k=256)
        assert half.ByteSize() < full.ByteSize() - 400
        np.testing.assert_allclose(decode_reply(half, vocab)[0].logprobs, decode_reply(full, vocab)[0].logprobs,
                                   atol=2e-2)


@pytest.mark.parametrize(
    "request_kwargs, code, words",
    [
        ({"session_id": "nope", "start_position": 3, "tokens": [1]}, grpc.StatusCode.NOT_FOUND, "start_position 0"),
        ({"session_id": "x", "start_position": 0, "tokens": [999999]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        ({"session_id": "x", "start_position": 0, "tokens": []}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ({"session_id": "", "start_position": 0, "tokens": [1]}, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        ({"session_id": "x", "start_position": 0, "tokens": [1] * 300}, grpc.StatusCode.OUT_OF_RANGE, "limit"),
        ({"session_id": "x", "start_position": 0, "tokens": [1], "top_k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"session_id": "x", "start_position": 0, "tokens": [1], "top_k": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"session_id": "x", "start_position": 0, "tokens": [1], "encoding": 7}, grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
    ],
)
async def test_bad_input_gets_specific_status_and_server_keeps_serving(tiny_loaded, request_kwargs, code, words):
    async with running_expert(tiny_loaded) as (_, stub):
        await step(stub, "good", 0, PROMPT)
        kwargs = {"top_k": 8, **request_kwargs}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(expert_pb2.StepRequest(**kwargs))
        assert err.value.code() == code
        assert words in err.value.details()
        reply = await step(stub, "good", len(PROMPT), [3])
        assert reply.session_length == len(PROMPT) + 1


async def test_gap_and_bad_rollback_are_refused(tiny_loaded):
    async with running_expert(tiny_loaded) as (_, stub):
        await step(stub, "g", 0, PROMPT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "g", len(PROMPT) + 2, [1])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and f"position {len(PROMPT)}" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rollback(expert_pb2.RollbackRequest(session_id="g", length=99))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rollback(expert_pb2.RollbackRequest(session_id="missing", length=0))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_oversized_message_is_refused(tiny_loaded):
    async with running_expert(tiny_loaded, max_message_bytes=4096) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "big", 0, [1] * 5000)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await step(stub, "small", 0, PROMPT)).session_length == len(PROMPT)


async def test_least_recently_used_session_is_evicted_by_count_and_bytes(tiny_loaded):
    per_token = tiny_loaded.kv_bytes_per_token
    async with running_expert(tiny_loaded, limits=SessionLimits(max_sessions=2)) as (_, stub):
        for sid in ("one", "two", "three"):
            await step(stub, sid, 0, PROMPT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "one", len(PROMPT), [1])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await step(stub, "three", len(PROMPT), [1])).session_length == len(PROMPT) + 1
    async with running_expert(tiny_loaded, limits=SessionLimits(max_bytes=per_token * 20)) as (_, stub):
        await step(stub, "a", 0, PROMPT)  # 7 tokens
        await step(stub, "b", 0, PROMPT)  # 14 tokens
        await step(stub, "c", 0, PROMPT)  # 21 > 20: "a" goes
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "a", len(PROMPT), [1])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "huge", 0, [1] * 21)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_info_health_and_reflection(tiny_loaded):
    async with running_expert(tiny_loaded) as (running, stub):
        info = await stub.Info(expert_pb2.InfoRequest())
        assert info.vocab_size == tiny_loaded.vocab_size and info.context_limit == 256
        assert info.tokenizer_fingerprint == tiny_loaded.fingerprint and len(info.tokenizer_fingerprint) == 64
        assert info.device == "cpu" and info.quantization == "none" and info.max_top_k == tiny_loaded.vocab_size
        assert list(info.eos_token_ids) == [tiny_loaded.tokenizer.eos_token_id]
        async with channel(running.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="mesh_llm.v1.Expert"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            names = {s.name for s in (await call.read()).list_services_response.service}
            await call.done_writing()
            assert "mesh_llm.v1.Expert" in names and "grpc.health.v1.Health" in names


def test_idle_sessions_expire(tiny_loaded):
    from mesh_llm.expert.sessions import SessionStore

    now = [0.0]
    store = SessionStore(SessionLimits(idle_s=10), bytes_per_token=1, clock=lambda: now[0])
    store.create("old", cache=None)
    now[0] = 5
    store.create("new", cache=None)
    now[0] = 12
    assert store.enforce() == ["old"]
    assert store.get("old") is None and store.get("new") is not None

"""Exact scoring: Step score_ids against a full forward pass, Score through the router, /v1/completions echo."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mesh_llm.pb import expert_pb2
from tests.expert_helpers import decode_reply, reference_logprobs, running_expert

TOKENS = [5, 17, 42, 99, 3, 250, 7, 11, 12, 13, 14, 200]


async def step(stub, sid, start, tokens, *, k=16, all_positions=False, score_ids=()):
    return await stub.Step(expert_pb2.StepRequest(session_id=sid, start_position=start, tokens=tokens, top_k=k,
                                                  all_positions=all_positions, score_ids=list(score_ids)))


@pytest.mark.parametrize("all_positions", [False, True])
async def test_step_scores_equal_log_softmax_of_a_full_forward_at_every_position(tiny_loaded, all_positions):
    ref = reference_logprobs(tiny_loaded, TOKENS)
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (_, stub):
        got = []
        for start, end in [(0, 5), (5, 9), (9, len(TOKENS))]:  # chunks of one session; the last scores one fewer
            score_ids = TOKENS[start + 1:end + 1]
            reply = await step(stub, "s", start, TOKENS[start:end], all_positions=all_positions, score_ids=score_ids)
            assert len(reply.score_logprobs) == len(score_ids)
            got += list(reply.score_logprobs)
            # the top-k distributions are those of a step without scores (bit for bit when the same rows are
            # computed; with one row the output layer runs over more rows, so float noise only)
            plain = await step(stub, "p", start, TOKENS[start:end], all_positions=all_positions)
            assert len(reply.distributions) == (end - start if all_positions else 1)
            for with_scores, without in zip(decode_reply(reply, vocab), decode_reply(plain, vocab), strict=True):
                np.testing.assert_array_equal(with_scores.ids, without.ids)
                np.testing.assert_allclose(with_scores.logprobs, without.logprobs, atol=0 if all_positions else 1e-5)
        expected = ref[np.arange(len(TOKENS) - 1), TOKENS[1:]]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        # a score id need not be the next token: any id of the vocabulary is scored exactly
        reply = await step(stub, "q", 0, TOKENS[:3], score_ids=[vocab - 1, 0])
        np.testing.assert_allclose(reply.score_logprobs, [ref[0, vocab - 1], ref[1, 0]], atol=1e-5)


@pytest.mark.parametrize("score_ids, words", [
    (list(range(len(TOKENS) + 1)), "at most one per appended token"),
    ([1, 10_000], "outside the vocabulary"),
])
async def test_bad_score_ids_are_refused_and_the_expert_keeps_serving(tiny_loaded, score_ids, words):
    async with running_expert(tiny_loaded) as (running, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "s", 0, TOKENS, score_ids=score_ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert len(running.service.engine.sessions) == 0
        reply = await step(stub, "s", 0, TOKENS, score_ids=TOKENS[1:])
        assert reply.session_length == len(TOKENS) and len(reply.score_logprobs) == len(TOKENS) - 1


async def test_a_reply_over_the_message_limit_is_refused_before_computing(tiny_loaded):
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (running, stub):
        engine = running.service.engine
        engine.max_reply_bytes = 100_000
        steps = engine.steps
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "s", 0, list(range(100)), k=vocab, all_positions=True, score_ids=range(1, 100))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fewer tokens per step" in err.value.details() and "smaller top_k" in err.value.details()
        assert engine.steps == steps and len(engine.sessions) == 0  # nothing was computed or kept
        # the same tokens fit with a small top_k, or one distribution
        reply = await step(stub, "s", 0, list(range(100)), k=4, all_positions=True, score_ids=range(1, 100))
        assert len(reply.distributions) == 100 and reply.ByteSize() < engine.reply_bytes(100, 4, 4, 99)
        reply = await step(stub, "t", 0, list(range(100)), k=vocab, score_ids=range(1, 100))
        assert len(reply.distributions) == 1 and len(reply.score_logprobs) == 99

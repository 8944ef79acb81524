"""The TopK wire codec: exact f32 and approximate f16 round trips, rejection of impossible replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.pb import expert_pb2
from mesh_llm.wire import MalformedDistribution, decode_topk, encode_topk

F32, F16 = expert_pb2.LOGPROB_F32, expert_pb2.LOGPROB_F16
VOCAB = 100


def topk(ids, probs, rest, encoding=F32) -> expert_pb2.TopK:
    """A TopK message from plain probabilities."""
    return encode_topk(np.asarray(ids), np.log(np.asarray(probs, dtype=np.float64)), math.log(rest), encoding)


@st.composite
def distributions(draw):
    """(ids in any order, logprobs, rest_logmass) of a normalised distribution over VOCAB."""
    k = draw(st.integers(1, 40))
    ids = np.asarray(draw(st.permutations(range(VOCAB)))[:k], dtype=np.int64)
    logits = np.asarray(draw(st.lists(st.floats(-10, 10), min_size=k + 1, max_size=k + 1)))
    logp = logits - np.logaddexp.reduce(logits)
    return ids, logp[:-1], float(logp[-1])


@settings(max_examples=100, deadline=None)
@given(dist=distributions())
def test_f32_round_trip_is_exact(dist):
    ids, logp, rest = dist
    logp32 = logp.astype(np.float32).astype(np.float64)
    rest32 = float(np.float32(rest))
    out = decode_topk(encode_topk(ids, logp32, rest32, F32), F32, VOCAB)
    order = np.argsort(ids)
    np.testing.assert_array_equal(out.ids, ids[order])
    np.testing.assert_array_equal(out.logprobs, np.minimum(logp32[order], 0.0))
    assert out.rest_logmass == min(rest32, 0.0)


@settings(max_examples=100, deadline=None)
@given(dist=distributions())
def test_f16_round_trip_is_close(dist):
    ids, logp, rest = dist
    out = decode_topk(encode_topk(ids, logp, rest, F16), F16, VOCAB)
    order = np.argsort(ids)
    np.testing.assert_array_equal(out.ids, ids[order])
    np.testing.assert_allclose(out.logprobs, logp[order], rtol=1e-3, atol=1e-3)


def test_f16_is_half_the_bytes():
    ids, probs = [3, 7, 9], [0.5, 0.3, 0.1]
    assert len(topk(ids, probs, 0.1, F16).logprobs) * 2 == len(topk(ids, probs, 0.1, F32).logprobs)


def test_rest_may_be_minus_infinity():
    msg = encode_topk(np.array([0, 1]), np.log([0.25, 0.75]), -math.inf, F32)
    assert decode_topk(msg, F32, 2).rest_logmass == -math.inf


def good() -> expert_pb2.TopK:
    return topk([2, 5, 9], [0.5, 0.3, 0.1], 0.1)


def with_logprobs(values, rest=math.log(0.1)) -> expert_pb2.TopK:
    msg = good()
    msg.logprobs = np.asarray(values, dtype="<f4").tobytes()
    msg.rest_logmass = rest
    return msg


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (with_logprobs([math.nan, math.log(0.3), math.log(0.1)]), "NaN or infinite"),
        (with_logprobs([math.inf, math.log(0.3), math.log(0.1)]), "NaN or infinite"),
        (with_logprobs([-math.inf, math.log(0.3), math.log(0.1)]), "NaN or infinite"),
        (with_logprobs([math.log(0.5), math.log(0.3), math.log(0.1)], rest=math.nan), "rest_logmass"),
        (with_logprobs([0.5, -3.0, -3.0], rest=-3.0), "above 0"),
        (with_logprobs([math.log(0.5), math.log(0.2), math.log(0.1)]), "sum to"),
        (with_logprobs([math.log(0.5), math.log(0.3)]), "bytes of logprobs"),
        (expert_pb2.TopK(id_deltas=[2, 0, 4], logprobs=good().logprobs, rest_logmass=math.log(0.1)), "duplicate"),
        (expert_pb2.TopK(id_deltas=[2, 3, 95], logprobs=good().logprobs, rest_logmass=math.log(0.1)), "outside the vocabulary"),
        (expert_pb2.TopK(), "empty"),
    ],
)
def test_malformed_replies_are_rejected(msg, why):
    with pytest.raises(MalformedDistribution, match=why):
        decode_topk(msg, F32, VOCAB)


def test_unknown_encoding_is_rejected():
    with pytest.raises(MalformedDistribution, match="encoding"):
        decode_topk(good(), 7, VOCAB)


def test_good_reply_decodes():
    d = decode_topk(good(), F32, VOCAB)
    assert d.ids.tolist() == [2, 5, 9]
    np.testing.assert_allclose(np.exp(d.logprobs), [0.5, 0.3, 0.1], rtol=1e-6)

"""Properties and hand-computed cases of sparse top-k mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.mixing.aggregation import (
    FILL_RULES,
    MIX_RULES,
    UnknownRule,
    densify,
    full_vocab_mix,
    mix,
)
from mesh_llm.wire import SparseDist

RULES = [(rule, fill) for rule in MIX_RULES for fill in FILL_RULES]


def make_dist(ids, probs, rest) -> SparseDist:
    """A SparseDist from plain probabilities."""
    with np.errstate(divide="ignore"):
        return SparseDist(ids=np.asarray(ids, dtype=np.int64), logprobs=np.log(probs), rest_logmass=math.log(rest) if rest > 0 else -math.inf)


@st.composite
def dists(draw, vocab_size: int) -> SparseDist:
    """A random normalised sparse distribution over vocab_size tokens."""
    k = draw(st.integers(1, vocab_size))
    ids = np.sort(np.asarray(draw(st.permutations(range(vocab_size)))[:k], dtype=np.int64))
    logit = st.one_of(st.floats(-8, 8), st.just(-800.0))  # -800: underflows in probability space
    logits = np.asarray(draw(st.lists(logit, min_size=k + 1, max_size=k + 1)))
    if k == vocab_size:
        logits[-1] = -np.inf  # the ids cover everything: no mass is left over
    logp = logits - np.logaddexp.reduce(logits)
    return SparseDist(ids=ids, logprobs=logp[:-1], rest_logmass=float(logp[-1]))


@st.composite
def mixes(draw, max_experts: int = 4):
    """(vocab_size, dists, weights) for a random mixing problem."""
    vocab = draw(st.integers(2, 40))
    n = draw(st.integers(1, max_experts))
    ds = [draw(dists(vocab)) for _ in range(n)]
    weights = draw(st.lists(st.floats(0.01, 100), min_size=n, max_size=n))
    return vocab, ds, weights


def total_logmass(d: SparseDist) -> float:
    return float(np.logaddexp(np.logaddexp.reduce(d.logprobs), d.rest_logmass))


def assert_same(a: SparseDist, b: SparseDist, tol: float = 1e-9) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=tol, rtol=0)
    if b.rest_logmass == -math.inf:
        assert a.rest_logmass < -700
    else:
        assert a.rest_logmass == pytest.approx(b.rest_logmass, abs=tol)


@settings(max_examples=60, deadline=None)
@given(data=mixes(max_experts=1), copies=st.integers(1, 5), weights=st.lists(st.floats(0.001, 1000), min_size=5, max_size=5))
def test_identical_experts_give_that_expert(data, copies, weights):
    vocab, (d,), _ = data
    for rule, fill in RULES:
        mixed = mix([d] * copies, vocab_size=vocab, weights=weights[:copies], rule=rule, fill=fill)
        assert_same(mixed, d)


@settings(max_examples=60, deadline=None)
@given(data=mixes(), scale=st.floats(1e-3, 1e3))
def test_weights_normalise_and_result_sums_to_one(data, scale):
    vocab, ds, weights = data
    for rule, fill in RULES:
        a = mix(ds, vocab_size=vocab, weights=weights, rule=rule, fill=fill)
        b = mix(ds, vocab_size=vocab, weights=[w * scale for w in weights], rule=rule, fill=fill)
        assert_same(a, b)
        assert total_logmass(a) == pytest.approx(0.0, abs=1e-9)
        assert np.all(a.logprobs <= 0) and a.rest_logmass <= 0
        np.testing.assert_array_equal(a.ids, np.unique(np.concatenate([d.ids for d in ds])))


@settings(max_examples=60, deadline=None)
@given(data=mixes())
def test_spread_fill_matches_the_dense_reference(data):
    vocab, ds, weights = data
    dense = np.stack([densify(d, vocab) for d in ds])
    for rule in MIX_RULES:
        if rule == "geometric" and any(d.rest_logmass == -math.inf for d in ds):
            continue  # the dense reference floors log(0); the sparse mix keeps it exact
        sparse = mix(ds, vocab_size=vocab, weights=weights, rule=rule, fill="spread")
        np.testing.assert_allclose(densify(sparse, vocab), full_vocab_mix(dense, weights, rule), atol=1e-9)


# Two experts over a vocabulary of 4: A lists {0, 1}, B lists {1, 2}; token 3 is outside the union.
A = make_dist([0, 1], [0.5, 0.3], 0.2)
B = make_dist([1, 2], [0.6, 0.2], 0.2)


def probs(d: SparseDist) -> tuple[list[int], np.ndarray, float]:
    return d.ids.tolist(), np.exp(d.logprobs), math.exp(d.rest_logmass)


def test_linear_spread_by_hand():
    # A gives its 0.2 leftover as 0.1 to each of tokens 2 and 3; B gives 0.1 to each of 0 and 3.
    ids, p, rest = probs(mix([A, B], vocab_size=4, rule="linear"))
    assert ids == [0, 1, 2]
    np.testing.assert_allclose(p, [0.3, 0.45, 0.15])
    assert rest == pytest.approx(0.1)


def test_linear_weighted_by_hand():
    ids, p, rest = probs(mix([A, B], vocab_size=4, weights=[3, 1]))
    np.testing.assert_allclose(p, [0.75 * 0.5 + 0.25 * 0.1, 0.75 * 0.3 + 0.25 * 0.6, 0.75 * 0.1 + 0.25 * 0.2])
    assert rest == pytest.approx(0.1)


def test_geometric_spread_by_hand():
    raw = np.sqrt([0.5 * 0.1, 0.3 * 0.6, 0.1 * 0.2, 0.1 * 0.1])
    ids, p, rest = probs(mix([A, B], vocab_size=4, rule="geometric"))
    np.testing.assert_allclose(p, raw[:3] / raw.sum())
    assert rest == pytest.approx(raw[3] / raw.sum())


def test_zero_fill_by_hand():
    # Missing tokens get nothing; each expert's whole leftover lies outside the union.
    ids, p, rest = probs(mix([A, B], vocab_size=4, fill="zero"))
    np.testing.assert_allclose(p, [0.25, 0.45, 0.1])
    assert rest == pytest.approx(0.2)
    ids, p, rest = probs(mix([A, B], vocab_size=4, rule="geometric", fill="zero"))
    # Geometric: tokens 0 and 2 are floored to nothing; token 1 and the outside token 3 remain.
    assert p[0] < 1e-300 and p[2] < 1e-300
    assert p[1] == pytest.approx(math.sqrt(0.3 * 0.6) / (math.sqrt(0.3 * 0.6) + 0.2))
    assert rest == pytest.approx(0.2 / (math.sqrt(0.3 * 0.6) + 0.2))


def test_floor_fill_by_hand():
    # C's smallest listed prob (0.05) is below its spread value (0.45 / 2): the floor is 0.05.
    c = make_dist([0, 1], [0.5, 0.05], 0.45)
    ids, p, rest = probs(mix([c, B], vocab_size=4, fill="floor"))
    # B: min(0.2, 0.2 / 2) = 0.1 for token 0; outside: C 0.45 - 0.05, B 0.2 - 0.1.
    np.testing.assert_allclose(p, [(0.5 + 0.1) / 2, (0.05 + 0.6) / 2, (0.05 + 0.2) / 2])
    assert rest == pytest.approx((0.4 + 0.1) / 2)


def test_union_covering_the_vocabulary_has_no_rest():
    d = mix([make_dist([0, 1], [0.5, 0.3], 0.2), make_dist([2], [0.9], 0.1)], vocab_size=3)
    assert d.rest_logmass == -math.inf
    assert total_logmass(d) == pytest.approx(0.0, abs=1e-12)


def test_zero_weight_expert_is_left_out():
    assert_same(mix([A, B], vocab_size=4, weights=[1, 0]), A)


def test_bad_rules_and_weights_are_clear_errors():
    with pytest.raises(UnknownRule, match="linear, geometric"):
        mix([A], vocab_size=4, rule="median")
    with pytest.raises(UnknownRule, match="spread, zero, floor"):
        mix([A], vocab_size=4, fill="nearest")
    for bad in ([1.0], [-1.0, 1.0], [0.0, 0.0], [math.nan, 1.0]):
        with pytest.raises(ValueError):
            mix([A, B], vocab_size=4, weights=bad)
    with pytest.raises(ValueError):
        mix([], vocab_size=4)


def test_linear_keeps_tiny_probabilities_finite():
    # e^-800 underflows in probability space: the mix falls back to exact log-sum-exp.
    a = SparseDist(ids=np.array([0, 1]), logprobs=np.array([0.0, -800.0]), rest_logmass=-900.0)
    b = SparseDist(ids=np.array([0, 1]), logprobs=np.array([0.0, -810.0]), rest_logmass=-905.0)
    mixed = mix([a, b], vocab_size=3, weights=[1, 3])
    expected = np.logaddexp(math.log(0.25) - 800.0, math.log(0.75) - 810.0)
    assert mixed.logprobs[1] == pytest.approx(expected, rel=1e-12)
    assert mixed.rest_logmass == pytest.approx(np.logaddexp(math.log(0.25) - 900.0, math.log(0.75) - 905.0), rel=1e-12)
    reference = full_vocab_mix(np.stack([densify(a, 3), densify(b, 3)]), [1, 3])
    np.testing.assert_allclose(densify(mixed, 3), reference, rtol=1e-12)

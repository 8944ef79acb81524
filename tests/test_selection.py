"""Per-token expert selection policies, the policy registry and tokenizer families."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from mesh_llm.mixing import selection
from mesh_llm.mixing.selection import (
    Candidate,
    GatedPolicy,
    UnknownPolicy,
    get_policy,
    pick_family,
    policy_names,
    register_policy,
)


def cand(i: int, *, rtt=10.0, tps=10.0, weight=1.0, fp="tok-a") -> Candidate:
    return Candidate(expert_id=f"e{i:02d}", rtt_ms=rtt, tokens_per_second=tps, weight=weight, tokenizer_fingerprint=fp)


POOL = [cand(i) for i in range(8)]


def ids(picked) -> list[str]:
    return [c.expert_id for c in picked]


@pytest.mark.parametrize("name", ["random", "capacity", "latency"])
def test_policies_pick_distinct_candidates_reproducibly(name):
    policy = get_policy(name)

    def run(pool):
        rng = np.random.default_rng(1)
        return [ids(policy.select(pool, 3, rng)) for _ in range(20)]

    first = run(POOL)
    assert first == run(list(reversed(POOL)))  # the candidates' order does not matter
    assert all(len(set(p)) == 3 for p in first)


@pytest.mark.parametrize("name", ["random", "capacity", "latency"])
def test_fewer_candidates_than_asked_degrades(name):
    picked = get_policy(name).select(POOL[:2], 4, np.random.default_rng(0))
    assert sorted(ids(picked)) == ["e00", "e01"]
    assert get_policy(name).select([], 2, np.random.default_rng(0)) == []


def test_random_is_roughly_uniform_and_skips_weight_zero():
    pool = POOL[:4] + [cand(9, weight=0.0)]
    rng = np.random.default_rng(0)
    counts = Counter(e for _ in range(4000) for e in ids(get_policy("random").select(pool, 2, rng)))
    assert "e09" not in counts
    for e in ("e00", "e01", "e02", "e03"):
        assert counts[e] / 4000 == pytest.approx(0.5, abs=0.05)


def test_capacity_prefers_fast_heavy_experts():
    pool = [cand(0, tps=100.0), cand(1, tps=10.0), cand(2, tps=10.0, weight=10.0), cand(3, tps=0.0)]
    rng = np.random.default_rng(0)
    firsts = Counter(get_policy("capacity").select(pool, 1, rng)[0].expert_id for _ in range(6000))
    # Odds 100 : 10 : 100 : median(100, 10, 10) = 10 for the unmeasured one.
    assert firsts["e00"] / 6000 == pytest.approx(100 / 220, abs=0.03)
    assert firsts["e02"] / 6000 == pytest.approx(100 / 220, abs=0.03)
    assert firsts["e01"] / 6000 == pytest.approx(10 / 220, abs=0.02)
    assert firsts["e03"] / 6000 == pytest.approx(10 / 220, abs=0.02)


def test_latency_bounds_and_orders_by_rtt():
    pool = [cand(0, rtt=50.0), cand(1, rtt=120.0), cand(2, rtt=5.0), cand(3, rtt=math.nan), cand(4, rtt=80.0)]
    picked = ids(get_policy("latency").select(pool, 5, np.random.default_rng(0)))
    assert picked == ["e03", "e02", "e00", "e04"]  # unmeasured first, then by RTT; e01 is over 80 ms
    strict = get_policy("latency", max_rtt_ms=20.0)
    assert ids(strict.select(pool, 5, np.random.default_rng(0))) == ["e03", "e02"]


def test_learned_gate_interface(monkeypatch):
    def gate(candidates, context):
        return np.array([float(c.expert_id[-1]) + (context.position if context else 0) for c in candidates])

    monkeypatch.setattr(selection, "_POLICIES", dict(selection._POLICIES))  # the test's policy leaves with the test
    register_policy("test-gate", lambda: GatedPolicy(gate=gate))
    picked = get_policy("test-gate").select(POOL, 2, np.random.default_rng(0))
    assert ids(picked) == ["e07", "e06"]
    bad = GatedPolicy(gate=lambda cands, ctx: np.zeros(len(cands) + 1))
    with pytest.raises(ValueError, match="scores"):
        bad.select(POOL, 2, np.random.default_rng(0))


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(UnknownPolicy) as err:
        get_policy("oracle")
    for name in ("random", "capacity", "latency"):
        assert name in str(err.value)
    assert {"random", "capacity", "latency"} <= set(policy_names())


def test_pick_family():
    mixed = [cand(0, fp="a"), cand(1, fp="b"), cand(2, fp="b"), cand(3, fp="c")]
    assert ids(pick_family(mixed)) == ["e01", "e02"]
    assert ids(pick_family(mixed, "a")) == ["e00"]
    assert pick_family(mixed, "zzz") == []
    assert pick_family([]) == []
    assert ids(pick_family([cand(0, fp="b"), cand(1, fp="a")])) == ["e01"]  # tie: smallest fingerprint

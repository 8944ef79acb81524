"""Sampling from mixed distributions, and stop conditions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from mesh_llm.mixing.sampling import Sampler, SamplingConfig, StopChecker
from mesh_llm.wire import SparseDist

# Listed mass 0.5 over 4 tokens; the other half is rest mass that must never be sampled.
PROBS = np.array([0.05, 0.25, 0.15, 0.05])
DIST = SparseDist(ids=np.array([3, 10, 20, 40]), logprobs=np.log(PROBS), rest_logmass=math.log(0.5))


def draw(config: SamplingConfig, n: int = 4000, seed: int = 0) -> Counter:
    sampler = Sampler(config, seed=seed)
    return Counter(sampler.sample(DIST).token_id for _ in range(n))


def test_greedy_picks_the_argmax_with_its_logprob():
    choice = Sampler(SamplingConfig()).sample(DIST)
    assert choice.token_id == 10
    assert choice.logprob == pytest.approx(math.log(0.25))


def test_greedy_ties_go_to_the_lowest_id():
    tie = SparseDist(ids=np.array([1, 2, 7]), logprobs=np.log([0.1, 0.45, 0.45]), rest_logmass=-math.inf)
    assert Sampler(SamplingConfig()).sample(tie).token_id == 2


def test_seeded_runs_repeat_and_seeds_differ():
    config = SamplingConfig(temperature=1.0, top_p=0.9)
    runs = [[s.sample(DIST).token_id for _ in range(50)] for s in (Sampler(config, seed=7), Sampler(config, seed=7))]
    assert runs[0] == runs[1]
    other = [Sampler(config, seed=8).sample(DIST).token_id for _ in range(50)]
    assert other != runs[0]


def test_temperature_one_follows_the_listed_probabilities():
    counts = draw(SamplingConfig(temperature=1.0), n=20000)
    assert set(counts) <= set(DIST.ids.tolist())  # never anything from the rest mass
    for token, p in zip(DIST.ids.tolist(), PROBS / PROBS.sum()):
        assert counts[token] / 20000 == pytest.approx(p, abs=0.015)


def test_low_temperature_sharpens():
    counts = draw(SamplingConfig(temperature=0.05))
    assert counts[10] > 3900


def test_top_k_restricts_the_candidates():
    assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) == {10, 20}
    assert set(draw(SamplingConfig(temperature=1.0, top_k=1))) == {10}


def test_top_p_keeps_the_smallest_nucleus():
    # Renormalised over the listed ids: 0.5, 0.3, 0.1, 0.1.
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.45))) == {10}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.75))) == {10, 20}
    # Ids 3 and 40 tie; the sort is stable, so the lower index (id 3) joins the nucleus.
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.85))) == {3, 10, 20}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=1.0))) == {3, 10, 20, 40}


def test_bad_configs_are_refused():
    for bad in (dict(temperature=-1), dict(temperature=math.nan), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_stop_string_truncates_the_text():
    checker = StopChecker(stop=["\n\n", "END"], max_tokens=100)
    assert checker.update(1, "Hello") is None
    assert checker.update(2, "Hello wor") is None
    assert checker.update(3, "Hello world EN") is None
    assert checker.streamable() == "Hello world "  # "EN" could still become "END"
    assert checker.update(4, "Hello world END and more") == "stop"
    assert checker.text == "Hello world "
    with pytest.raises(RuntimeError):
        checker.update(5, "x")


def test_earliest_stop_string_wins():
    checker = StopChecker(stop=["b", "a"])
    assert checker.update(1, "xxabxx") == "stop"
    assert checker.text == "xx"


def test_max_tokens_and_eos():
    checker = StopChecker(max_tokens=2, eos_ids=[0])
    assert checker.update(5, "a") is None
    assert checker.update(6, "ab") == "length"
    assert checker.text == "ab"
    eos = StopChecker(max_tokens=10, eos_ids=[0, 2])
    eos.update(5, "hi")
    assert eos.update(2, "hi</s>") == "eos"
    assert eos.text == "hi" and eos.n_tokens == 2
    with pytest.raises(ValueError):
        StopChecker(max_tokens=0)

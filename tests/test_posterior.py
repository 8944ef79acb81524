"""Context-posterior routing: the maths, and the live router choosing and weighting experts by it."""

from __future__ import annotations

import math

import pytest
import torch

from mesh_llm.governance.tiers import BUILTIN_SPECS, MOST_RESTRICTIVE, ProposalIn, classify
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.router.posterior import PosteriorConfig, PosteriorTracker, mixing_weights, posterior
from mesh_llm.router.settings import MeshSettings
from tests.mesh_helpers import local_mesh

PROMPT = "The capital of France is Paris. The capital of Italy is"


def test_posterior_is_a_tempered_softmax_of_mean_loglikelihoods():
    post = posterior({"a": -2.0, "b": -2.1, "c": -3.0}, temperature=0.1)
    assert math.isclose(sum(post.values()), 1.0)
    assert math.isclose(post["a"] / post["b"], math.exp(1.0)) and post["c"] < 1e-4
    flat = posterior({"a": -2.0, "b": -2.1}, temperature=100.0)
    assert abs(flat["a"] - 0.5) < 0.01


def test_mixing_weights_renormalise_over_the_chosen_and_keep_a_floor():
    post = {"a": 0.7, "b": 0.29, "c": 0.01}
    w = mixing_weights(post, ["a", "b"], floor=0.0)
    assert w == pytest.approx([0.7 / 0.99, 0.29 / 0.99])
    w = mixing_weights(post, ["a", "c"], floor=0.2)
    assert w[1] == pytest.approx(0.2 / (0.7 / 0.71 + 0.2)) and sum(w) == pytest.approx(1.0)


def test_tracker_slides_over_the_recent_window_and_freezes_for_prompt_only():
    tracker = PosteriorTracker(PosteriorConfig(window=3))
    tracker.record("a", 1, [-5.0, -5.0, -1.0, -1.0, -1.0])
    tracker.record("b", 1, [-1.0, -1.0, -3.0, -3.0, -3.0])
    assert tracker.mean_logprobs() == {"a": -1.0, "b": -3.0}
    for start in range(6, 1000, 10):  # a long generation keeps only about the last window per expert
        tracker.record("a", start, [-2.0] * 10)
    assert len(tracker.scores["a"]) <= 6 and tracker.mean_logprobs()["a"] == -2.0
    frozen = PosteriorTracker(PosteriorConfig(prompt_only=True))
    frozen.record("a", 1, [-1.0])
    frozen.freeze_if_prompt_only()
    frozen.record("a", 2, [-9.0])
    assert frozen.mean_logprobs() == {"a": -1.0}
    with pytest.raises(ValueError, match="temperature"):
        PosteriorConfig(temperature=0)


def test_posterior_policies_are_within_governance_bounds():
    spec = BUILTIN_SPECS["set_selection_policy"]
    for name in ("posterior", "posterior-prompt"):
        tier, why = classify(spec, ProposalIn(kind="set_selection_policy", target="router", params={"policy": name},
                                              rationale="route by context"))
        assert tier == spec.tier != MOST_RESTRICTIVE, why


def _prompt_loglik(loaded, ids: list[int]) -> float:
    with torch.inference_mode():
        logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


def _next_probs(loaded, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


@pytest.mark.parametrize("policy", ["posterior", "posterior-prompt"])
async def test_live_router_picks_and_weights_experts_by_their_prompt_likelihood(tiny_loaded, tiny_model_dir_b,
                                                                                 tmp_path, policy):
    from mesh_llm.node import RouterConfig

    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    models = [tiny_loaded, other, tiny_loaded]
    settings = MeshSettings(posterior_temperature=0.05, posterior_floor=0.1)
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", settings=settings)
    async with local_mesh(models, tmp_path, router_config=config) as mesh:
        ids = [e.link.expert_id for e in mesh.experts]
        prompt_ids = tiny_loaded.tokenizer(PROMPT).input_ids
        means = {i: _prompt_loglik(m, prompt_ids) for i, m in zip(ids, models)}
        best = max(means, key=means.get)
        tokens, done = await mesh.generate(prompt=PROMPT, k=1, max_tokens=6, policy=policy, trace=True)
        assert list(tokens[0].expert_ids) == [best] or means[ids[0]] == means[ids[2]] == means[best]
        assert len(tokens[0].trace.calls) == 3  # the prompt round asks every candidate: no extra round trip
        assert done.rounds == len(tokens)
        # K=2: the first token's probability is the posterior-weighted linear mixture of the two chosen
        tokens, _ = await mesh.generate(prompt=PROMPT, k=2, max_tokens=1, policy=policy, top_k=tiny_loaded.vocab_size)
        chosen = sorted(tokens[0].expert_ids)
        post = posterior(means, temperature=0.05)
        weights = mixing_weights(post, chosen, floor=0.1)
        by_id = dict(zip(ids, models))
        mixture = sum(w * _next_probs(by_id[e], prompt_ids) for w, e in zip(weights, chosen))
        assert tokens[0].logprob == pytest.approx(math.log(float(mixture[tokens[0].token_id])), abs=1e-4)
        ranked = sorted(means, key=lambda e: -post[e])
        assert set(chosen) == set(ranked[:2]) or post[ranked[1]] == post[ranked[2]]

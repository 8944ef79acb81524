"""Multi-token rounds: drafters, speculative acceptance, adaptive draft length, and draft-verify generation."""

from __future__ import annotations

import math
import random

import grpc
import numpy as np
import pytest
import torch

from mesh_llm.mixing.sampling import Sampler, SamplingConfig
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.router.drafting import NgramDrafter, UnknownDrafter, parse_draft
from mesh_llm.router.speculation import GammaController
from mesh_llm.testing.tiny_model import build_tiny_llama
from mesh_llm.wire import SparseDist
from tests.mesh_helpers import local_mesh

PROMPT = "The capital of France is"
REPEATS = "one two three four five six. one two three four five six. one two three"


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square (bins with expected < 5 merged; Wilson-Hilferty)."""
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(obs) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


# ---------- drafters and draft length ----------

def test_parse_draft_names_the_choices():
    assert parse_draft("").kind == "none" and parse_draft("ngram").kind == "ngram"
    assert parse_draft("model:smollm2-135m").model == "smollm2-135m"
    for bad in ("psychic", "model:", "model"):
        with pytest.raises(UnknownDrafter, match="none, ngram, model:NAME"):
            parse_draft(bad)


def test_ngram_drafter_continues_the_latest_occurrence_and_matches_a_brute_force_search():
    drafter = NgramDrafter(max_n=3)
    assert drafter.propose([1, 2, 3, 9, 1, 2], 3).tokens == [3, 9, 1]
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2], 2).tokens == [3, 7]  # latest, not first
    assert drafter.propose([5, 6, 7], 4).tokens == []
    rng = np.random.default_rng(0)
    context: list[int] = []
    drafter = NgramDrafter(max_n=3)
    for _ in range(300):
        context.append(int(rng.integers(0, 6)))
        expected: list[int] = []
        for n in range(min(3, len(context) - 1), 0, -1):
            suffix = context[-n:]
            ends = [e for e in range(n - 1, len(context) - 1) if context[e - n + 1: e + 1] == suffix]
            if ends:
                expected = context[ends[-1] + 1: ends[-1] + 1 + 4]
                break
        assert drafter.propose(list(context), 4).tokens == expected


def test_gamma_grows_when_drafts_pay_and_stops_drafting_when_they_do_not():
    paying = GammaController(8)
    for _ in range(30):
        g = paying.next()
        paying.observe(drafted=g, accepted=g, round_s=0.1 + 0.001 * g, draft_s=0.0005 * g)
    assert paying.next() == 8
    useless = GammaController(8)
    picks = []
    for _ in range(40):
        g = useless.next()
        picks.append(g)
        useless.observe(drafted=g, accepted=0, round_s=0.05 + 0.06 * g, draft_s=0.06 * g)
    assert picks[-16:].count(0) >= 12 and max(picks[-16:]) <= 1  # off, with an occasional probe of 1
    free = GammaController(8)  # free n-gram drafts, found now and then, that the mixture rejects
    rng = random.Random(0)
    picks = []
    for _ in range(48):
        g = free.next()
        picks.append(g)
        drafted = min(g, rng.choice([0, 0, 1, 3, 8]))
        accepted = int(drafted > 0 and rng.random() < 0.05)
        free.observe(drafted=drafted, accepted=accepted, round_s=0.1 * (1 + 0.15 * drafted), draft_s=0.0)
    assert picks[-16:].count(0) >= 12  # the verify positions still cost: drafting stops


# ---------- speculative acceptance keeps the target distribution ----------

@pytest.mark.parametrize("temperature, top_p, deterministic", [(1.0, 1.0, False), (0.7, 0.9, False),
                                                                (1.0, 1.0, True)])
def test_verify_output_follows_the_sampler_distribution(temperature, top_p, deterministic):
    rng = np.random.default_rng(1)
    vocab = 12
    ids = np.array([0, 2, 3, 5, 7, 8, 11])
    logp = np.log(rng.dirichlet(np.ones(len(ids))) * 0.9)
    dist = SparseDist(ids=ids, logprobs=logp, rest_logmass=math.log(0.1))
    q = rng.dirichlet(np.ones(vocab) * 0.5)
    config = SamplingConfig(temperature=temperature, top_p=top_p)
    sampler = Sampler(config, seed=3)
    reference = Sampler(config, seed=4)
    trials = 20000
    got, want = np.zeros(vocab), np.zeros(vocab)
    draws = rng.choice(vocab, size=trials, p=q)
    for x in draws:
        _, choice = sampler.verify(dist, 5 if deterministic else int(x), None if deterministic else q)
        got[choice.token_id] += 1
        want[reference.sample(dist).token_id] += 1
    from mesh_llm.mixing.sampling import sampling_probs

    pool, probs = sampling_probs(dist.logprobs, config)
    exact = np.zeros(vocab)
    exact[ids[pool]] = probs / probs.sum()
    assert chi_square_p(got, exact * trials) > 1e-3
    assert chi_square_p(want, exact * trials) > 1e-3
    if not deterministic:
        assert chi_square_p(got, q * trials) < 1e-6  # the check can tell the draft's distribution apart


def test_greedy_verify_accepts_exactly_the_argmax():
    dist = SparseDist(ids=np.array([1, 4, 9]), logprobs=np.log([0.2, 0.5, 0.3]), rest_logmass=-math.inf)
    sampler = Sampler(SamplingConfig(temperature=0))
    assert sampler.verify(dist, 4, None) == (True, sampler.sample(dist))
    ok, choice = sampler.verify(dist, 9, None)
    assert not ok and choice.token_id == 4


# ---------- through the mesh ----------

async def _texts(mesh, **fields):
    tokens, done = await mesh.generate(**fields)
    return [t.token_id for t in tokens], tokens, done


@pytest.mark.parametrize("rule", ["linear", "geometric"])
async def test_greedy_drafts_give_exactly_the_one_token_text(tiny_loaded, tiny_model_dir, tiny_model_dir_b,
                                                             tmp_path, rule):
    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    async with local_mesh([tiny_loaded, other], tmp_path) as mesh:
        for prompt in (PROMPT, REPEATS):
            common = dict(prompt=prompt, k=2, max_tokens=40, mix=rule, trace=True)
            plain, _, plain_done = await _texts(mesh, **common)
            for draft in ("ngram", f"model:{tiny_model_dir}", f"model:{tiny_model_dir_b}"):
                ids, tokens, done = await _texts(mesh, draft=draft, **common)
                assert ids == plain, draft
                assert done.text == plain_done.text
                assert done.rounds <= len(ids) and done.accepted_tokens == sum(t.drafted for t in tokens)
                assert [t.round for t in tokens] == sorted(t.round for t in tokens)
            assert plain_done.rounds == len(plain) and plain_done.drafted_tokens == 0


async def test_drafts_with_k_of_n_catch_up_failures_and_schema(tiny_loaded, tiny_model_dir, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path) as mesh:
        plain, _, _ = await _texts(mesh, prompt=REPEATS, k=1, max_tokens=30, policy="random", seed=3)
        drafted, tokens, done = await _texts(mesh, prompt=REPEATS, k=1, max_tokens=30, policy="random", seed=3,
                                             draft=f"model:{tiny_model_dir}", trace=True)
        assert drafted == plain  # identical experts: any selection gives the same greedy text
        assert len({t.expert_ids[0] for t in tokens}) > 1  # experts took turns and caught up mid-draft
        assert max(t.trace.positions for t in tokens) > 1
        assert done.accepted_tokens > 0 and done.rounds < len(tokens) / 2  # the experts' own model drafts well
        schema = '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
        plain_json, _, d1 = await _texts(mesh, prompt=PROMPT, k=2, max_tokens=20, json_schema=schema)
        draft_json, _, d2 = await _texts(mesh, prompt=PROMPT, k=2, max_tokens=20, json_schema=schema, draft="ngram")
        assert draft_json == plain_json and d1.text == d2.text
        victim = mesh.experts[0]
        seen, done = await mesh.generate_killing(victim, 2, prompt=REPEATS, k=2, max_tokens=24, trace=True,
                                                 draft=f"model:{tiny_model_dir}")
        assert done.finish_reason in ("length", "eos") and len(seen) >= 4
        assert [t.token_id for t in seen[:2]] == plain[:2]  # later pairs of identical experts may flip near-ties
        assert victim.link.expert_id not in seen[-1].expert_ids


@pytest.mark.parametrize("fields, words", [
    ({"draft": "psychic"}, "unknown drafter"),
    ({"draft": "ngram", "draft_max": 99}, "out of range"),
    ({"draft": "model:no-such-model"}, "draft model"),
])
async def test_bad_draft_requests_get_clear_errors(tiny_loaded, tmp_path, fields, words):
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt=PROMPT, max_tokens=4, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=4)  # the router keeps serving
        assert done.finish_reason in ("length", "eos")


async def test_draft_model_of_another_tokenizer_is_refused(tiny_loaded, tmp_path):
    foreign = build_tiny_llama(tmp_path / "foreign", seed=5, vocab_size=300)
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt=PROMPT, max_tokens=4, draft=f"model:{foreign}")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokenizer fingerprint" in err.value.details() and "--draft ngram" in err.value.details()


def _mixture(models, sequences: list[list[int]]) -> np.ndarray:
    """Linear mixture (equal weights) of the models' next-token distributions after each sequence."""
    with torch.inference_mode():
        probs = [torch.softmax(m.model(input_ids=torch.tensor(sequences)).logits[:, -1].double(), -1).numpy()
                 for m in models]
    return sum(probs) / len(probs)


async def test_sampled_drafts_keep_the_mixture_distribution(tmp_path):
    # peaked random models, so 300 samples fill enough bins; the drafter disagrees with both experts
    experts = [load(LoadOptions(model=str(build_tiny_llama(tmp_path / f"e{s}", seed=s, init_range=0.5)),
                                device="cpu")) for s in (10, 11)]
    tiny_loaded, other = experts
    drafter = build_tiny_llama(tmp_path / "drafter", seed=2, init_range=0.6)
    prompt_ids = tiny_loaded.tokenizer(PROMPT).input_ids
    vocab = tiny_loaded.vocab_size
    first = _mixture([tiny_loaded, other], [prompt_ids])[0]
    second = _mixture([tiny_loaded, other], [prompt_ids + [x] for x in range(vocab)])
    eos = list(tiny_loaded.eos_token_ids)
    first_no_eos = first.copy()
    first_no_eos[eos] = 0
    marginal = first_no_eos @ second  # P(second token = y), the generation not ended by EOS
    runs = 200
    counts = np.zeros(vocab + 1)  # the last bin: no second token (EOS first)
    async with local_mesh([tiny_loaded, other], tmp_path) as mesh:
        for seed in range(runs):
            tokens, _ = await mesh.generate(prompt=PROMPT, chat=False, k=2, max_tokens=3, temperature=1.0,
                                            top_k=vocab, seed=seed, draft=f"model:{drafter}", draft_max=2)
            counts[tokens[1].token_id if len(tokens) > 1 else vocab] += 1
    expected = np.append(marginal, first[eos].sum()) * runs
    assert chi_square_p(counts, expected) > 1e-3


async def test_api_extra_draft_shows_in_console_status_and_metrics(tiny_loaded, tiny_model_dir, tmp_path):
    import httpx2

    from tests.api_helpers import api_mesh, client

    async with api_mesh([tiny_loaded] * 2, tmp_path, console=True) as (mesh, api):
        plain = await client(api).completions.create(model="mesh", prompt=REPEATS, max_tokens=24, temperature=0)
        drafted = await client(api).completions.create(model="mesh", prompt=REPEATS, max_tokens=24, temperature=0,
                                                       extra_body={"draft": f"model:{tiny_model_dir}"})
        assert drafted.choices[0].text == plain.choices[0].text
        async with httpx2.AsyncClient(base_url=api.origin) as http:
            status = (await http.get("/console/api/status")).json()
            metrics = (await http.get("/metrics")).text
            refused = await http.post("/v1/completions", json={"model": "mesh", "prompt": "hi", "draft": "psychic"})
    assert status["tokens_per_round"] > 1 and status["draft_acceptance"] > 0 and status["draft"] == "none"
    assert 'mesh_router_draft_tokens_total{outcome="accepted"}' in metrics and "mesh_router_rounds_total" in metrics
    assert refused.status_code == 400 and "unknown drafter" in refused.json()["error"]["message"]


async def test_drafts_with_a_straggler_over_selected(tiny_loaded, tiny_model_dir, tmp_path):
    async with local_mesh([tiny_loaded] * 2, tmp_path) as mesh:
        slow = await mesh.add_expert(tiny_loaded, delay_ms=1500)
        plain, _, _ = await _texts(mesh, prompt=REPEATS, k=2, max_tokens=12)
        ids, tokens, done = await _texts(mesh, prompt=REPEATS, k=2, extra=1, max_tokens=12, trace=True,
                                         draft=f"model:{tiny_model_dir}")
    slow_id = slow.link.expert_id
    assert ids == plain and done.rounds < len(tokens)
    assert all(slow_id not in t.expert_ids for t in tokens)
    assert any(c.expert_id == slow_id and c.outcome == "late" for t in tokens for c in t.trace.calls)

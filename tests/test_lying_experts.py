"""Lying experts: spot checks against experts of the same model, trust in the store, quarantine, robust mixing.

The liars are real expert servers whose Step replies are corrupted by LyingService (experiments/bench_trust.py),
joined to a real router through the real RouterLink; the honest experts are tiny random Llamas.
"""

from __future__ import annotations

import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy import inspect
from typer.testing import CliRunner

from mesh_llm.cli.display import status_table
from mesh_llm.cli.main import app
from mesh_llm.expert.engine import StepEngine
from mesh_llm.governance import audit
from mesh_llm.mixing.aggregation import densify, divergences, full_vocab_mix, mix
from mesh_llm.mixing.selection import Candidate, RandomPolicy
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.node import RouterConfig
from mesh_llm.pb import router_pb2
from mesh_llm.router.metrics import router_metrics
from mesh_llm.router.registry import QUARANTINED
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.trust import (
    QUARANTINE_EVENT,
    TrustBook,
    TrustConfig,
    compare,
    trust_book,
    verdicts,
)
from mesh_llm.store.db import open_engine
from mesh_llm.wire import SparseDist
from tests.mesh_helpers import local_mesh
from tests.real_model import real_mesh_home  # noqa: F401  (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from bench_router import recorded_replies
from bench_trust import LyingService, _served, onehot, shuffled

PROMPT = "The capital of France is"


def dist(ids, probs, rest) -> SparseDist:
    with np.errstate(divide="ignore"):
        return SparseDist(ids=np.asarray(ids, dtype=np.int64), logprobs=np.log(probs),
                          rest_logmass=math.log(rest) if rest > 0 else -math.inf)


# robust mixing ---------------------------------------------------------------------------------------

A = dist([0, 1], [0.5, 0.3], 0.2)
A2 = dist([0, 1], [0.45, 0.35], 0.2)
LIAR = dist([5], [1.0], 0.0)


def test_robust_rule_leaves_out_the_expert_farthest_from_the_others():
    robust = mix([A, LIAR, A2], vocab_size=8, rule="robust")
    honest = mix([A, A2], vocab_size=8, rule="linear")
    assert robust.ids.tolist() == [0, 1, 5]  # the liar's id is still listed, at the honest mix's spread value
    np.testing.assert_allclose(densify(robust, 8), densify(honest, 8), atol=1e-12)
    linear = mix([A, LIAR, A2], vocab_size=8, rule="linear")
    assert math.exp(linear.logprobs[2]) > 0.3 > math.exp(robust.logprobs[2])


def test_robust_rule_is_linear_below_three_experts_and_matches_the_dense_reference():
    assert densify(mix([A, LIAR], vocab_size=8, rule="robust"), 8).tolist() == \
        densify(mix([A, LIAR], vocab_size=8, rule="linear"), 8).tolist()
    dense = np.stack([densify(d, 8) for d in (A, LIAR, A2)])
    np.testing.assert_allclose(densify(mix([A, LIAR, A2], vocab_size=8, rule="robust"), 8),
                               full_vocab_mix(dense, rule="robust"), atol=1e-9)


def test_divergences_equal_the_full_vocabulary_kl():
    dense = np.stack([np.maximum(densify(d, 8), math.log(1e-12)) for d in (A, A2)])
    p = np.exp(dense)
    kl = ((p[0] * (dense[0] - dense[1])).sum() + (p[1] * (dense[1] - dense[0])).sum()) / 2
    assert divergences([A, A2], 8)[0, 1] == pytest.approx(kl, rel=1e-9)


def test_mix_robust_is_a_router_setting_and_a_cli_choice(tmp_path):
    MeshSettings(default_mix="robust").validate()
    result = CliRunner().invoke(app, ["router", "serve", "--port", "0", "--mix", "median"])
    assert result.exit_code != 0 and "robust" in result.output


def test_fill_is_a_router_cli_choice_checked_before_serving():
    result = CliRunner().invoke(app, ["router", "serve", "--port", "0", "--fill", "uniform"])
    assert result.exit_code != 0 and "'uniform'" in result.output and "spread" in result.output, result.output


# the comparison and its tolerances -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def variants(tiny_model_dir):
    """The seed-0 tiny model as float32 and bfloat16 experts would load it."""
    return {dtype: load(LoadOptions(model=str(tiny_model_dir), device="cpu", dtype=dtype))
            for dtype in ("float32", "bfloat16")}


def test_float32_and_bfloat16_variants_agree_and_lies_do_not(variants, tiny_loaded, tiny_model_dir_b):
    config = TrustConfig()
    f32, bf16 = (recorded_replies(variants[d], 128, 64) for d in ("float32", "bfloat16"))
    other = recorded_replies(load(LoadOptions(model=str(tiny_model_dir_b), device="cpu")), 128, 64)
    vocab = tiny_loaded.vocab_size
    assert all(compare(a, b, vocab).agrees(config) for a, b in zip(f32, bf16))
    assert not any(compare(a, onehot(a), vocab).agrees(config) for a in f32)
    rng = np.random.default_rng(0)
    assert np.mean([compare(a, shuffled(a, rng), vocab).agrees(config) for a in f32]) < 0.5
    assert np.mean([compare(a, b, vocab).agrees(config) for a, b in zip(f32, other)]) < 0.5


def test_the_odd_one_out_fails_and_two_that_disagree_blame_nobody(variants, tiny_loaded):
    vocab = tiny_loaded.vocab_size
    a = recorded_replies(variants["float32"], 1, 64)[0]
    b = recorded_replies(variants["bfloat16"], 1, 64)[0]
    judged = verdicts({"a": a, "b": b, "liar": onehot(a)}, vocab, TrustConfig())
    assert {k: v[0] for k, v in judged.items()} == {"a": True, "b": True, "liar": False}
    assert "KL" in judged["liar"][1]
    assert verdicts({"a": a, "liar": onehot(a)}, vocab, TrustConfig()) == {}


# trust in the store -------------------------------------------------------------------------------------

def test_trust_falls_on_failures_recovers_slowly_and_is_kept_in_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'trust.db'}"
    engine = open_engine(url)
    assert "expert_trust" in inspect(engine).get_table_names()
    book = TrustBook(engine)
    cfg = book.config
    assert book.record({"e-1": (False, "KL 9")}) == []
    assert book.trust("e-1") == pytest.approx(cfg.initial - cfg.penalty)
    book.record({"e-1": (True, "")})
    assert book.trust("e-1") == pytest.approx(cfg.initial - cfg.penalty + cfg.recovery)
    falls = []
    for _ in range(5):
        falls += book.record({"e-1": (False, "KL 9")})
    assert falls == ["e-1"]  # quarantined once, when it fell below the threshold
    assert book.flush() == 1
    again = TrustBook(open_engine(url))
    row = again.rows()[0]
    assert (row.expert_id, row.quarantined, row.checks, row.failed) == ("e-1", True, 7, 6)
    with engine.connect() as conn:
        assert audit.verify(conn).ok
        events = [r for r in audit.rows(conn) if r.event == QUARANTINE_EVENT]
    assert len(events) == 1 and '"expert_id":"e-1"' in events[0].detail
    assert again.annotate([Candidate(expert_id="e-1", rtt_ms=1.0, tokens_per_second=1.0, weight=1.0,
                                     tokenizer_fingerprint="f")]) == []


def test_spot_check_rate_is_validated():
    with pytest.raises(ValueError, match="spot_check"):
        MeshSettings(spot_check=1.5).validate()
    result = CliRunner().invoke(app, ["router", "serve", "--port", "0", "--spot-check", "-0.1"])
    assert result.exit_code != 0 and "spot_check" in result.output


def test_an_expert_without_trust_is_never_selected():
    pool = [Candidate(expert_id=f"e{i}", rtt_ms=1.0, tokens_per_second=1.0, weight=1.0, tokenizer_fingerprint="f",
                      trust=0.0 if i == 0 else 0.5) for i in range(3)]
    for seed in range(20):
        assert "e0" not in {c.expert_id for c in RandomPolicy().select(pool, 3, np.random.default_rng(seed))}


# a liar in a live mesh -----------------------------------------------------------------------------------

def spot_checking(tmp_path, rate: float = 1.0) -> RouterConfig:
    return RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret",
                        settings=MeshSettings(spot_check=rate, default_extra=0))


async def _step_calls(mesh) -> float:
    metrics = router_metrics(mesh.router.registry)
    return sum(s.value for m in metrics.expert_calls.collect() for s in m.samples)


@pytest.mark.parametrize("lie", ["onehot", "other"])
async def test_a_lying_expert_is_quarantined_audited_and_never_selected_again(tiny_loaded, tiny_model_dir_b,
                                                                          tmp_path, lie):
    liar_model = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu")) if lie == "other" else tiny_loaded
    async with local_mesh([tiny_loaded] * 3, tmp_path, spot_checking(tmp_path)) as mesh:
        service = LyingService(StepEngine(liar_model), lie, claims=tiny_loaded.model_id)
        async with _served(service, mesh.router.invite, "liar") as liar:
            registry = mesh.router.registry
            book = trust_book(registry)
            for seed in range(6):
                await mesh.generate(prompt=PROMPT, max_tokens=8, k=2, seed=seed)
                if registry.get(liar.expert_id).state == QUARANTINED:
                    break
            assert registry.get(liar.expert_id).state == QUARANTINED
            honest = [r for r in book.rows() if r.expert_id != liar.expert_id]
            assert honest and all(not r.quarantined and r.trust >= 0.5 for r in honest)
            tokens, done = await mesh.generate(prompt=PROMPT, max_tokens=8, k=3, seed=99)
            assert done.finish_reason in ("length", "eos", "stop")
            assert all(liar.expert_id not in t.expert_ids for t in tokens)
            with registry.engine.connect() as conn:
                assert any(r.event == QUARANTINE_EVENT and liar.expert_id in r.detail for r in audit.rows(conn))
            scrape = router_metrics(registry).exposition().decode()
            assert f'mesh_router_expert_trust{{expert_id="{liar.expert_id}"}}' in scrape
            assert f'mesh_router_expert_trust_quarantined{{expert_id="{liar.expert_id}"}} 1.0' in scrape


async def test_an_operator_lifting_the_quarantine_restores_trust(tiny_loaded, tmp_path):
    async with (local_mesh([tiny_loaded] * 3, tmp_path, spot_checking(tmp_path)) as mesh,
                _served(LyingService(StepEngine(tiny_loaded), "onehot"), mesh.router.invite, "liar") as liar):
        registry, book = mesh.router.registry, trust_book(mesh.router.registry)
        for seed in range(6):
            await mesh.generate(prompt=PROMPT, max_tokens=8, k=2, seed=seed)
            if registry.get(liar.expert_id).state == QUARANTINED:
                break
        assert liar.expert_id not in {c.expert_id for c in book.annotate(registry.candidates())}
        registry.unquarantine(liar.expert_id)
        assert liar.expert_id in {c.expert_id for c in book.annotate(registry.candidates())}
        assert book.trust(liar.expert_id) == book.config.initial


async def test_trust_scales_the_mixing_weight_like_the_operator_weight(tiny_loaded, tiny_model_dir_b, tmp_path):
    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    async with local_mesh([tiny_loaded, other], tmp_path, spot_checking(tmp_path, 0.0)) as mesh:
        registry, book = mesh.router.registry, trust_book(mesh.router.registry)
        first = mesh.experts[0].link.expert_id
        fields = {"prompt": PROMPT, "max_tokens": 6, "k": 2, "seed": 3, "temperature": 1.0}

        def logprobs(tokens):
            return [round(t.logprob, 9) for t in tokens]

        full, _ = await mesh.generate(**fields)
        book.record({first: (False, "test")})
        trusted, _ = await mesh.generate(**fields)
        for _ in range(20):  # passed checks bring it back to full trust
            book.record({first: (True, "")})
        assert book.trust(first) == 1.0
        registry.set_weight(first, TrustConfig().initial - TrustConfig().penalty)
        weighted, _ = await mesh.generate(**fields)
    assert logprobs(trusted) == logprobs(weighted) != logprobs(full)


async def test_no_spot_checks_no_extra_calls_and_honest_experts_keep_full_trust(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path, spot_checking(tmp_path, 0.0)) as mesh:
        before = await _step_calls(mesh)
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=6, k=2, seed=1)
        assert await _step_calls(mesh) - before == 2 * done.rounds
        mesh.router.service.settings.spot_check = 1.0
        before = await _step_calls(mesh)
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=6, k=2, seed=1)
        assert await _step_calls(mesh) - before == 3 * done.rounds  # one referee per round
        book = trust_book(mesh.router.registry)
        assert [r.trust for r in book.rows()] == [1.0] * 3


@pytest.mark.slow
def test_real_model_float32_and_bfloat16_agree_and_lies_are_caught(real_mesh_home):  # noqa: F811
    from mesh_llm.models.catalog import DEFAULT_MODEL

    f32, bf16 = (load(LoadOptions(model=DEFAULT_MODEL, device="cpu", dtype=d)) for d in ("float32", "bfloat16"))
    a, b = recorded_replies(f32, 128, 64), recorded_replies(bf16, 128, 64)
    vocab, config, rng = f32.vocab_size, TrustConfig(), np.random.default_rng(0)
    assert all(compare(x, y, vocab).agrees(config) for x, y in zip(a, b))
    assert not any(compare(x, onehot(x), vocab).agrees(config) for x in a)
    assert np.mean([compare(x, shuffled(x, rng), vocab).agrees(config) for x in a]) < 0.5


async def test_replies_of_the_round_that_are_not_mixed_referee_without_another_call(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path, spot_checking(tmp_path)) as mesh:
        before = await _step_calls(mesh)
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=1, k=2, seed=1, policy="posterior")
        assert done.rounds == 1  # the prompt's round asks all three under posterior routing
        assert await _step_calls(mesh) - before == 3
        assert [r.checks for r in trust_book(mesh.router.registry).rows()] == [1, 1, 1]


async def test_router_status_and_the_status_table_show_each_experts_trust(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 2, tmp_path, spot_checking(tmp_path, 0.0)) as mesh:
        doubted, honest = (e.link.expert_id for e in mesh.experts)
        trust_book(mesh.router.registry).record({doubted: (False, "test"), honest: (True, "")})
        status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
        listed = await mesh.stub.ListExperts(router_pb2.ListExpertsRequest())
    expected = {doubted: TrustConfig().initial - TrustConfig().penalty, honest: TrustConfig().initial}
    for experts in (status.experts, listed.experts):
        assert {e.expert_id: round(e.trust, 6) for e in experts} == pytest.approx(expected)
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(status_table(status.experts))
    shown = re.findall(r"trust (\d\.\d\d)", out.getvalue())
    assert sorted(shown) == ["0.70", "1.00"] and max(map(len, out.getvalue().splitlines())) <= 80, out.getvalue()

"""The experts study's maths (experiments/experts_study.py) on hand-made numbers and tiny random models."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.fixture(scope="module")
def study():
    return importlib.import_module("experts_study")


def hand_routed(lp: np.ndarray, names, temperature: float, floor: float, k: int, window: int) -> np.ndarray:
    """Posterior routing written out from its definition, without the library."""
    out = []
    for j in range(lp.shape[1]):
        ev = lp[:, max(0, j - window):j]
        if ev.shape[1] == 0:
            post = np.full(len(names), 1.0 / len(names))
            order = sorted(range(len(names)), key=lambda i: names[i])[:k]
            w = np.full(k, 1.0 / k)
        else:
            z = ev.mean(axis=1) / temperature
            post = np.exp(z - z.max())
            post /= post.sum()
            order = sorted(sorted(range(len(names)), key=lambda i: (-post[i], names[i]))[:k], key=lambda i: names[i])
            w = post[order] / post[order].sum()
            w = np.maximum(w, floor)
            w /= w.sum()
        out.append(math.log(sum(wi * math.exp(lp[i, j]) for wi, i in zip(w, order))))
    return np.array(out)


def test_posterior_mixture_nll_equals_the_hand_computed_one(study):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    lp = np.log(rng.uniform(0.01, 0.9, size=(4, 40)))
    for t, f, k, w in itertools.product((0.03, 0.3, 1.0), (0.0, 0.05), (1, 2, 4), (3, 64)):
        posts = study.posteriors(lp, names, t, w)
        mixed, chosen = study.routed_mix(lp, posts, names, k, f)
        np.testing.assert_allclose(mixed, hand_routed(lp, names, t, f, k, w), rtol=1e-10, atol=1e-12)
        assert chosen.shape == (40, k)
    # first position: uniform over the first k names; K=N with uniform posterior is the uniform mixture
    posts = study.posteriors(lp, names, 1e6, 64)
    mixed, _ = study.routed_mix(lp, posts, names, 4, 0.0)
    np.testing.assert_allclose(mixed, study.uniform_mix(lp), atol=1e-6)


@pytest.mark.parametrize("prompt", [None, 5])
def test_window_posteriors_match_the_routers_tracker(study, prompt):
    from mesh_llm.router.posterior import PosteriorConfig

    rng = np.random.default_rng(1)
    names = ["py", "legal", "man"]
    lp = np.log(rng.uniform(0.01, 0.9, size=(3, 30)))
    fast = study.posteriors(lp, names, 0.3, 7, prompt)
    slow = study.tracker_posteriors(lp, names, PosteriorConfig(temperature=0.3, window=7), prompt)
    assert fast[0] == {} and slow[0] == {}
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9)
    if prompt is not None:  # frozen after the prompt
        assert all(fast[j] == fast[prompt - 1] for j in range(prompt - 1, 30))


def test_uniform_mix_is_the_full_vocabulary_linear_mix(study):
    from mesh_llm.mixing.aggregation import full_vocab_mix

    rng = np.random.default_rng(2)
    rows = rng.normal(size=(3, 50))
    rows -= np.logaddexp.reduce(rows, axis=1, keepdims=True)
    target = 17
    assert study.uniform_mix(rows[:, [target]])[0] == pytest.approx(full_vocab_mix(rows)[target], abs=1e-12)


def fake_heldout(study, seed: int = 3):
    rng = np.random.default_rng(seed)
    names = ["e1", "e2", "e3", "e4"]
    domains, split = [], []
    for d in ("p", "q"):
        for i in range(4):
            domains.append(d)
            split.append("tune" if i % 2 == 0 else "test")
    n = len(domains)
    lp = {m: [np.log(rng.uniform(0.02, 0.95, size=20)) for _ in range(n)] for m in ["base", *names]}
    top1 = {m: [rng.integers(0, 5, size=20) for _ in range(n)] for m in ["base", *names]}
    return study.HeldOut(names=names, base="base", domains=domains, split=split, lp=lp, top1=top1,
                         targets=[rng.integers(0, 5, size=20) for _ in range(n)])


def test_oracle_is_never_worse_than_any_single_expert_and_rows_are_consistent(study):
    held = fake_heldout(study)
    result = study.heldout_rows(held, window=8, prompt_tokens=6, temperatures=(0.1, 1.0), floors=(0.0, 0.05))
    rows = {r["row"]: r for r in result["rows"]}
    oracle = rows["oracle (best expert per domain)"]["nll"]
    for name in held.names:
        for key in ("p", "q", "mixed"):
            assert oracle[key] <= rows[name]["nll"][key] + 1e-12
    # the mixed NLL of a single model is the token-weighted mean of its domains (equal tokens here)
    assert rows["base"]["nll"]["mixed"] == pytest.approx((rows["base"]["nll"]["p"] + rows["base"]["nll"]["q"]) / 2)
    # a linear mixture is never worse than its worst member, token by token, so per set too
    pair = rows["uniform K=2 (mean of pairs)"]["pairs"]["e1+e2"]["mixed"]
    assert pair <= max(rows["e1"]["nll"]["mixed"], rows["e2"]["nll"]["mixed"])
    # posterior K=2: test NLL equals the hand-computed mixture with the tuned settings
    pk2 = rows["posterior K=2"]
    mine = [hand_routed(held.experts_lp(c), held.names, pk2["temperature"], pk2["floor"], 2, 8)
            for c in held.idx("test")]
    assert pk2["nll"]["mixed"] == pytest.approx(-np.mean(np.concatenate(mine)), rel=1e-10)
    # the tuned point is the grid's best on the tuning half
    grid = [g for g in result["grid"] if g["variant"] == "posterior" and g["k"] == 2]
    assert pk2["tune_nll"] == pytest.approx(min(g["tune"]["mixed"] for g in grid))
    goal = study.goal(result)
    assert goal["reached"] == (goal["beats_every_single"] and goal["within_2pct_of_oracle"]
                               and goal["never_worse_than_base"])
    assert 0 <= result["disagreement"]["mixed"]["share"] <= 1
    args = type("Args", (), {"window": 8})()
    table, chunks = study.paired_table(held, result["rows"], args)
    paired = {p["row"]: p for p in table}
    assert len(chunks) == len(held.idx("test")) and {c["domain"] for c in chunks} == {"p", "q"}
    for name in ("base", "e1", "oracle (best expert per domain)"):  # posterior K=2 minus the row, in NLL
        assert paired[name]["mean_diff"] == pytest.approx(pk2["nll"]["mixed"] - rows[name]["nll"]["mixed"])


def test_arc_rows_score_choices_and_mix_answers(study):
    from meshlab.data import MCQuestion

    questions = [MCQuestion(qid="1", context="Q", choices=(" a", " bb"), gold=1),
                 MCQuestion(qid="2", context="Q", choices=(" a", " b"), gold=0)]
    mc = [([1, 2, 3], [[4], [5, 6]]), ([1, 2], [[4], [5]])]
    # one array per question: the question's tokens after the first, then each answer's tokens
    good = {"base": [np.array([-1, -1, -3, -0.5, -0.5]), np.array([-1, -2, -3.0])],
            "e1": [np.array([-1, -1, -1, -3, -3.0]), np.array([-9, -1, -2.0])]}
    rows = {r["row"]: r for r in study.arc_rows(questions, mc, good, "base", ["e1"], {1: (1.0, 0.0)}, window=64)}
    assert rows["base"]["acc"] == 1.0 and rows["base"]["se"] == 0.0
    assert rows["e1"]["acc"] == 0.5 and rows["e1"]["se"] == pytest.approx(0.5 / math.sqrt(2))
    assert rows["posterior K=1"]["acc"] == rows["e1"]["acc"]


def test_question_pack_scores_every_answer_after_one_shared_question(study):
    p = study.question_pack([10, 11, 12], [[20], [30, 31, 32]])
    assert p.tokens == [10, 11, 12, 30, 31]
    assert p.positions == [0, 1, 2, 3, 4]
    assert p.segments == [-1, -1, -1, 1, 1]
    assert p.targets == [11, 12, 20, 30, 31, 32]
    assert p.rows == [0, 1, 2, 2, 3, 4]
    c = study.chunk_pack([5, 6, 7])
    assert (c.tokens, c.rows, c.targets) == ([5, 6], [0, 1], [6, 7])


def test_tiny_run_end_to_end_with_shared_trunk_and_report(study, tmp_path):
    out = tmp_path / "study.json"
    assert study.main(["run", "--tiny", "--domains", "python", "legal", "--bench-iterations", "20",
                       "--bench-contexts", "64", "--threads", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["shared_trunk_layers"] == 2  # tiny experts differ from the base in their last of 3 layers only
    assert meta["trunk_check_max_abs"] < 1e-4
    rows = {r["row"]: r for r in result["heldout"]["rows"]}
    assert {"base", "python-expert", "legal-expert", "posterior K=1", "posterior K=2", "posterior-prompt K=2",
            "uniform K=2", "oracle (best expert per domain)"} <= set(rows)
    assert len(result["arc"]["rows"]) == 1 + 2 + 1 + 2
    md = tmp_path / "report.md"
    md.write_text("# title\n\nprose\n\n<!-- gen:heldout -->\nold\n<!-- /gen -->\n\nmore prose\n<!-- gen:goal --><!-- /gen -->\n<!-- gen:chunks --><!-- /gen -->\n")
    assert study.main(["report", "--json", str(out), "--md", str(md), "--img", str(tmp_path / "img")]) == 0
    text = md.read_text()
    assert "old" not in text and "more prose" in text and "| posterior K=2 |" in text and "Goal reached" in text
    assert "test chunks are within" in text
    assert (tmp_path / "img" / "experts_nll.png").stat().st_size > 1000
    assert (tmp_path / "img" / "experts_arc.png").exists()

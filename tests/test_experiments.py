"""Smoke runs of the scripts in experiments/ on tiny models: numbers are produced and agree with each other."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


def script(name: str):
    """Import an experiments/ script as a module."""
    return importlib.import_module(name)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_experts(tiny_model_dir, tiny_model_dir_b):
    """Three same-tokenizer tiny experts: seed 0 in float32 and bfloat16, seed 1 in float32."""
    from mesh_llm.models.loading import LoadOptions, load

    quality = script("quality")
    specs = [(tiny_model_dir, "float32", "a32"), (tiny_model_dir, "bfloat16", "a16"), (tiny_model_dir_b, "float32", "b32")]
    return [quality.Expert(label=label, loaded=load(LoadOptions(model=str(path), dtype=dtype, device="cpu")),
                           quant="none", dtype=dtype) for path, dtype, label in specs]


def test_quality_mixtures_agree_with_single_experts_and_the_dense_reference(tiny_experts):
    from mesh_llm.models.tiny import CORPUS

    from meshlab.data import MCQuestion
    from meshlab.scoring import logprob_of, score_sequence, sparse_reply, sparse_target_logprobs

    quality = script("quality")
    tok = tiny_experts[0].loaded.tokenizer
    vocab = tiny_experts[0].loaded.vocab_size
    ids = list(tok(CORPUS, add_special_tokens=False).input_ids)[:48]
    questions = [MCQuestion(qid="q1", context="The capital of France is", choices=(" Paris.", " Rome."), gold=0),
                 MCQuestion(qid="q2", context="Rivers flow to the", choices=(" sea.", " dog.", " fox."), gold=0)]
    rows, per_expert = quality.evaluate(tiny_experts, text_ids=ids, questions=questions, ks=[1, 2, 3],
                                        rules=["linear", "geometric"], top_ks=[8, vocab], progress=False)
    text = {(r["experts"], r["rule"], r["top_k"]): r["nll"] for r in rows if r["kind"] == "text"}
    assert all(math.isfinite(v) and v > 0 for v in text.values())
    assert all(0 <= r["acc"] <= 1 and r["questions"] == 2 for r in rows if r["kind"] == "mc")
    assert len([r for r in rows if r["kind"] == "text"]) == 3 * 3 + (3 + 1) * 2 * 3  # singles + pairs/triple x rules
    # K=1 through aggregation.mix equals the expert's own sparse reply scored directly
    seq = score_sequence(tiny_experts[0].loaded, ids, vocab)
    direct = -np.mean([logprob_of(sparse_reply(seq, p, 8), int(t), vocab) for p, t in enumerate(seq.targets)])
    assert text[("a32", "-", 8)] == pytest.approx(direct, abs=1e-6)  # mix renormalises float32 replies
    assert text[("a32", "-", "full")] == pytest.approx(-np.mean(seq.dense[np.arange(len(seq.targets)), seq.targets]),
                                                       abs=1e-6)
    # top-k over the whole vocabulary is the full-vocabulary mix, for both rules
    for rule in ("linear", "geometric"):
        for experts in ("a32+b32", "a32+a16+b32"):
            assert text[(experts, rule, vocab)] == pytest.approx(text[(experts, rule, "full")], abs=1e-4)
    # an expert mixed with itself is that expert
    same = sparse_target_logprobs([seq, seq], k=8, rule="geometric")
    alone = sparse_target_logprobs([seq], k=8, rule="linear")
    np.testing.assert_allclose(same, alone, atol=1e-9)
    assert per_expert[0]["top1_agree_with_first"] == 1.0 and per_expert[0]["kl_from_first"] == pytest.approx(0, abs=1e-9)
    assert 0 <= per_expert[2]["top1_agree_with_first"] < 1 and per_expert[2]["kl_from_first"] > 0
    assert "full vocab" in quality.markdown_report(rows, per_expert)


def test_sweep_measures_speed_bandwidth_and_the_emulated_rtt(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.jsonl"
    assert script("sweep").main(["--model", str(tiny_model_dir), "--launch", "inproc", "--network", "proxy",
                                 "--experts", "2", "--k", "1,2", "--rtt-ms", "0,30", "--top-k", "16",
                                 "--tokens", "5", "--no-progress", "--out", str(out)]) == 0
    rows = rows_of(out)
    meta, points = rows[0], rows[1:]
    assert meta["kind"] == "meta" and meta["backend"] == "proxy" and meta["machine"]["cores"] >= 1
    assert [(p["rtt_ms"], p["k"]) for p in points] == [(0, 1), (0, 2), (30, 1), (30, 2)]
    for p in points:
        assert p["tokens"] >= 2 and p["tokens_per_s"] > 0 and p["ttft_ms"] > 0
        assert p["latency_p99_ms"] >= p["latency_p50_ms"] > 0
        assert p["used_per_token"] == p["k"] and p["round_trips_per_token"] == 1
        assert 16 * 4 < p["reply_bytes_per_expert_token"] < p["wire_down_bytes_per_call"]
    slow = {p["k"]: p for p in points if p["rtt_ms"] == 30}
    fast = {p["k"]: p for p in points if p["rtt_ms"] == 0}
    assert slow[1]["probe_rtt_ms"] >= 28 and fast[1]["probe_rtt_ms"] < 20
    for k in (1, 2):
        assert slow[k]["latency_p50_ms"] >= fast[k]["latency_p50_ms"] + 20

    plot = script("plot")
    assert plot.main([str(out), "--out-dir", str(tmp_path / "charts"), "--prefix", "s"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "charts").glob("*.png"))
    assert pngs == ["s_latency.png", "s_tokens_per_s.png", "s_ttft.png"]
    assert "| K |" in (tmp_path / "charts" / "s.md").read_text()


def test_simulate_degrades_below_k_and_stops_with_none_left(tiny_model_dir, tmp_path):
    out = tmp_path / "sim.jsonl"
    assert script("simulate").main(["--model", str(tiny_model_dir), "--variants", "fp32", "--experts", "12",
                                    "--k", "1,2", "--policies", "random,latency", "--extra", "0", "--tokens", "6",
                                    "--compute-ms", "3", "--rtt-ms", "1,4", "--waves", "1,0", "--wave-every", "4",
                                    "--degrade-k", "2", "--degrade-tokens", "40", "--repeats", "5", "--settle-s", "0",
                                    "--positions", "64", "--no-progress", "--out", str(out)]) == 0
    rows = rows_of(out)
    meta = rows[0]
    assert meta["experts"] == 12 and meta["registration_s"] > 0
    gen = [r for r in rows if r["kind"] == "gen"]
    assert {(r["policy"], r["k"]) for r in gen} == {("random", 1), ("random", 2), ("latency", 1), ("latency", 2)}
    for r in gen:
        assert r["tokens_per_s"] > 0 and r["used_per_token"] == r["k"] and r["modelled_p50_ms"] >= 1
        assert r["latency_p50_ms"] >= r["modelled_p50_ms"] * 0.9
    toks = [r for r in rows if r["kind"] == "degrade_token"]
    assert all(t["used"] == 2 for t in toks[:4])  # before the first wave
    assert all(t["used"] <= 1 for t in toks[5:])  # one expert left: mixed fewer than K
    done = next(r for r in rows if r["kind"] == "degrade_done")
    assert done["finish_reason"] == "error" and done["tokens"] == len(toks)
    assert any("fewer than k=2" in n for n in done["notes"])
    assert [w["alive_after"] for w in rows if w["kind"] == "wave"] == [1, 0]

    plot = script("plot")
    assert plot.main([str(out), "--out-dir", str(tmp_path), "--prefix", "sim"]) == 0
    assert (tmp_path / "sim_degradation.png").stat().st_size > 1000


def test_bench_router_reports_every_figure(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    bench = script("bench_router")
    assert bench.main(["--model", str(tiny_model_dir), "--launch", "inproc", "--tokens", "6", "--k8-tokens", "3",
                       "--rounds", "1", "--iterations", "50", "--positions", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    f = result["functions_k8_neighbouring_positions"]
    assert 0 < f["p50_ms"] <= f["p99_ms"] and f["union_mean"] >= result["top_k"]
    assert result["functions_k8_identical_replies"]["union_mean"] == result["top_k"]
    assert result["trace_k8"]["tokens"] >= 1 and result["trace_k8"]["router_ms_p50"] > 0
    k1 = result["k1_vs_in_process"]
    assert k1["same_tokens"] and k1["ratio_median"] > 0
    assert [lat["k"] for lat in result["latency"]] == [2, 4]
    for lat in result["latency"]:
        assert lat["latency_p50_ms"] > 0 and lat["slowest_step_p50_ms"] > 0 and lat["tokens"] >= 1

"""Smoke runs of the scripts in experiments/ on tiny models: numbers are produced and agree with each other."""

from __future__ import annotations

import gzip
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
    from mesh_llm.testing.tiny_model import CORPUS
    from meshlab.data import MCQuestion
    from meshlab.scoring import score_sequence, sparse_reply, sparse_target_logprobs

    quality = script("quality")
    tok = tiny_experts[0].loaded.tokenizer
    vocab = tiny_experts[0].loaded.vocab_size
    all_ids = list(tok(CORPUS, add_special_tokens=False).input_ids)
    ids, other = all_ids[:48], all_ids[48:96]
    questions = [MCQuestion(qid="q1", context="The capital of France is", choices=(" Paris.", " Rome."), gold=0),
                 MCQuestion(qid="q2", context="Rivers flow to the", choices=(" sea.", " dog.", " fox."), gold=0)]
    rows, per_expert = quality.evaluate(tiny_experts, texts={"t": ids, "u": other}, questions=questions, ks=[1, 2, 3],
                                        rules=["linear", "geometric"], top_ks=[8, vocab], progress=False,
                                        choose_weights_on="t")
    text = {(r["experts"], r["rule"], r["top_k"]): r["nll"] for r in rows if r["kind"] == "text" and r["text"] == "t"}
    assert all(math.isfinite(v) and v > 0 for v in text.values())
    for r in (r for r in rows if r["kind"] == "mc"):
        assert 0 <= r["acc"] <= 1 and r["questions"] == 2
        assert r["acc_se"] == pytest.approx(math.sqrt(r["acc"] * (1 - r["acc"]) / 2))
    assert len([r for r in rows if r["kind"] == "text"]) == 2 * (3 * 3 + (3 + 1) * 2 * 3)  # 2 texts x configs
    # K=1 through aggregation.mix equals the expert's own sparse reply scored directly
    seq = score_sequence(tiny_experts[0].loaded, ids, vocab)
    direct = -np.mean([sparse_reply(seq, p, 8).logprob_of(int(t), vocab) for p, t in enumerate(seq.targets)])
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
    report = quality.markdown_report(rows, per_expert)
    assert "full vocab" in report and "NLL (nats/token) on u" in report and " ± " in report


def test_weighted_pairs_are_chosen_on_one_text_and_scored_on_another(tiny_experts):
    from mesh_llm.testing.tiny_model import CORPUS
    from meshlab.scoring import dense_target_logprobs, score_sequence
    from meshlab.weighting import weight_grid, weighted_linear_nll, weighted_rows

    ids = list(tiny_experts[0].loaded.tokenizer(CORPUS, add_special_tokens=False).input_ids)
    texts = {"pick": ids[:40], "judge": ids[40:80]}
    seqs = {t: [score_sequence(e.loaded, i, 4) for e in tiny_experts] for t, i in texts.items()}
    targets = {t: [s.dense[np.arange(len(s.targets)), s.targets] for s in ss] for t, ss in seqs.items()}
    # the shortcut equals the router's full-vocabulary linear mix with the same weights
    for w in [(0.9, 0.1), (0.3, 0.7)]:
        reference = dense_target_logprobs(seqs["judge"][:2], rule="linear", weights=w)
        assert weighted_linear_nll(targets["judge"][:2], w) == pytest.approx(-np.mean(reference), abs=1e-5)
    rows = weighted_rows([e.label for e in tiny_experts], targets, choose_on="pick")
    assert len(rows) == 3 * 2 and {r["text"] for r in rows} == {"pick", "judge"}
    singles = {t: [float(-np.mean(lp.astype(np.float64))) for lp in lps] for t, lps in targets.items()}
    for r in rows:
        assert sum(r["weights"]) == pytest.approx(1) and tuple(r["weights"]) in weight_grid()
        assert r["best_single"] == tiny_experts[int(np.argmin(singles["pick"]))].label
        chosen = [e.label for e in tiny_experts].index(r["best_single"])
        pair = [targets[r["text"]][[e.label for e in tiny_experts].index(x)] for x in r["experts"].split("+")]
        with np.errstate(divide="ignore"):
            mixed = np.logaddexp(np.log(r["weights"][0]) + pair[0], np.log(r["weights"][1]) + pair[1])
        diff = mixed - targets[r["text"]][chosen]
        assert r["gain_se"] == pytest.approx(np.std(diff, ddof=1) / np.sqrt(len(diff)), rel=1e-6)
        if r["in_sample"]:  # the grid holds 0.5/0.5 and both single experts, so the chosen weights beat them here
            labels = [e.label for e in tiny_experts]
            pair = [labels.index(x) for x in r["experts"].split("+")]
            assert r["nll"] <= r["uniform_nll"] + 1e-12
            assert r["nll"] <= min(singles["pick"][i] for i in pair) + 1e-12
            assert r["weights"] == r["best_weights_here"]
    with pytest.raises(ValueError, match="not among the texts"):
        weighted_rows(["a"], targets, choose_on="missing")


def test_sweep_measures_speed_bandwidth_and_the_emulated_rtt(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.jsonl"
    assert script("sweep").main(["--model", str(tiny_model_dir), "--launch", "inproc", "--network", "proxy",
                                 "--experts", "2", "--k", "1,2", "--rtt-ms", "0,30", "--top-k", "16",
                                 "--tokens", "5", "--repeats", "2", "--no-progress", "--out", str(out)]) == 0
    rows = rows_of(out)
    meta, all_points = rows[0], rows[1:]
    assert meta["kind"] == "meta" and meta["backend"] == "proxy" and meta["machine"]["cores"] >= 1
    assert [(p["repeat"], p["rtt_ms"], p["k"]) for p in all_points] == [
        (rep, rtt, k) for rep in (0, 1) for rtt in (0, 30) for k in (1, 2)]
    assert all(p["load_average_1m"] >= 0 for p in all_points)
    points = [p for p in all_points if p["repeat"] == 0]
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
    md = (tmp_path / "charts" / "s.md").read_text()
    assert "| K |" in md and meta["machine"]["git_commit"] in md and "By k, everything else fixed" in md
    k1 = [p["tokens_per_s"] for p in all_points if p["k"] == 1 and p["rtt_ms"] == 30]
    assert f"{np.median(k1):.2f} ({min(k1):.2f}–{max(k1):.2f})" in md


def test_comparisons_say_within_noise_only_where_the_spreads_overlap():
    plot = script("plot")

    def runs(policy, values):
        return [{"k": 2, "rtt_ms": 50, "jitter_ms": 0, "loss": 0, "top_k": 64, "extra": 0, "policy": policy,
                 "mix": "linear", "tokens_per_s": v, "latency_p50_ms": 1000 / v, "latency_p99_ms": 2000 / v,
                 "router_ms_p50": 0.5, "load_average_1m": 2.0} for v in values]

    apart = plot.aggregate(runs("latency", [9.0, 9.5, 10.0]) + runs("random", [5.0, 5.5, 6.0]))
    [row] = plot.comparisons(apart, "policy")
    assert row["first"] == "policy=latency" and row["verdict"] == "first faster"
    assert row["first_tps"] == "9.50 (9.00–10.00)" and row["ratio"] == pytest.approx(5.5 / 9.5)
    overlapping = plot.aggregate(runs("latency", [5.0, 7.0, 9.0]) + runs("random", [6.0, 6.5, 8.0]))
    assert plot.comparisons(overlapping, "policy")[0]["verdict"] == "within noise"
    single = plot.aggregate(runs("latency", [9.0]) + runs("random", [5.0]))
    assert plot.comparisons(single, "policy")[0]["verdict"] == "one run each: no spread to judge"


def test_simulate_degrades_below_k_and_stops_with_none_left(tiny_model_dir, tmp_path):
    out = tmp_path / "sim.jsonl"
    assert script("simulate").main(["--model", str(tiny_model_dir), "--variants", "fp32", "--experts", "12",
                                    "--k", "1,2", "--policies", "random,latency", "--extra", "0", "--tokens", "6",
                                    "--compute-ms", "3", "--rtt-ms", "1,4", "--waves", "1,0", "--wave-every", "4",
                                    "--degrade-k", "2", "--degrade-tokens", "40", "--repeats", "5", "--settle-s", "0", "--gen-repeats", "2",
                                    "--positions", "64", "--no-progress", "--out", str(out)]) == 0
    rows = rows_of(out)
    meta = rows[0]
    assert meta["experts"] == 12 and meta["registration_s"] > 0
    gen = [r for r in rows if r["kind"] == "gen"]
    assert sorted((r["repeat"], r["policy"], r["k"]) for r in gen) == sorted(
        (rep, policy, k) for rep in (0, 1) for policy in ("random", "latency") for k in (1, 2))
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
    md = (tmp_path / "sim.md").read_text()
    point_lines = [line for line in md.splitlines() if line.startswith(("| random |", "| latency |"))]
    assert meta["machine"]["git_commit"] in md and len(point_lines) == 4
    assert all(line.endswith("| 2 |") for line in point_lines)  # every point is the median of its 2 runs


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


def test_heldout_text_is_dated_after_the_cutoff_disjoint_from_training_and_rebuilt_from_its_manifest(tmp_path):
    heldout = script("heldout_corpus")
    changelog = ("pkg (2) bookworm; urgency=medium\n\n  * Fix CVE-2025-1234.\n\n"
                 " -- A Maintainer <a@example.org>  Mon, 07 Apr 2025 13:26:17 +0200\n\n"
                 "pkg (1) bookworm; urgency=medium\n\n  * Older fix.\n\n"
                 " -- A Maintainer <a@example.org>  Tue, 01 Oct 2024 10:00:00 +0000\n")
    entries = list(heldout.changelog_entries(changelog, "x"))
    assert [e.dated for e in entries] == ["2025-04-07"] and "CVE-2025-1234" in entries[0].text
    updated = tmp_path / "changelog.Debian.gz"  # a package update puts a newer entry on top
    updated.write_bytes(gzip.compress(("pkg (3) bookworm; urgency=medium\n\n  * Newer fix.\n\n -- A Maintainer "
                                       "<a@example.org>  Fri, 04 Dec 2026 10:00:00 +0000\n\n" + changelog).encode()))
    again = heldout.choose("changelog", recorded={str(updated): {"2025-04-07"}})
    assert [p.text for p in again] == [entries[0].text]  # the recorded entry only, as the manifest chose it
    notes = "# Notes\n\n## 2.0.0 (2025-02-01)\n\n* New flag.\n\n## 1.0.0 (2024-12-30)\n\n* Old flag.\n"
    sections = list(heldout.release_sections(notes, "x"))
    assert [s.dated for s in sections] == ["2025-02-01"] and "Old flag" not in sections[0].text
    body = "def f(x):\n    return x + 1\n" * 20
    new = list(heldout.dated_module("# Copyright 2025 Google LLC. All Rights Reserved.\n# licence\n" + body, "m.py"))
    assert [m.dated for m in new] == ["2025"] and "Copyright" not in new[0].text and new[0].text.startswith("def f")
    assert not list(heldout.dated_module("# Copyright 2024 Google LLC.\n" + body, "m.py"))

    manifest = json.loads(heldout.MANIFEST.read_text())
    paths = [f["path"] for g in manifest["genres"].values() for f in g["files"]]
    if not all(Path(p).exists() for p in paths):
        with pytest.raises(heldout.HeldoutError, match="--build"):  # a machine without those packages: refused
            heldout.load_texts()
        pytest.skip("this machine lacks files the held-out manifest names")
    texts = heldout.load_texts()  # files updated since (a newer changelog entry) still give the recorded text
    assert set(texts) == set(heldout.GENRES) and all(len(t) >= 20_000 for t in texts.values())
    assert all(g["first_date"] >= "2025" for g in manifest["genres"].values())
    man_page = next(p for p in sorted(Path("/usr/share/man/man1").glob("*.gz")) if "gcloud" not in p.name)
    assert heldout.training_overlap([*paths, str(man_page)]) == [str(man_page)]  # the check can fail, and only there
    manifest["genres"]["code"]["text_sha256"] = "0" * 64
    tampered = tmp_path / "manifest.json"
    tampered.write_text(json.dumps(manifest))
    with pytest.raises(heldout.HeldoutError, match="--build"):
        heldout.load_texts(tampered)

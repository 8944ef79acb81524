#!/usr/bin/env bash
# Every command behind the numbers in research/ (about 90 minutes on 2 quiet CPU cores; research/README.md says
# which run of each is reported, from which commit). Speed figures: 3 repeats per point (median, min-max, load).
# Results go to results/ (git-ignored); charts and tables are then copied into research/ by plot.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

# speed against K and RTT (research/sweep.md)
$PY experiments/sweep.py --experts 4 --k 1,2,4 --rtt-ms 0,20,50,100 --tokens 64 --repeats 3 --out results/sweep.jsonl
# bandwidth per expert per token against top-k
$PY experiments/sweep.py --experts 4 --k 1,4 --rtt-ms 0 --top-k 16,64,256 --tokens 32 --repeats 3 --out results/sweep_topk.jsonl
# jitter, loss and straggler over-selection
$PY experiments/sweep.py --experts 4 --k 1,2,3 --extra 0,1 --rtt-ms 50 --jitter-ms 30 --loss 0.02 --tokens 64 \
    --repeats 3 --out results/sweep_jitter.jsonl
# experts at different distances: random against latency-aware selection
$PY experiments/sweep.py --experts 4 --k 1,2 --per-expert-rtt 0,20,50,100 --policy random,latency --tokens 64 \
    --repeats 3 --out results/sweep_hetero.jsonl
# router benchmark (research/bench_router.md): one value per figure per run, so three runs
for i in 1 2 3; do
    $PY experiments/bench_router.py --out results/bench_router_$i.json
done
# 300 simulated experts (research/simulate.md), 3 generations per point
$PY experiments/simulate.py --gen-repeats 3 --out results/simulate.jsonl
# the held-out text (dated 2025 or later): check the manifest against this machine's files
$PY experiments/heldout_corpus.py
# quality (research/quality.md): the license and the three held-out genres, weights chosen on the license;
# the default run, then a larger one
$PY experiments/quality.py --out results/quality.jsonl --md results/quality.md
$PY experiments/quality.py --tokens 1024 --questions 100 --out results/quality_large.jsonl --md results/quality_large.md
# weighted pairs on every token of the license and 4,096 tokens of each held-out genre (no multiple choice)
$PY experiments/quality.py --tokens 4096 --task none --k 1 --top-k 16 --mix linear --out results/quality_weights.jsonl \
    --md research/img/quality_weights.md
# every ARC-Easy validation question in the oe_eval request file (570)
$PY experiments/quality.py --tokens 1024 --questions 570 --out results/quality_arc570.jsonl --md results/quality_arc570.md

for f in sweep sweep_topk sweep_jitter sweep_hetero simulate quality_large quality_arc570; do
    $PY experiments/plot.py results/$f.jsonl --out-dir research/img --prefix $f
done
cp results/quality.md research/img/quality.md

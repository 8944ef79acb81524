"""Router overhead per token: select K of N + mix their top-k replies + sample, on synthetic replies.

Run: .venv/bin/python experiments/bench_router_mix.py [--k 8] [--top-k 256] [--vocab 49152]
Goal (issue 3): median <= 0.5 ms at K=8, top-k 256, vocabulary 49,152.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mesh_llm.mixing.aggregation import mix
from mesh_llm.mixing.sampling import Sampler, SamplingConfig
from mesh_llm.mixing.selection import Candidate, get_policy
from mesh_llm.wire import SparseDist


def realistic_reply(rng: np.random.Generator, shared: np.ndarray, vocab: int, top_k: int) -> SparseDist:
    """A top-k reply of a model of the same family: Zipf-like logits, most top ids shared with the others."""
    logits = rng.standard_normal(vocab) * 2.0
    logits[shared] += 6.0 + rng.standard_normal(len(shared))  # experts agree on the likely tokens
    logp = logits - np.logaddexp.reduce(logits)
    top = np.argpartition(-logp, top_k)[:top_k]
    ids = np.sort(top)
    rest = np.log1p(-np.exp(np.logaddexp.reduce(logp[ids])))
    return SparseDist(ids=ids.astype(np.int64), logprobs=logp[ids], rest_logmass=float(rest))


def main() -> None:
    """Time select + mix + sample per token and print the median and p99."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16, help="N online candidates")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--policy", default="random")
    parser.add_argument("--mix", default="linear")
    parser.add_argument("--fill", default="spread")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    candidates = [
        Candidate(expert_id=f"e{i:02d}", rtt_ms=float(rng.uniform(5, 60)), tokens_per_second=float(rng.uniform(10, 60)),
                  weight=1.0, tokenizer_fingerprint="fp")
        for i in range(args.experts)
    ]
    pools = []
    for _ in range(16):  # distinct token positions, each with a reply from every expert
        shared = rng.choice(args.vocab, size=args.top_k // 2, replace=False)
        pools.append({c.expert_id: realistic_reply(rng, shared, args.vocab, args.top_k) for c in candidates})
    policy = get_policy(args.policy)
    sampler = Sampler(SamplingConfig(temperature=0.7, top_p=0.9), seed=1)
    select_rng = np.random.default_rng(2)

    times, unions = [], []
    for i in range(args.iterations + 200):
        replies = pools[i % len(pools)]
        start = time.perf_counter()
        chosen = policy.select(candidates, args.k, select_rng)
        mixed = mix([replies[c.expert_id] for c in chosen], vocab_size=args.vocab,
                    weights=[c.weight for c in chosen], rule=args.mix, fill=args.fill)
        sampler.sample(mixed)
        elapsed = time.perf_counter() - start
        if i >= 200:  # warm-up excluded
            times.append(elapsed * 1e3)
            unions.append(len(mixed.ids))
    t = np.array(times)
    print(f"select({args.policy}) + mix({args.mix}/{args.fill}) + sample(T=0.7, top-p 0.9): "
          f"K={args.k} of N={args.experts}, top-k {args.top_k}, vocab {args.vocab}, {len(t)} tokens, "
          f"mean union {np.mean(unions):.0f} ids")
    print(f"median {np.median(t):.3f} ms, p99 {np.percentile(t, 99):.3f} ms, max {t.max():.3f} ms "
          f"(goal: median <= 0.5 ms) -> {'MET' if np.median(t) <= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()

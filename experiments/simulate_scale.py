"""Router cost as the mesh grows: per-token ranking, registration, heartbeats and dead-expert detection at N experts.

    nice -n 10 .venv/bin/python experiments/simulate_scale.py [--sizes 10,100,1000,10000] [--tokens 2000] \\
        [--k 4] [--policy latency] [--out results/simulate_scale.jsonl] [--img-dir research/img]

Each N gets a real Registry on a real SQLite file, N registrations, a heartbeat from every live expert
once per interval (evenly spread, handed in between tokens as the router's event loop takes them between
awaits, not counted as token time), and the sweep thread a router server runs. Per token it times the
router's ranking as Generation._rank does it (a bounded sample of the family, the experts holding the
session first, trust annotation, policy ranking) plus the registry bookkeeping of the K replies, and, in
the same run, the former full scan (every online candidate ranked) as the baseline. Then a share of the
experts stops heartbeating and the time until each leaves selection (suspect) and is gone is recorded.
The experts are registry entries driven in this process, not gRPC servers: the cost measured is the
router's, which is what grows with N.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mesh_llm.mixing.selection import GateContext, get_policy  # noqa: E402
from mesh_llm.router.generation import RANK_SAMPLE  # noqa: E402
from mesh_llm.router.registry import ONLINE, GONE, ExpertSpec, Registry  # noqa: E402
from mesh_llm.router.trust import TrustBook  # noqa: E402
from mesh_llm.store.db import open_engine  # noqa: E402

from meshlab.common import command_line, markdown_table, parse_list, pct, write_jsonl  # noqa: E402

FINGERPRINT = "fp-sim"
SPEC = ExpertSpec(model_id="replay", tokenizer_fingerprint=FINGERPRINT, vocab_size=32000, context_limit=4096,
                  tokens_per_second=20.0)
COLUMNS = [("n", "experts", ""), ("register_per_s", "registrations/s", ".0f"),
           ("heartbeats_per_s", "heartbeats/s (needed)", ""), ("rank_ms_p50", "router ms/token p50", ".3f"),
           ("rank_ms_p99", "p99", ".3f"), ("ratio_vs_n10", "x N=10", ".2f"), ("scan_ms_p50", "full scan ms p50", ".3f"),
           ("unselectable_s_max", "dead out of selection s (max)", ".2f"), ("gone_s_max", "dead gone s (max)", ".2f")]


class Heartbeats:
    """Every live expert's heartbeat once per interval, evenly spread, handed in between tokens as the router's
    event loop would take them between awaits (not timed as token work)."""

    def __init__(self, registry: Registry, ids: list[str], interval_s: float) -> None:
        self.registry, self.ids, self.interval_s = registry, ids, interval_s
        self.dead: set[str] = set()
        self.sent = 0
        self.began = time.perf_counter()
        self._due = 0  # heartbeats handed in so far, dead experts' skipped turns included

    def deliver(self) -> None:
        """Hand in every heartbeat due by now."""
        due = int((time.perf_counter() - self.began) / self.interval_s * len(self.ids))
        while self._due < due:
            eid = self.ids[self._due % len(self.ids)]
            if eid not in self.dead:
                self.registry.heartbeat(eid, active_sessions=1)
                self.sent += 1
            self._due += 1

    def rate(self) -> float:
        """Heartbeats handed in per second so far."""
        return self.sent / (time.perf_counter() - self.began)


def sweeper(registry: Registry, stopping: threading.Event) -> None:
    """The router server's background sweep."""
    while not stopping.wait(registry.config.sweep_interval_s):
        registry.sweep()


def rank_sampled(registry, book, policy, rng, held, position):
    """Generation._rank's per-token work: bounded family sample, trust, policy order."""
    family = book.annotate(registry.sample_candidates(FINGERPRINT, RANK_SAMPLE, keep=held))
    return policy.select(family, len(family), rng, GateContext(position=position))


def rank_full_scan(registry, book, policy, rng, held, position):
    """The former per-token work: every online candidate annotated and ranked."""
    family = book.annotate([c for c in registry.candidates() if c.tokenizer_fingerprint == FINGERPRINT])
    return policy.select(family, len(family), rng, GateContext(position=position))


def token_times(registry, book, policy, tokens: int, k: int, rank, beats: Heartbeats) -> list[float]:
    """Milliseconds per token of rank plus the registry bookkeeping of K replies (heartbeats handed in between)."""
    rng, held, times = np.random.default_rng(0), {}, []
    for position in range(tokens):
        beats.deliver()
        began = time.perf_counter()
        chosen = rank(registry, book, policy, rng, held, position)[:k]
        for c in chosen:
            registry.record_success(c.expert_id, rtt_ms=20.0)
            held[c.expert_id] = position + 1
        times.append((time.perf_counter() - began) * 1000)
    return times


def dead_detection(registry: Registry, beats: Heartbeats, share: float) -> tuple[list[float], list[float]]:
    """Seconds until each expert that stops heartbeating leaves selection, and until it is gone."""
    dead = beats.ids[:: max(1, round(1 / share))]
    beats.dead.update(dead)
    stopped = time.perf_counter()
    out_at: dict[str, float] = {}
    gone_at: dict[str, float] = {}
    while len(gone_at) < len(dead) and time.perf_counter() - stopped < 3 * registry.config.gone_after_s:
        for _ in range(10):
            time.sleep(0.005)
            beats.deliver()
        now = time.perf_counter() - stopped
        for eid in dead:
            state = registry.get(eid).state
            if state != ONLINE:
                out_at.setdefault(eid, now)
            if state == GONE:
                gone_at.setdefault(eid, now)
    return list(out_at.values()), list(gone_at.values())


def run_size(n: int, args, tmp: Path) -> dict:
    """Every figure for a mesh of n experts."""
    registry = Registry(open_engine(f"sqlite:///{tmp / f'mesh_{n}.db'}"))
    began = time.perf_counter()
    ids = [registry.register(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7000", SPEC, name=f"replay-{i}",
                             identity=f"donor-{i}") for i in range(n)]
    register_s = time.perf_counter() - began
    spread = random.Random(n)
    for eid in ids:
        registry.record_success(eid, rtt_ms=spread.uniform(5, 80), tokens=0)
    book = TrustBook(registry.engine, registry=registry)
    policy = get_policy(args.policy)
    stopping = threading.Event()
    beats = Heartbeats(registry, ids, registry.config.heartbeat_interval_s)
    sweep = threading.Thread(target=sweeper, args=(registry, stopping), daemon=True)
    sweep.start()
    sampled = token_times(registry, book, policy, args.tokens, args.k, rank_sampled, beats)
    scan = token_times(registry, book, policy, max(20, args.tokens // 10), args.k, rank_full_scan, beats)
    out_s, gone_s = dead_detection(registry, beats, args.dead_share)
    beat_rate = beats.rate()
    stopping.set()
    sweep.join()
    row = {"n": n, "register_per_s": n / register_s, "heartbeat_needed_per_s": (n - len(beats.dead)) / registry.config.heartbeat_interval_s,
           "heartbeat_per_s": beat_rate, "rank_ms_p50": pct(sampled, 50), "rank_ms_p99": pct(sampled, 99),
           "scan_ms_p50": pct(scan, 50), "scan_ms_p99": pct(scan, 99), "dead": len(out_s),
           "unselectable_s_max": max(out_s, default=float("nan")), "gone_s_max": max(gone_s, default=float("nan")),
           "k": args.k, "policy": args.policy, "tokens": args.tokens, "rank_sample": RANK_SAMPLE}
    row["heartbeats_per_s"] = f"{beat_rate:.0f} (>= {row['heartbeat_needed_per_s']:.0f})"
    print(f"N={n}: {row['rank_ms_p50']:.3f} ms/token (full scan {row['scan_ms_p50']:.3f}), "
          f"{beat_rate:.0f} heartbeats/s, dead out of selection in {row['unselectable_s_max']:.2f} s", flush=True)
    return row


def chart(rows: list[dict], path: Path) -> None:
    """Router ms per token against N, sampled ranking and full scan, log-log."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["rank_ms_p50"] for r in rows], "o-", label="bounded sample (router now)")
    ax.plot(ns, [r["scan_ms_p50"] for r in rows], "s--", label="full scan (before)")
    ax.set(xscale="log", yscale="log", xlabel="registered experts N", ylabel="router ms per token (p50)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every size, write JSON lines, the markdown table and the chart."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--policy", default="latency")
    parser.add_argument("--dead-share", type=float, default=0.1)
    parser.add_argument("--out", default="results/simulate_scale.jsonl")
    parser.add_argument("--img-dir", default="research/img")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # thousands of state changes are expected here
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_size(n, args, Path(tmp)) for n in parse_list(args.sizes, int)]
    base = rows[0]["rank_ms_p50"]
    for row in rows:
        row["ratio_vs_n10"] = row["rank_ms_p50"] / base
    write_jsonl(Path(args.out), rows)
    img = Path(args.img_dir)
    img.mkdir(parents=True, exist_ok=True)
    chart(rows, img / "scale_router_ms.png")
    table = (f"Generated by `{command_line(__file__, argv)}`; ratio is against N={rows[0]['n']} in the same run.\n\n"
             + markdown_table(rows, COLUMNS) + "\n")
    (img / "scale.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

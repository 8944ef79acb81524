"""A simulated mesh of hundreds of replay experts: router cost, registry behaviour, degradation below K.

    .venv/bin/python experiments/simulate.py [--experts 300] [--k 1,2,4,8] [--policies random,latency,capacity] \\
        [--extra 0,1] [--tokens 32] [--variants fp32,bf16] [--waves 10,3,1,0] [--out results/simulate.jsonl]
    .venv/bin/python experiments/simulate.py --tiny ...   # replies recorded from a tiny random model

Replay experts (meshlab.replay) are real gRPC Expert servers in this process that answer with
top-k replies recorded from the real model over real text, after a modelled step time: a per-expert
network RTT (uniform in --rtt-ms) plus a per-expert compute time (the real model's measured decode
step on this machine times a log-normal donor spread), jittered per step. Each joins the router
through the real RouterLink, so registration and heartbeats are real too.

Parts: (1) registration of N experts and the cost of the registry and selection at that N;
(2) generations for each policy, K and straggler over-selection; (3) degradation: a K=4
generation while experts are killed in waves until fewer than K, then none, remain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mesh_llm.grpc_util import channel  # noqa: E402
from mesh_llm.mixing.selection import get_policy  # noqa: E402
from mesh_llm.node import RouterConfig, start_router  # noqa: E402
from mesh_llm.pb import router_pb2_grpc  # noqa: E402
from mesh_llm.router.settings import MeshSettings  # noqa: E402
from meshlab.common import command_line, machine_info, parse_list, pct, write_jsonl  # noqa: E402
from meshlab.data import apache_license_text  # noqa: E402
from meshlab.lab import stream_generate  # noqa: E402
from meshlab.metrics import summarise  # noqa: E402
from meshlab.replay import Recording, ReplayExpert, ReplayService, StepModel, record  # noqa: E402

PROMPT = "Licensed under the Apache License"
SECRET = "sim-secret"
VARIANTS = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "nf4": ("nf4", "float32")}


def recordings(args, tmp: Path) -> list[Recording]:
    """Top-k replies of each model variant over the license text, with each variant's measured step time."""
    from mesh_llm.models.loading import LoadOptions, load

    model, variants = args.model, parse_list(args.variants, str)
    if args.tiny:
        from mesh_llm.testing.tiny_model import build_tiny_llama

        model = str(build_tiny_llama(tmp / "tiny", seed=0))
    out = []
    for name in variants:
        quant, dtype = VARIANTS[name]
        loaded = load(LoadOptions(model=model, quant=quant, dtype=dtype, device="cpu"))
        text, _ = apache_license_text()
        ids = list(loaded.tokenizer(text, add_special_tokens=False).input_ids)[: min(args.positions + 32, loaded.context_limit)]
        out.append(record(loaded, ids, args.record_top_k, name))
    return out


def step_models(n: int, recs: list[Recording], args) -> list[StepModel]:
    """Per-expert RTT (uniform) and compute time (its variant's measured step × log-normal spread)."""
    rng = np.random.default_rng(args.seed)
    lo, hi = parse_list(args.rtt_ms)
    base = args.compute_ms
    return [StepModel(rtt_ms=float(rng.uniform(lo, hi)),
                      compute_ms=float((base or recs[i % len(recs)].step_ms) * np.exp(rng.normal(0, args.compute_spread))),
                      jitter=args.step_jitter)
            for i in range(n)]


async def start_experts(router_address: str, recs: list[Recording], models: list[StepModel], seed: int) -> list[ReplayExpert]:
    """Start one replay expert per step model (variants round-robin, replay offsets spread)."""
    experts = []
    for i, model in enumerate(models):
        rec = recs[i % len(recs)]
        service = ReplayService(rec, model, seed=seed * 100003 + i, offset=(i // len(recs)) % 3)
        experts.append(ReplayExpert(service, name=f"sim{i:03d}"))
    await asyncio.gather(*(e.start(router_address, SECRET) for e in experts))
    return experts


async def wait_online(registry, n: int, timeout_s: float = 120.0) -> float:
    """Seconds until n experts are online."""
    began = time.perf_counter()
    while sum(r.state == "online" for r in registry.experts()) < n:
        if time.perf_counter() - began > timeout_s:
            raise TimeoutError(f"only {sum(r.state == 'online' for r in registry.experts())} of {n} experts online")
        await asyncio.sleep(0.05)
    return time.perf_counter() - began


def time_call(fn, repeats: int) -> dict:
    """Median and p99 milliseconds of fn()."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99)}


def registry_costs(registry, policies: list[str], repeats: int) -> list[dict]:
    """Cost of candidates(), ranking all N candidates with each policy (once per token), and sweep()."""
    rows = [{"kind": "scale", "what": "registry.candidates()", **time_call(registry.candidates, repeats)}]
    cands = registry.candidates()
    rng = np.random.default_rng(0)
    for name in policies:
        policy = get_policy(name)
        rows.append({"kind": "scale", "what": f"{name}.select(all {len(cands)})", "policy": name,
                     **time_call(lambda: policy.select(cands, len(cands), rng), repeats)})
    rows.append({"kind": "scale", "what": "registry.sweep() incl. flush", **time_call(registry.sweep, max(repeats // 10, 5))})
    return rows


def modelled_ms(record, services: dict) -> list[float]:
    """Per decode token: the slowest used expert's modelled step for that token (what a zero-cost router would take)."""
    out = []
    for j, t in enumerate(record.tokens[1:], start=1):
        length = record.prompt_tokens + j
        slept = [services[e].step_log.get(length) for e in t.expert_ids if e in services]
        if slept and all(s is not None for s in slept):
            out.append(max(slept))
    return out


async def generation_matrix(stub, args, services: dict, n: int, bar) -> list[dict]:
    """--gen-repeats rounds of one generation per (policy, K, extra); speed, router cost and stragglers per point."""
    rows = []
    grid = [(rep, policy, k, extra) for rep in range(args.gen_repeats) for policy in parse_list(args.policies, str)
            for k in parse_list(args.k, int) for extra in parse_list(args.extra, int)]
    for rep, policy, k, extra in grid:  # whole rounds, so drift in machine load hits every point alike
        for service in services.values():
            service.step_log.clear()
        load_1m = os.getloadavg()[0]
        record = await stream_generate(stub, PROMPT, k=k, extra=extra, policy=policy, top_k=args.top_k,
                                       max_tokens=args.tokens, temperature=0.7, seed=args.seed + rep)
        summary = summarise(record, k=k, extra=extra, n_experts=n, top_k=args.top_k)
        ref = modelled_ms(record, services)
        gaps = np.diff([t.at_s for t in record.tokens]) * 1000
        over = [g - r for g, r in zip(gaps, ref)] if len(ref) == len(gaps) else []
        rows.append({"kind": "gen", "policy": policy, "k": k, "extra": extra, "experts": n, "repeat": rep,
                     "load_average_1m": round(load_1m, 2),
                     "modelled_p50_ms": pct(ref, 50), "overhead_p50_ms": pct(over, 50),
                     "overhead_p90_ms": pct(over, 90), **summary})
        bar.update()
    return rows


async def degradation(stub, registry, experts: list[ReplayExpert], args) -> list[dict]:
    """A long K=degrade_k generation while experts are killed in waves; per-token and registry timelines."""
    waves = parse_list(args.waves, int)
    rows: list[dict] = []
    timeline: list[dict] = []
    kills: list[dict] = []
    began = time.perf_counter()
    rng = random.Random(args.seed)

    def now() -> float:
        return time.perf_counter() - began

    async def watch():
        while True:
            counts = {"online": 0, "suspect": 0, "gone": 0, "quarantined": 0}
            for r in registry.experts():
                counts[r.state] += 1
            timeline.append({"kind": "registry", "t_s": now(), **counts})
            for wave in kills:  # when did the registry stop offering the victims, and call them gone?
                states = [registry.get(v).state for v in wave["victims"]]
                if wave["not_online_after_s"] is None and all(st != "online" for st in states):
                    wave["not_online_after_s"] = now() - wave["t_s"]
                if wave["gone_after_s"] is None and all(st == "gone" for st in states):
                    wave["gone_after_s"] = now() - wave["t_s"]
            await asyncio.sleep(0.05)

    async def on_token(tok, index):
        rows.append({"kind": "degrade_token", "index": index, "t_s": now(), "used": len(tok.expert_ids),
                     "calls": len(tok.calls),
                     "failed": sum(c["outcome"].startswith(("error", "rejected")) for c in tok.calls),
                     "alive": sum(e.alive for e in experts)})
        if len(kills) < len(waves) and index + 1 == args.wave_every * (len(kills) + 1):
            keep = waves[len(kills)]
            alive = [e for e in experts if e.alive]
            victims = rng.sample(alive, max(len(alive) - keep, 0))
            t_kill = now()
            await asyncio.gather(*(v.kill() for v in victims))
            kills.append({"kind": "wave", "after_token": index, "t_s": t_kill, "killed": len(victims),
                          "alive_after": keep, "victims": [v.link.expert_id for v in victims],
                          "not_online_after_s": None, "gone_after_s": None})

    watcher = asyncio.create_task(watch())
    try:
        record = await stream_generate(stub, PROMPT, on_token=on_token, k=args.degrade_k, policy="random",
                                       top_k=args.top_k, max_tokens=args.degrade_tokens, temperature=0.7,
                                       seed=args.seed)
        end = now()
        while now() - end < args.settle_s and any(w["gone_after_s"] is None for w in kills):
            await asyncio.sleep(0.1)  # let the registry notice the last wave
    finally:
        watcher.cancel()
    for wave in kills:
        wave["victims"] = len(wave["victims"])
    done = {"kind": "degrade_done", "finish_reason": record.finish_reason, "notes": record.notes,
            "tokens": len(record.tokens), "k": args.degrade_k, "ended_s": end}
    return rows + kills + timeline + [done]


async def run(args) -> list[dict]:
    """Every part of the simulation; returns the rows (meta first)."""
    machine = await asyncio.to_thread(machine_info)
    with tempfile.TemporaryDirectory(prefix="mesh-sim-") as tmp:
        tmp = Path(tmp)
        recs = await asyncio.to_thread(recordings, args, tmp)
        models = step_models(args.experts, recs, args)
        router = await start_router(RouterConfig(
            port=0, db_url=f"sqlite:///{tmp / 'router.db'}", secret=SECRET,
            settings=MeshSettings(step_deadline_s=args.deadline_s)))
        experts: list[ReplayExpert] = []
        try:
            began = time.perf_counter()
            experts = await start_experts(router.address, recs, models, args.seed)
            reg_s = await wait_online(router.registry, args.experts, args.online_timeout_s)
            meta = {"kind": "meta", "experiment": "simulate", "command": args.command, "machine": machine,
                    "experts": args.experts, "recordings": [{"label": r.label, "step_ms": r.step_ms,
                                                             "positions": len(r.ids), "top_k": len(r.ids[0])}
                                                            for r in recs],
                    "rtt_ms_range": parse_list(args.rtt_ms), "compute_spread": args.compute_spread,
                    "step_jitter": args.step_jitter, "top_k": args.top_k,
                    "registration_s": reg_s, "start_to_online_s": time.perf_counter() - began}
            rows = [meta, *registry_costs(router.registry, parse_list(args.policies, str), args.repeats)]
            by_id = {e.link.expert_id: e.service for e in experts}
            async with channel(router.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                await stream_generate(stub, PROMPT, k=1, max_tokens=2)  # warm-up: tokenizer fetch
                points = (args.gen_repeats * len(parse_list(args.policies, str)) * len(parse_list(args.k, int))
                          * len(parse_list(args.extra, int)))
                bar = tqdm(total=points, desc="generations", disable=args.no_progress, file=sys.stderr)
                rows += await generation_matrix(stub, args, by_id, args.experts, bar)
                bar.close()
                if args.waves:
                    rows += await degradation(stub, router.registry, experts, args)
            return rows
        finally:
            await asyncio.gather(*(e.kill() for e in experts if e.alive), return_exceptions=True)
            await router.stop(0)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the simulation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=300)
    p.add_argument("--k", default="1,2,4,8")
    p.add_argument("--policies", default="random,latency,capacity")
    p.add_argument("--extra", default="0,1", help="comma list of straggler over-selection s")
    p.add_argument("--tokens", type=int, default=32, help="tokens per generation of the matrix")
    p.add_argument("--top-k", type=int, default=64, help="top-k asked of each expert")
    p.add_argument("--record-top-k", type=int, default=256, help="top-k recorded from the model")
    p.add_argument("--positions", type=int, default=256, help="recorded text positions")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="fp32,bf16", help=f"model variants recorded: {', '.join(VARIANTS)}")
    p.add_argument("--tiny", action="store_true", help="record from a tiny random model")
    p.add_argument("--rtt-ms", default="5,120", help="range of per-expert RTT (uniform)")
    p.add_argument("--compute-ms", type=float, default=0.0, help="median compute per step (0: measured)")
    p.add_argument("--compute-spread", type=float, default=0.4, help="log-normal sigma of donor speeds")
    p.add_argument("--step-jitter", type=float, default=0.15, help="log-normal sigma of each step")
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--waves", default="10,3,1,0", help="experts left alive after each kill wave ('' to skip)")
    p.add_argument("--wave-every", type=int, default=30, help="tokens between kill waves")
    p.add_argument("--degrade-k", type=int, default=4)
    p.add_argument("--degrade-tokens", type=int, default=200)
    p.add_argument("--settle-s", type=float, default=8.0, help="wait after the run for the registry to mark victims gone")
    p.add_argument("--repeats", type=int, default=200, help="repeats of each registry/selection timing")
    p.add_argument("--gen-repeats", type=int, default=3, help="generations per (policy, K, s) point")
    p.add_argument("--online-timeout-s", type=float, default=120.0, help="how long all experts may take to come online")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/simulate.jsonl"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the router's registry warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the simulation, write JSON lines and print a summary."""
    args = build_parser().parse_args(argv)
    args.command = command_line(__file__, argv)
    if not args.verbose:
        logging.getLogger("mesh_llm").setLevel(logging.ERROR)  # hundreds of expected suspect/gone warnings
    rows = asyncio.run(run(args))
    rows[0]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_jsonl(args.out, rows)
    print(summary_text(rows))
    print(f"wrote {args.out}")
    return 0


def summary_text(rows: list[dict]) -> str:
    """A few lines summarising the simulation rows."""
    meta = rows[0]
    lines = [f"{meta['experts']} replay experts online after {meta['registration_s']:.2f} s; recorded step "
             + ", ".join(f"{r['label']} {r['step_ms']:.1f} ms" for r in meta["recordings"])]
    for r in rows:
        if r["kind"] == "scale":
            lines.append(f"  {r['what']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
    for r in rows:
        if r["kind"] == "gen":
            lines.append(f"  {r['policy']:>8} K={r['k']} s={r['extra']}: {r['tokens_per_s']:.2f} tok/s, p50 "
                         f"{r['latency_p50_ms']:.0f} ms (slowest used expert's modelled step {r['modelled_p50_ms']:.0f} ms, "
                         f"difference p50 {r['overhead_p50_ms']:.1f} ms), "
                         f"router {r['router_ms_p50']:.2f} ms, union {r['union_size_mean']:.0f}, "
                         f"late {r['straggler_share']:.2f}")
    for r in rows:
        if r["kind"] == "wave":
            lines.append(f"  wave after token {r['after_token']}: killed {r['killed']}, {r['alive_after']} left; "
                         f"not offered after {r['not_online_after_s']} s, gone after {r['gone_after_s']} s")
        if r["kind"] == "degrade_done":
            lines.append(f"  degradation run: {r['tokens']} tokens, finish {r['finish_reason']}; notes: {r['notes']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

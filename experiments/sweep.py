"""Sweep K, added RTT (with jitter and loss) and top-k over a real gRPC mesh; one JSON line per point.

    .venv/bin/python experiments/sweep.py --experts 4 --k 1,2,4 --rtt-ms 0,20,50,100 --tokens 64 \\
        --out results/sweep.jsonl [--top-k 64] [--jitter-ms 0] [--loss 0] [--extra 0] \\
        [--network auto|netem|proxy|inproc] [--launch subprocess|inproc] [--per-expert-rtt 0,20,50,100]
    .venv/bin/python experiments/sweep.py --tiny ...   # tiny random model, experts in this process

The router runs in this process; experts run as `mesh-expert serve` subprocesses (or in this
process with --launch inproc). Network conditions come from tc netem in network namespaces when
that works here, else from a user-space delay proxy, else from the experts' in-process delay;
the first line of the output (kind "meta") says which and why.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tqdm import tqdm  # noqa: E402

from mesh_llm.router.settings import MeshSettings  # noqa: E402
from meshlab.common import command_line, machine_info, mean, parse_list, write_jsonl  # noqa: E402
from meshlab.lab import ExpertPlan, LabMesh  # noqa: E402
from meshlab.metrics import summarise  # noqa: E402
from meshlab.netem import LinkSpec  # noqa: E402

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the sweep."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=4, help="experts in the mesh (N)")
    p.add_argument("--k", default="1,2,4", help="comma list of K (experts mixed per token)")
    p.add_argument("--rtt-ms", default="0,20,50,100", help="comma list of added RTT, the same for every expert")
    p.add_argument("--per-expert-rtt", default=None,
                   help="comma list with one added RTT per expert (a single heterogeneous point; replaces --rtt-ms)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="std dev of the added RTT")
    p.add_argument("--loss", type=float, default=0.0, help="packet (chunk) loss probability, 0..1")
    p.add_argument("--top-k", default="64", help="comma list of top-k entries asked of each expert")
    p.add_argument("--extra", default="0", help="comma list of stragglers over-selected (K+extra asked, first K used)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per point")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over the whole grid (one generation per point each); reports give median and min-max")
    p.add_argument("--mix", default="linear", help="linear or geometric")
    p.add_argument("--policy", default="random", help="comma list of selection policies")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=30.0, help="per-token deadline of the router")
    p.add_argument("--model", default="smollm2-135m", help="catalog name or checkpoint folder")
    p.add_argument("--quant", default="none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess expert")
    p.add_argument("--network", default="auto", help="auto, netem, proxy or inproc")
    p.add_argument("--launch", default="subprocess", help="subprocess or inproc experts")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--tiny", action="store_true", help="tiny random model, in-process experts (a quick check)")
    p.add_argument("--out", type=Path, default=Path("results/sweep.jsonl"))
    p.add_argument("--no-progress", action="store_true")
    return p


def link_sets(args) -> list[list[LinkSpec]]:
    """The per-expert link lists to sweep over."""
    if args.per_expert_rtt:
        rtts = parse_list(args.per_expert_rtt)
        if len(rtts) != args.experts:
            raise SystemExit(f"--per-expert-rtt has {len(rtts)} values for {args.experts} experts")
        return [[LinkSpec(rtt_ms=r, jitter_ms=args.jitter_ms, loss=args.loss) for r in rtts]]
    return [[LinkSpec(rtt_ms=r, jitter_ms=args.jitter_ms, loss=args.loss)] * args.experts
            for r in parse_list(args.rtt_ms)]


async def run_sweep(args, loaded: dict | None = None) -> list[dict]:
    """Run every point of the sweep and return the rows (a meta row first)."""
    ks = parse_list(args.k, int)
    top_ks = parse_list(args.top_k, int)
    if max(ks) > args.experts:
        raise SystemExit(f"K={max(ks)} exceeds --experts {args.experts}")
    plans = [ExpertPlan(model=args.model, quant=args.quant, dtype=args.dtype, threads=args.threads)] * args.experts
    sets = link_sets(args)
    extras = parse_list(str(args.extra), int)
    policies = parse_list(args.policy, str)
    points = [(rep, links, tk, policy, extra, k) for rep in range(args.repeats) for links in sets for tk in top_ks
              for policy in policies for extra in extras for k in ks]
    rows: list[dict] = []
    machine = await asyncio.to_thread(machine_info)  # before the mesh: it runs git, which must not stall the router
    with tempfile.TemporaryDirectory(prefix="mesh-sweep-") as tmp:
        async with LabMesh(experts=plans, workdir=Path(tmp), network=args.network, launch=args.launch,
                           loaded=loaded, settings=MeshSettings(step_deadline_s=args.deadline_s)) as mesh:
            rows.append({"kind": "meta", "experiment": "sweep", "command": args.command, "machine": machine,
                         "backend": mesh.backend, "backend_reason": mesh.backend_reason, "model": args.model,
                         "quant": args.quant, "dtype": args.dtype, "launch": args.launch,
                         "expert_threads": args.threads if args.launch == "subprocess" else None,
                         "experts": args.experts, "prompt": args.prompt})
            await mesh.generate(args.prompt, k=args.experts, max_tokens=4, chat=True)  # warm-up: tokenizer, channels
            bar = tqdm(total=len(points), desc="sweep", disable=args.no_progress, file=sys.stderr)
            current = None
            for rep, links, top_k, policy, extra, k in points:  # repeats are whole rounds, so slow drift hits every point alike
                if links is not current:
                    await mesh.set_links(links)
                    current = links
                    measured = [await mesh.measure_rtt_ms(i) for i in range(args.experts)]
                load_1m = os.getloadavg()[0]  # what else ran while this point was measured
                record = await mesh.generate(args.prompt, k=k, extra=extra, top_k=top_k, max_tokens=args.tokens,
                                             chat=True, mix=args.mix, policy=policy,
                                             temperature=args.temperature, seed=args.seed + rep)
                row = {"kind": "point", "backend": mesh.backend, "experts": args.experts, "k": k, "extra": extra,
                       "top_k": top_k, "mix": args.mix, "policy": policy,
                       "rtt_ms": mean([s.rtt_ms for s in links]), "rtt_per_expert_ms": [s.rtt_ms for s in links],
                       "jitter_ms": links[0].jitter_ms, "loss": links[0].loss, "probe_rtt_ms": mean(measured),
                       "repeat": rep, "model": args.model, "load_average_1m": round(load_1m, 2),
                       **summarise(record, k=k, extra=extra, n_experts=args.experts, top_k=top_k)}
                rows.append(row)
                bar.set_postfix(k=k, rtt=row["rtt_ms"], tps=f"{row['tokens_per_s']:.1f}")
                bar.update()
            bar.close()
    return rows


def tiny_setup(folder: Path) -> dict:
    """Build and load a tiny random model; returns {path: LoadedModel} for in-process experts."""
    from mesh_llm.models.loading import LoadOptions, load
    from mesh_llm.testing.tiny_model import build_tiny_llama

    path = build_tiny_llama(folder / "tiny", seed=0)
    return {str(path): load(LoadOptions(model=str(path), device="cpu"))}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sweep, write JSON lines and print a short table."""
    args = build_parser().parse_args(argv)
    args.command = command_line(__file__, argv)
    loaded = None
    with tempfile.TemporaryDirectory(prefix="mesh-tiny-") as tmp:
        if args.tiny:
            loaded = tiny_setup(Path(tmp))
            args.model, args.launch = next(iter(loaded)), "inproc"
        elif args.launch == "inproc":
            from mesh_llm.models.loading import LoadOptions, load

            loaded = {args.model: load(LoadOptions(model=args.model, quant=args.quant, dtype=args.dtype,
                                                   device="cpu"))}
        rows = asyncio.run(run_sweep(args, loaded))
    rows[0]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_jsonl(args.out, rows)
    meta = rows[0]
    print(f"backend: {meta['backend']} ({meta['backend_reason']})")
    print(f"{'policy':>8} {'s':>2} {'K':>3} {'rtt':>5} {'top_k':>5} {'tok/s':>7} {'ttft':>7} {'p50':>7} {'p99':>7} {'B/exp/tok':>9} {'late':>5}")
    for r in rows[1:]:
        print(f"{r['policy']:>8} {r['extra']:>2} {r['k']:>3} {r['rtt_ms']:>5.0f} {r['top_k']:>5} {r['tokens_per_s']:>7.2f} {r['ttft_ms']:>7.1f} "
              f"{r['latency_p50_ms']:>7.1f} {r['latency_p99_ms']:>7.1f} {r['reply_bytes_per_expert_token']:>9.0f} "
              f"{r['straggler_share'] if not math.isnan(r['straggler_share']) else 0:>5.2f}")
    print(f"wrote {len(rows) - 1} points to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-token rounds against one token per round trip, side by side in one run over a real gRPC mesh.

    .venv/bin/python experiments/bench_speculative.py --experts 3 --k 2 --rtt-ms 0,100 \\
        --drafts none,ngram,model:smollm2-135m --repeats 3 --out results/speculative_k2.jsonl
    .venv/bin/python experiments/bench_speculative.py --experts 4 --k 4 --rtt-ms 100 --out results/speculative_k4.jsonl
    .venv/bin/python experiments/bench_speculative.py --tiny ...   # tiny random model, a quick check

The router (and a model drafter) run in this process; experts are `mesh-expert serve` subprocesses
behind the sweeps' delay relay. Every (RTT, prompt, repeat) runs every drafter back to back, in an
order rotated each repeat, so machine load drifts alike over them; the summary gives the median and
min-max over repeats of decode tokens/s, tokens per round trip and acceptance, the speed ratio against `none` from the
same repeat, and whether the text equals the one-token path's (greedy must not change it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tqdm import tqdm  # noqa: E402

from mesh_llm.pb import router_pb2  # noqa: E402
from mesh_llm.router.settings import MeshSettings  # noqa: E402
from meshlab.common import command_line, machine_info, markdown_table, parse_list, write_jsonl  # noqa: E402
from meshlab.lab import ExpertPlan, LabMesh  # noqa: E402
from meshlab.netem import LinkSpec  # noqa: E402

CODE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    totals = []
    running = 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        if index >= window - 1:
            totals.append(running / window)
    return totals
'''
PROMPTS = {
    "chat-story": ("chat", "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."),
    "chat-facts": ("chat", "Explain how rivers shape valleys over thousands of years, step by step."),
    "code-rename": ("code", "Rewrite this Python function with the parameter `values` renamed to `samples`. "
                            "Reply with the code only.\n\n" + CODE),
}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=3, help="experts in the mesh (N)")
    p.add_argument("--k", type=int, default=2, help="experts mixed per token")
    p.add_argument("--rtt-ms", default="0,100", help="comma list of added RTT, the same for every expert")
    p.add_argument("--drafts", default="none,ngram,model:smollm2-135m", help="comma list of drafters")
    p.add_argument("--draft-max", type=int, default=8, help="most tokens drafted per round")
    p.add_argument("--prompts", default=",".join(PROMPTS), help=f"comma list of {', '.join(PROMPTS)}")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of every point (median and min-max reported)")
    p.add_argument("--model", default="smollm2-135m", help="catalog name or checkpoint folder of the experts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per expert subprocess")
    p.add_argument("--network", default="auto", help="auto, netem, proxy or inproc")
    p.add_argument("--tiny", action="store_true", help="tiny random model, in-process experts (a quick check)")
    p.add_argument("--out", type=Path, default=Path("results/speculative.jsonl"))
    p.add_argument("--no-progress", action="store_true")
    return p


async def run_one(mesh: LabMesh, prompt: str, *, k: int, draft: str, draft_max: int, tokens: int) -> dict:
    """One greedy generation; decode speed from the client's first to last token arrival."""
    request = router_pb2.GenerateRequest(prompt=prompt, chat=True, k=k, max_tokens=tokens, draft=draft,
                                         draft_max=draft_max, policy="random", seed=1)
    arrivals, ids, done = [], [], None
    began = time.perf_counter()
    async for event in mesh.stub.Generate(request, timeout=3600):
        if event.HasField("token"):
            arrivals.append(time.perf_counter() - began)
            ids.append(event.token.token_id)
        else:
            done = event.done
    decode_s = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
    first_round_tokens = sum(1 for a in arrivals if a == arrivals[0])
    return {"token_ids": ids, "text": done.text, "finish_reason": done.finish_reason, "tokens": len(ids),
            "rounds": done.rounds, "drafted": done.drafted_tokens, "accepted": done.accepted_tokens,
            "tokens_per_round": len(ids) / done.rounds if done.rounds else float("nan"),
            "acceptance": done.accepted_tokens / done.drafted_tokens if done.drafted_tokens else float("nan"),
            "decode_tokens_per_s": (len(ids) - first_round_tokens) / decode_s if decode_s > 0 else float("nan"),
            "total_s": time.perf_counter() - began, "ttft_s": arrivals[0] if arrivals else float("nan")}


async def run_bench(args, loaded: dict | None = None) -> list[dict]:
    """Every (RTT, repeat, prompt) with every drafter back to back; a meta row first."""
    plans = [ExpertPlan(model=args.model, threads=args.threads)] * args.experts
    drafts = parse_list(args.drafts, str)
    prompts = parse_list(args.prompts, str)
    unknown = [p for p in prompts if p not in PROMPTS]
    if unknown:
        raise SystemExit(f"unknown prompt(s) {unknown}; choose from {', '.join(PROMPTS)}")
    rows: list[dict] = [{"kind": "meta", "experiment": "speculative", "command": args.command,
                         "machine": await asyncio.to_thread(machine_info), "experts": args.experts, "k": args.k,
                         "model": args.model, "tokens": args.tokens, "draft_max": args.draft_max}]
    launch = "inproc" if args.tiny else "subprocess"
    points = [(rtt, rep, name) for rtt in parse_list(args.rtt_ms) for rep in range(args.repeats) for name in prompts]
    with tempfile.TemporaryDirectory(prefix="mesh-spec-") as tmp:
        async with LabMesh(experts=plans, workdir=Path(tmp), network=args.network, launch=launch, loaded=loaded,
                           settings=MeshSettings(step_deadline_s=60.0)) as mesh:
            rows[0].update(backend=mesh.backend, backend_reason=mesh.backend_reason)
            for draft in drafts:  # warm-up: tokenizer, channels, the draft model loaded once
                await run_one(mesh, "Hello", k=args.k, draft=draft, draft_max=args.draft_max, tokens=4)
            bar = tqdm(total=len(points) * len(drafts), desc="speculative", disable=args.no_progress, file=sys.stderr)
            current = None
            for rtt, rep, name in points:
                if rtt != current:
                    await mesh.set_links([LinkSpec(rtt_ms=rtt)] * args.experts)
                    current = rtt
                kind, prompt = PROMPTS[name]
                order = drafts[rep % len(drafts):] + drafts[:rep % len(drafts)]  # drift falls alike on every drafter
                for draft in order:
                    result = await run_one(mesh, prompt, k=args.k, draft=draft, draft_max=args.draft_max,
                                           tokens=args.tokens)
                    rows.append({"kind": "point", "rtt_ms": rtt, "repeat": rep, "prompt": name, "prompt_kind": kind,
                                 "draft": draft, "k": args.k, "experts": args.experts,
                                 "load_average": os.getloadavg()[0], **result})
                    bar.set_postfix(rtt=rtt, draft=draft, tps=f"{result['decode_tokens_per_s']:.1f}")
                    bar.update()
            bar.close()
    return rows


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def summarise(rows: list[dict]) -> list[dict]:
    """Per (RTT, prompt, drafter): median and min-max over repeats, speed ratio to `none` of the same repeat."""
    points = [r for r in rows if r["kind"] == "point"]
    base = {(r["rtt_ms"], r["prompt"], r["repeat"]): r for r in points if r["draft"] == "none"}
    table = []
    for key in sorted({(r["rtt_ms"], r["prompt"], r["draft"]) for r in points}, key=lambda t: (t[0], t[1])):
        runs = [r for r in points if (r["rtt_ms"], r["prompt"], r["draft"]) == key]
        ratios = [r["decode_tokens_per_s"] / base[(r["rtt_ms"], r["prompt"], r["repeat"])]["decode_tokens_per_s"]
                  for r in runs if (r["rtt_ms"], r["prompt"], r["repeat"]) in base]
        same = all(r["token_ids"] == base[(r["rtt_ms"], r["prompt"], r["repeat"])]["token_ids"]
                   for r in runs if (r["rtt_ms"], r["prompt"], r["repeat"]) in base)
        table.append({"rtt_ms": key[0], "prompt": key[1], "draft": key[2], "runs": len(runs),
                      "tokens_per_s": _spread([r["decode_tokens_per_s"] for r in runs], ".2f"),
                      "ratio": _spread(ratios, ".2f") if key[2] != "none" else "1",
                      "tokens_per_round": _spread([r["tokens_per_round"] for r in runs], ".2f"),
                      "acceptance": _spread([r["acceptance"] for r in runs], ".2f"),
                      "same_text": "yes" if same else "NO",
                      "load": _spread([r["load_average"] for r in runs], ".1f"),
                      "_median_tps": statistics.median([r["decode_tokens_per_s"] for r in runs]),
                      "_median_tpr": statistics.median([r["tokens_per_round"] for r in runs])})
    return table


COLUMNS = [("rtt_ms", "added RTT ms", ".0f"), ("prompt", "prompt", ""), ("draft", "drafter", ""),
           ("tokens_per_s", "decode tokens/s median (min–max)", ""), ("ratio", "× none (same repeat)", ""),
           ("tokens_per_round", "tokens/round trip", ""), ("acceptance", "acceptance", ""),
           ("same_text", "same text as none", ""), ("load", "load avg", ""), ("runs", "runs", "")]


def plot(table: list[dict], out: Path) -> list[Path]:
    """Bar charts of decode tokens/s and tokens per round trip by drafter, one group per (RTT, prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(t["rtt_ms"], t["prompt"]) for t in table})
    drafts = list(dict.fromkeys(t["draft"] for t in table))
    paths = []
    for field, label, suffix in (("_median_tps", "decode tokens/s (median)", "tokens_per_s"),
                                 ("_median_tpr", "tokens per round trip (median)", "tokens_per_round")):
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        width = 0.8 / len(drafts)
        for j, draft in enumerate(drafts):
            values = [next((t[field] for t in table if (t["rtt_ms"], t["prompt"], t["draft"]) == (*g, draft)), 0)
                      for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], values, width, label=draft)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{int(r)} ms\n{p}" for r, p in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        path = out.with_name(f"{out.stem}_{suffix}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write JSON lines, charts and a markdown table."""
    args = build_parser().parse_args(argv)
    args.command = command_line(__file__, argv)
    # a SIGTERM becomes a Ctrl-C, so the mesh's expert subprocesses are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    with tempfile.TemporaryDirectory(prefix="mesh-tiny-") as tmp:
        loaded = None
        if args.tiny:
            from sweep import tiny_setup

            loaded = tiny_setup(Path(tmp))
            args.model = next(iter(loaded))
            args.drafts = args.drafts.replace("model:smollm2-135m", f"model:{args.model}")
        rows = asyncio.run(run_bench(args, loaded))
    write_jsonl(args.out, rows)
    table = summarise(rows)
    text = markdown_table(table, COLUMNS)
    args.out.with_suffix(".md").write_text(f"`{args.command}`\n\n{text}\n")
    for path in plot(table, args.out):
        print(f"chart: {path}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Router benchmark (issue 3): overhead per token, K=1 mesh speed against in-process decode, and K=2/K=4 latency.

    .venv/bin/python experiments/bench_router.py [--model smollm2-135m] [--tokens 32] [--out results/bench_router.json]
    .venv/bin/python experiments/bench_router.py --tiny        # tiny random model, seconds

1. Router overhead per token (select + mix + sample) at K=8, top-k 256: timed on the router's own
   functions with replies recorded from the model, and read from TokenTrace.router_ms in a real
   K=8 generation (8 in-process experts sharing one loaded model). Goal <= 0.5 ms.
2. K=1 mesh greedy decode tokens/s (router in this process, one `mesh-expert serve` subprocess)
   against a plain in-process greedy loop of the same model, alternated in one run. Goal >= 0.9.
3. Per-token latency at K=2 and K=4 (in-process experts, every expert used for every token)
   against the slowest expert's model time for that token. Goal: within 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from mesh_llm.mixing.aggregation import mix  # noqa: E402
from mesh_llm.mixing.sampling import Sampler, SamplingConfig  # noqa: E402
from mesh_llm.mixing.selection import Candidate, get_policy  # noqa: E402
from mesh_llm.wire import SparseDist  # noqa: E402
from meshlab.common import command_line, machine_info, pct  # noqa: E402
from meshlab.data import apache_license_text  # noqa: E402
from meshlab.lab import ExpertPlan, LabMesh  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def recorded_replies(loaded, positions: int, top_k: int) -> list[SparseDist]:
    """Top-k replies of the model at consecutive positions of real text, through its StepEngine."""
    from mesh_llm.expert.engine import StepEngine

    text, _ = apache_license_text()
    ids = list(loaded.tokenizer(text, add_special_tokens=False).input_ids)[: positions + 64]
    engine = StepEngine(loaded)
    result = engine.step("record", 0, ids, min(top_k, engine.max_top_k), True)
    out = []
    for d in result.distributions[64:]:  # skip the first positions, where the model knows little
        order = np.argsort(d.ids)
        out.append(SparseDist(ids=d.ids[order].astype(np.int64), logprobs=d.logprobs[order],
                              rest_logmass=d.rest_logmass))
    return out


def time_router_functions(replies: list[SparseDist], *, k: int, vocab: int, iterations: int, spread: bool,
                          rule: str = "linear") -> dict:
    """Median/p99 ms of select(k of k) + mix + sample; experts get neighbouring positions when spread, else one."""
    candidates = [Candidate(expert_id=f"e{i}", rtt_ms=10.0, tokens_per_second=10.0, weight=1.0,
                            tokenizer_fingerprint="fp") for i in range(k)]
    policy = get_policy("random")
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingConfig(temperature=0.7, top_p=0.9), seed=1)
    times, unions = [], []
    n = len(replies)
    for it in range(iterations + 50):
        base = it % n
        dists = [replies[(base + (j if spread else 0)) % n] for j in range(k)]
        began = time.perf_counter()
        chosen = policy.select(candidates, k, rng)
        mixed = mix(dists[: len(chosen)], vocab_size=vocab, rule=rule)
        sampler.sample(mixed)
        elapsed = (time.perf_counter() - began) * 1000
        if it >= 50:
            times.append(elapsed)
            unions.append(len(mixed.ids))
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "union_mean": float(np.mean(unions))}


def in_process_decode(loaded, prompt_ids: list[int], tokens: int) -> tuple[list[int], float]:
    """Plain transformers greedy loop with a KV cache; returns the tokens and decode tokens/s."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.model.config)
    out = []
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True,
                              logits_to_keep=1).logits
        out.append(int(logits[0, -1].argmax()))
        began = time.perf_counter()
        for _ in range(tokens - 1):
            logits = loaded.model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True,
                                  logits_to_keep=1).logits
            out.append(int(logits[0, -1].argmax()))
    return out, (tokens - 1) / (time.perf_counter() - began)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the router tokenises it for chat=True."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


async def k1_against_in_process(model: str, loaded, *, tokens: int, rounds: int, launch: str, threads: int,
                                workdir: Path) -> dict:
    """K=1 mesh greedy tokens/s against in-process greedy tokens/s, alternated `rounds` times."""
    prompt_ids = chat_ids(loaded.tokenizer, PROMPT)
    plan = ExpertPlan(model=model, threads=threads)
    mesh_tps, local_tps, same = [], [], []
    async with LabMesh(experts=[plan], workdir=workdir, network="inproc", launch=launch,
                       loaded={model: loaded}) as mesh:
        await mesh.generate(PROMPT, k=1, max_tokens=4, chat=True)  # warm-up
        for _ in range(rounds):
            local, tps = await asyncio.to_thread(in_process_decode, loaded, prompt_ids, tokens)
            local_tps.append(tps)
            record = await mesh.generate(PROMPT, k=1, max_tokens=tokens, chat=True, top_k=64)
            got = [t.token_id for t in record.tokens]
            gaps = np.diff([t.at_s for t in record.tokens])
            mesh_tps.append(len(gaps) / float(np.sum(gaps)))
            same.append(got == local[: len(got)])
    ratios = [m / lo for m, lo in zip(mesh_tps, local_tps)]
    return {"mesh_tokens_per_s": mesh_tps, "in_process_tokens_per_s": local_tps, "ratio": ratios,
            "ratio_median": float(np.median(ratios)), "same_tokens": all(same), "launch": launch,
            "expert_threads": threads if launch == "subprocess" else None}


def _record_steps(running) -> list[tuple[int, float]]:
    """Wrap an in-process expert's batched steps to log (tokens appended, model ms) of every step."""
    engine = running.service.engine
    log: list[tuple[int, float]] = []
    original = engine.step_batch

    def step_batch(calls):
        results = original(calls)
        log.extend((len(call.tokens), result.compute_ms) for call, result in zip(calls, results)
                   if not isinstance(result, Exception))
        return results

    running.service.gatherer.run_batch = step_batch  # the gatherer holds the bound method it was built with
    return log


async def latency_against_slowest(model: str, loaded, *, k: int, tokens: int, top_k: int, workdir: Path) -> dict:
    """Per-token latency at K=k (k experts, all used every token) minus the slowest expert's model time."""
    plans = [ExpertPlan(model=model)] * k
    async with LabMesh(experts=plans, workdir=workdir, network="inproc", launch="inproc",
                       loaded={model: loaded}) as mesh:
        await mesh.generate(PROMPT, k=k, max_tokens=4, chat=True)  # warm-up
        logs = [_record_steps(mesh.inproc_expert(i)) for i in range(k)]
        record = await mesh.generate(PROMPT, k=k, max_tokens=tokens, chat=True, top_k=top_k)
    decode = [[ms for n, ms in log[1:]] for log in logs]  # each log: the prompt step, then one step per token
    n = min(len(record.tokens) - 1, *(len(d) for d in decode))
    gaps = np.diff([t.at_s for t in record.tokens])[:n] * 1000
    slowest = np.array([max(d[j] for d in decode) for j in range(n)])
    over = gaps - slowest
    router = [t.router_ms for t in record.tokens[1:]]
    return {"k": k, "tokens": n, "latency_p50_ms": pct(gaps, 50), "slowest_step_p50_ms": pct(slowest, 50),
            "overhead_p50_ms": pct(over, 50), "overhead_p90_ms": pct(over, 90), "overhead_mean_ms": float(np.mean(over)),
            "router_ms_p50": pct(router, 50)}


async def k8_trace(model: str, loaded, *, tokens: int, top_k: int, workdir: Path) -> dict:
    """TokenTrace.router_ms and union size of a real K=8 generation (8 in-process experts, one shared model)."""
    async with LabMesh(experts=[ExpertPlan(model=model)] * 8, workdir=workdir, network="inproc", launch="inproc",
                       loaded={model: loaded}) as mesh:
        await mesh.generate(PROMPT, k=8, max_tokens=2, chat=True)
        record = await mesh.generate(PROMPT, k=8, max_tokens=tokens, chat=True, top_k=top_k, temperature=0.7,
                                     top_p=0.9, seed=1)
    router = [t.router_ms for t in record.tokens[1:]]
    return {"tokens": len(router), "router_ms_p50": pct(router, 50), "router_ms_p99": pct(router, 99),
            "union_mean": float(np.mean([t.union_size for t in record.tokens[1:]]))}


async def run(args) -> dict:
    """Every part of the benchmark; returns the results as a dict."""
    from mesh_llm.models.loading import LoadOptions, load

    machine = await asyncio.to_thread(machine_info)
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if args.tiny:
            from mesh_llm.testing.tiny_model import build_tiny_llama

            model = str(build_tiny_llama(tmp / "tiny", seed=0))
        loaded = load(LoadOptions(model=model, device="cpu"))
        top_k = min(args.top_k, loaded.vocab_size)
        replies = recorded_replies(loaded, args.positions, top_k)
        result = {"experiment": "bench_router", "command": args.command, "machine": machine,
                  "model": "tiny" if args.tiny else args.model, "top_k": top_k, "vocab": loaded.vocab_size}
        result["functions_k8_neighbouring_positions"] = time_router_functions(
            replies, k=8, vocab=loaded.vocab_size, iterations=args.iterations, spread=True)
        result["functions_k8_identical_replies"] = time_router_functions(
            replies, k=8, vocab=loaded.vocab_size, iterations=args.iterations, spread=False)
        result["functions_k8_geometric"] = time_router_functions(
            replies, k=8, vocab=loaded.vocab_size, iterations=args.iterations, spread=True, rule="geometric")
        result["trace_k8"] = await k8_trace(model, loaded, tokens=args.k8_tokens, top_k=top_k, workdir=tmp / "k8")
        launch = "inproc" if args.tiny else args.launch
        result["k1_vs_in_process"] = await k1_against_in_process(model, loaded, tokens=args.tokens, rounds=args.rounds,
                                                                 launch=launch, threads=args.threads,
                                                                 workdir=tmp / "k1")
        result["latency"] = [await latency_against_slowest(model, loaded, k=k, tokens=args.tokens, top_k=64,
                                                           workdir=tmp / f"lat{k}") for k in (2, 4)]
    return result


def report(result: dict) -> str:
    """The benchmark's figures against the issue's goals, as text."""
    f, t = result["functions_k8_neighbouring_positions"], result["trace_k8"]
    same, geo = result["functions_k8_identical_replies"], result["functions_k8_geometric"]
    k1 = result["k1_vs_in_process"]
    lines = [
        f"model {result['model']}, top-k {result['top_k']}, vocabulary {result['vocab']}",
        f"router overhead K=8 (functions, linear, replies of 8 neighbouring positions): p50 {f['p50_ms']:.3f} ms, "
        f"p99 {f['p99_ms']:.3f} ms, union {f['union_mean']:.0f}  [goal <= 0.5 ms]",
        f"router overhead K=8 (functions, geometric): p50 {geo['p50_ms']:.3f} ms, p99 {geo['p99_ms']:.3f} ms",
        f"router overhead K=8 (functions, 8 identical replies): p50 {same['p50_ms']:.3f} ms, union {same['union_mean']:.0f}",
        f"router overhead K=8 (TokenTrace.router_ms in a real generation, {t['tokens']} tokens): p50 "
        f"{t['router_ms_p50']:.3f} ms, p99 {t['router_ms_p99']:.3f} ms, union {t['union_mean']:.0f}",
        f"K=1 mesh {np.median(k1['mesh_tokens_per_s']):.2f} tok/s vs in-process {np.median(k1['in_process_tokens_per_s']):.2f} "
        f"tok/s: ratio {k1['ratio_median']:.3f} (per round {', '.join(f'{r:.3f}' for r in k1['ratio'])}; "
        f"same tokens: {k1['same_tokens']}; expert {k1['launch']})  [goal >= 0.9]",
    ]
    for lat in result["latency"]:
        lines.append(f"K={lat['k']}: per-token latency p50 {lat['latency_p50_ms']:.1f} ms, slowest expert's model time "
                     f"p50 {lat['slowest_step_p50_ms']:.1f} ms, difference p50 {lat['overhead_p50_ms']:.2f} ms "
                     f"(p90 {lat['overhead_p90_ms']:.2f}, router {lat['router_ms_p50']:.2f})  [goal <= 5 ms]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random model (a quick check)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per timed generation")
    p.add_argument("--k8-tokens", type=int, default=16, help="tokens of the K=8 trace run")
    p.add_argument("--rounds", type=int, default=2, help="alternations of in-process and K=1 mesh decode")
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--positions", type=int, default=64, help="recorded reply positions for the function timing")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--launch", default="subprocess", help="K=1 expert as a subprocess or inproc")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the K=1 subprocess expert (0: default)")
    p.add_argument("--out", type=Path, default=Path("results/bench_router.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the figures and write them as JSON."""
    args = build_parser().parse_args(argv)
    args.command = command_line(__file__, argv)
    result = asyncio.run(run(args))
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Kill-switch latency: time from sending a signed HaltMesh to the last of 8 running streams closing.

Run: .venv/bin/python experiments/bench_halt.py [--halts 20 --streams 8 --experts 3 --k 2]
     [--model smollm2-135m] [--in-process]
Goal (issue 4): p99 < 1 s (the design's target), aim < 100 ms.

By default a child process runs the mesh (a router and --experts experts on one tiny random Llama,
all on a temporary SQLite store) and this process is the client, so the figure includes real
gRPC between processes. Members alice, bob and carol get fresh keys in a temporary governance
folder (policy.toml copied from the repository's governance/). Each round starts the streams,
waits until every one has produced a token, sends HaltMesh signed by one member, records when
each stream closes, checks every stream ended "halted", and lifts the halt with two signed
resume votes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mesh_llm.governance import convert
from mesh_llm.governance.keys import public_key_b64
from mesh_llm.governance.policy import add_member
from mesh_llm.grpc_util import channel
from mesh_llm.pb import governance_pb2_grpc, router_pb2, router_pb2_grpc
from mesh_llm.testing.governance import make_signers

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
MEMBERS = ["alice", "bob", "carol"]
SECRET = "bench-halt"
PROMPT = "Write a haiku about rivers"


async def start_mesh(args: argparse.Namespace, work: Path):
    """Start a router and args.experts experts in this process; return (router address, async stop())."""
    from mesh_llm.expert.server import ExpertConfig, start_expert
    from mesh_llm.models.loading import LoadOptions, load
    from mesh_llm.node import RouterConfig, start_router
    from mesh_llm.testing.tiny_model import build_tiny_llama

    if args.model == "tiny":
        model = str(build_tiny_llama(work / "tiny", context=4096))
    else:
        model = args.model
    loaded = await asyncio.to_thread(load, LoadOptions(model=model, device="cpu"))
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{work / 'mesh.db'}", secret=SECRET,
                                             governance_dir=work / "governance"))
    experts = []
    for _ in range(args.experts):
        config = ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0, measure_speed=False,
                              router=router.address, secret=SECRET)
        expert = await start_expert(config, loaded)
        await asyncio.wait_for(expert.link.registered.wait(), 30)
        experts.append(expert)

    async def stop() -> None:
        for expert in experts:
            await expert.stop(0)
        await router.stop(0)

    return router.address, stop


async def serve(args: argparse.Namespace) -> None:
    """Child mode: run the mesh, print its address as one JSON line, stop when stdin closes."""
    logging.basicConfig(level=logging.ERROR)  # the client prints the rounds; only errors from here
    address, stop = await start_mesh(args, Path(args.work))
    print(json.dumps({"address": address}), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await stop()


async def one_stream(stub, args: argparse.Namespace, seed: int, started: asyncio.Event) -> tuple[str, float, int]:
    """Run one Generate stream to its end; return (finish_reason, monotonic close time, tokens)."""
    reason, tokens = "closed without GenerationDone", 0
    request = router_pb2.GenerateRequest(prompt=PROMPT, k=args.k, max_tokens=args.max_tokens, temperature=0.8,
                                         seed=seed)
    async for event in stub.Generate(request, timeout=120):
        if event.HasField("token"):
            tokens += 1
            started.set()
        else:
            reason = event.done.finish_reason
    return reason, time.perf_counter(), tokens


async def run_rounds(address: str, signers, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Halt/resume args.halts times; return (halt-to-last-close, HaltMesh reply) seconds per round."""
    results = []
    async with channel(address) as ch:
        router = router_pb2_grpc.RouterStub(ch)
        gov = governance_pb2_grpc.GovernanceStub(ch)
        i = spoiled = 0
        while len(results) < args.halts:
            started = [asyncio.Event() for _ in range(args.streams)]
            streams = [asyncio.create_task(one_stream(router, args, 1000 * i + j, ev)) for j, ev in enumerate(started)]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            halter = MEMBERS[i % 3]
            msg = convert.signed_to_pb(signers.halt(halter, f"bench round {i}"))
            sent = time.perf_counter()
            await gov.HaltMesh(msg, timeout=10)
            replied = time.perf_counter()
            ended = await asyncio.wait_for(asyncio.gather(*streams), 30)
            early = [reason for reason, t, _ in ended if reason != "halted" and t < sent]
            late = [reason for reason, t, _ in ended if reason != "halted" and t >= sent]
            if late:
                raise SystemExit(f"round {i}: streams ended with {late} after the halt, expected 'halted'")
            if early:  # a stream finished by itself (e.g. EOS) before the halt: not 8 running, run it again
                spoiled += 1
                print(f"round {i:2d}: {len(early)} stream(s) ended ({early}) before the halt; repeated", flush=True)
            else:
                last = max(t for _, t, _ in ended) - sent
                results.append((last, replied - sent))
                print(f"round {i:2d}: last stream closed {last * 1000:7.1f} ms after HaltMesh "
                      f"(reply {1000 * (replied - sent):6.1f} ms; tokens per stream before the halt "
                      f"{min(n for *_, n in ended)}..{max(n for *_, n in ended)})", flush=True)
            if spoiled > args.halts:
                raise SystemExit("too many rounds had streams ending before the halt; raise --max-tokens")
            voters = [m for m in MEMBERS if m != halter][:2]
            for voter in voters:
                state = await gov.ResumeMesh(convert.signed_to_pb(signers.resume(voter)), timeout=10)
            if state.halted:
                raise SystemExit(f"round {i}: still halted after resume votes by {voters}")
            status = await router.GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=10)
            if status.halted or status.active_generations:
                raise SystemExit(f"round {i}: router status after resume: {status}")
            i += 1
    return results


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    return float(np.percentile(values, q))


async def main_async(args: argparse.Namespace) -> None:
    """Set up members and governance, start the mesh (child process or in-process), run rounds, print stats."""
    work = Path(tempfile.mkdtemp(prefix="bench_halt_"))
    gov_dir = work / "governance"
    gov_dir.mkdir()
    shutil.copy(REPO_GOV / "policy.toml", gov_dir / "policy.toml")
    signers = make_signers(MEMBERS)
    for name, key in signers.keys.items():
        add_member(gov_dir / "members.toml", name, public_key_b64(key))
    child = None
    try:
        if args.in_process:
            address, stop = await start_mesh(args, work)
        else:
            command = [sys.executable, __file__, "--serve", "--work", str(work), "--model", args.model,
                       "--experts", str(args.experts)]
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = await asyncio.to_thread(child.stdout.readline)
            if not line:
                raise SystemExit(f"the mesh process exited with {child.wait()} before it was ready")
            address, stop = json.loads(line)["address"], None
        print(f"mesh at {address}: {args.experts} experts ({args.model}), {args.streams} streams, k={args.k}, "
              f"{'in-process' if args.in_process else 'router in a child process'}", flush=True)
        results = await run_rounds(address, signers, args)
        if stop is not None:
            await stop()
    finally:
        if child is not None:
            child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)
    closes = [c for c, _ in results]
    replies = [r for _, r in results]
    print(f"\nHaltMesh -> last of {args.streams} streams closed, over {len(closes)} halts: "
          f"p50 {percentile(closes, 50) * 1000:.1f} ms, p99 {percentile(closes, 99) * 1000:.1f} ms, "
          f"max {max(closes) * 1000:.1f} ms (goal p99 < 1000 ms, aim < 100 ms)")
    print(f"HaltMesh reply: p50 {statistics.median(replies) * 1000:.1f} ms, p99 {percentile(replies, 99) * 1000:.1f} ms")


def main() -> None:
    """Parse arguments; run the benchmark, or the mesh when --serve."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--halts", type=int, default=20, help="halt/resume rounds")
    parser.add_argument("--streams", type=int, default=8, help="concurrent Generate streams per round")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--k", type=int, default=2, help="experts mixed per token")
    parser.add_argument("--max-tokens", type=int, default=2000, help="long enough that no stream ends by itself")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, built here) or a catalog name, e.g. smollm2-135m")
    parser.add_argument("--in-process", action="store_true", help="run the mesh in this process")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

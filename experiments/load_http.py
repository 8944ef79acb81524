"""Load test: many concurrent generations through the HTTP API against expert processes; errors and expert RSS.

    python experiments/load_http.py [--model smollm2-135m] [--experts 3] [--requests 32] [--max-tokens 16]
                                    [--rounds 3] [--threads 1] [--max-batch 8] [--k 2] [--extra 1]
                                    [--deadline-s 10] [--silence-s 5]

The router and its HTTP API run in this process, each expert in a process of its own (joined with the invite
token). The first round warms up; the expert RSS after it is the baseline the later rounds are measured against.
On a machine busy with other work, raise --deadline-s and --silence-s: a starved expert otherwise answers
late, misses heartbeats and is left out, and the generations it served fail.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil

from mesh_llm.api import ApiConfig, start_api
from mesh_llm.node import RouterConfig, start_router
from mesh_llm.router.registry import RegistryConfig
from mesh_llm.router.settings import MeshSettings

PROMPTS = ("The capital of France is", "Write a haiku about rivers.", "A mesh of experts", "Rivers flow to the",
           "The quick brown fox", "Every token is chosen by")


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    completed: int  # requests answered 200 with a completion
    errors: list[str]  # one line per failed request
    completion_tokens: int  # tokens generated over all requests
    seconds: float  # wall time of the round


async def load_round(base_url: str, requests: int, max_tokens: int, timeout_s: float = 600) -> RoundResult:
    """Send requests completions at once to base_url (…/v1) with the openai client and wait for all of them."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="load-test", max_retries=0, timeout=timeout_s)

    async def one(i: int) -> tuple[int, str]:
        try:
            reply = await client.completions.create(model="mesh", prompt=PROMPTS[i % len(PROMPTS)],
                                                    max_tokens=max_tokens, temperature=0, seed=i)
        except openai.OpenAIError as exc:
            return 0, f"request {i}: {type(exc).__name__}: {str(exc)[:200]}"
        return reply.usage.completion_tokens, ""

    began = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()
    errors = [err for _, err in outcomes if err]
    return RoundResult(completed=requests - len(errors), errors=errors, completion_tokens=sum(n for n, _ in outcomes),
                       seconds=time.perf_counter() - began)


def rss_mib(pids: list[int]) -> list[float]:
    """Resident memory of each process in MiB."""
    return [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]


async def wait_online(router, want: int, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until want experts are online in the router's registry; an exited expert process fails at once."""
    began = time.monotonic()
    while sum(r.state == "online" for r in router.registry.experts()) < want:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("an expert process exited before joining; run it by hand to see why")
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"fewer than {want} experts joined within {timeout_s:.0f} s")
        await asyncio.sleep(0.25)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --requests, the first one warms up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each expert")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=MeshSettings.default_k, help="experts mixed per token")
    parser.add_argument("--extra", type=int, default=MeshSettings.default_extra, help="straggler over-selection")
    parser.add_argument("--deadline-s", type=float, default=MeshSettings.step_deadline_s,
                        help="the router's per-token deadline (raise it on a machine busy with other work)")
    parser.add_argument("--silence-s", type=float, default=RegistryConfig.gone_after_s,
                        help="heartbeat silence before an expert counts as gone (suspect after half of it)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{Path(tmp) / 'router.db'}",
                                                 secret=os.urandom(16).hex(),
                                                 settings=MeshSettings(default_k=args.k, default_extra=args.extra,
                                                                       step_deadline_s=args.deadline_s),
                                                 registry=RegistryConfig(gone_after_s=args.silence_s,
                                                                         suspect_after_missed=args.silence_s / 2)))
        api = await start_api(router, ApiConfig(port=0, use_keys_file=False))
        procs = [subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", args.model,
                                   "--port", "0", "--host", "127.0.0.1", "--join", router.invite, "--device", "cpu",
                                   "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                                   "--name", f"load-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i in range(args.experts)]
        try:
            await wait_online(router, args.experts, procs)
            pids = [p.pid for p in procs]
            print(f"model {args.model}, {args.experts} experts (max batch {args.max_batch}, {args.threads} thread(s) "
                  f"each), {args.requests} concurrent completions of {args.max_tokens} tokens per round, k {args.k}, "
                  f"extra {args.extra}, deadline {args.deadline_s:g} s, silence {args.silence_s:g} s")
            baseline = None
            for n in range(args.rounds):
                result = await load_round(api.base_url, args.requests, args.max_tokens)
                rss = rss_mib(pids)
                label = "warm-up" if n == 0 else f"round {n}"
                print(f"{label:8s} completed {result.completed}/{args.requests}, errors {len(result.errors)}, "
                      f"{result.completion_tokens / result.seconds:6.2f} tokens/s, {result.seconds:6.1f} s, "
                      f"expert RSS MiB {' '.join(f'{r:.0f}' for r in rss)}")
                for err in result.errors[:5]:
                    print("   ", err)
                if n == 0:
                    baseline = rss
                else:
                    growth = max(((r - b) / b for r, b in zip(rss, baseline)), key=abs)
                    print(f"         largest expert RSS change since warm-up {100 * growth:+.1f}%   (goal within 10%)")
            print(f"load average 1/5/15 min {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
            await api.stop()
            await router.stop(0)


if __name__ == "__main__":
    asyncio.run(main())

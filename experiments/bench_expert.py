"""Expert benchmark: gRPC greedy decode against an in-process loop, cold start, reply sizes, concurrent sessions.

    python experiments/bench_expert.py [--model smollm2-135m] [--tokens 64] [--threads 2] [--sessions 8]
                                       [--max-batch 8] [--concurrency-only]

Prints ratios measured in one run on this machine (the server runs as a separate process): among them the
total decode tokens/s of --sessions concurrent sessions against one session on the same expert.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import torch

from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import decode_topk

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ("Be brief.", "You are a poet.", "Answer in French, then in English, and keep it short.", "Hello!",
          "Use simple words a child knows.", "Think step by step.", "Make it funny.", "Set it in the year 3000.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_decode(loaded, prompt_ids: list[int], tokens: int) -> tuple[list[int], float]:
    """Plain transformers greedy loop with a KV cache; returns tokens and decode tokens/s."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.model.config)
    out_ids = []
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt_ids]), cache=cache, use_cache=True,
                              logits_to_keep=1).logits
        began = time.perf_counter()
        for _ in range(tokens):
            nxt = int(logits[0, -1].argmax())
            out_ids.append(nxt)
            logits = loaded.model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True,
                                  logits_to_keep=1).logits
    return out_ids, tokens / (time.perf_counter() - began)


async def wait_serving(address: str, deadline_s: float = 180) -> float:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    began = time.perf_counter()
    async with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.perf_counter() - began < deadline_s:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - began
            except Exception:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(address)


async def grpc_decode(address: str, prompt_ids: list[int], tokens: int, top_k: int) -> tuple[list[int], float]:
    """Greedy decode through Step calls; returns tokens and decode tokens/s."""
    async with channel(address) as ch:
        stub = expert_pb2_grpc.ExpertStub(ch)
        vocab = (await stub.Info(expert_pb2.InfoRequest())).vocab_size
        prefilled = await stub.Step(expert_pb2.StepRequest(session_id="bench", tokens=prompt_ids, top_k=top_k))
        began = time.perf_counter()
        out_ids = await greedy_steps(stub, "bench", prefilled, tokens, top_k, vocab)
        return out_ids, tokens / (time.perf_counter() - began)


async def greedy_steps(stub, session_id: str, reply, tokens: int, top_k: int, vocab: int) -> list[int]:
    """Continue a prefilled session greedily for tokens Step calls; the tokens chosen."""
    out_ids = []
    for _ in range(tokens):
        dist = decode_topk(reply.distributions[0], reply.encoding, vocab)
        nxt = int(dist.ids[dist.logprobs.argmax()])
        out_ids.append(nxt)
        reply = await stub.Step(expert_pb2.StepRequest(
            session_id=session_id, start_position=reply.session_length, tokens=[nxt], top_k=top_k))
    return out_ids


async def concurrent_decode(address: str, prompts: list[list[int]], tokens: int, top_k: int) -> tuple[float, list]:
    """Prefill one session per prompt, then decode them all at once; total decode tokens/s and each one's tokens."""
    async with channel(address) as ch:
        stub = expert_pb2_grpc.ExpertStub(ch)
        vocab = (await stub.Info(expert_pb2.InfoRequest())).vocab_size
        tag = f"c{len(prompts)}-{time.perf_counter_ns()}"
        prefilled = await asyncio.gather(*(stub.Step(expert_pb2.StepRequest(session_id=f"{tag}-{i}", tokens=p,
                                                                            top_k=top_k))
                                           for i, p in enumerate(prompts)))
        began = time.perf_counter()
        outs = await asyncio.gather(*(greedy_steps(stub, f"{tag}-{i}", reply, tokens, top_k, vocab)
                                      for i, reply in enumerate(prefilled)))
        elapsed = time.perf_counter() - began
        for i in range(len(prompts)):
            await stub.CloseSession(expert_pb2.CloseSessionRequest(session_id=f"{tag}-{i}"))
        return len(prompts) * tokens / elapsed, outs


async def concurrency(address: str, prompts: list[list[int]], tokens: int, top_k: int) -> None:
    """Print total tokens/s of one session and of all prompts' sessions at once, and their ratio."""
    await concurrent_decode(address, prompts, 4, top_k)  # warm-up at the batch size measured
    load_before = os.getloadavg()
    single_tps, single_out = await concurrent_decode(address, prompts[:1], tokens, top_k)
    many_tps, many_out = await concurrent_decode(address, prompts, tokens, top_k)
    load_after = os.getloadavg()
    print(f"1 session             {single_tps:7.2f} tokens/s in total")
    print(f"{len(prompts)} sessions at once    {many_tps:7.2f} tokens/s in total")
    print(f"ratio {len(prompts)} sessions/1      {many_tps / single_tps:7.3f}   (goal >= 3)")
    print(f"session 0 same tokens {many_out[0] == single_out[0]}   (batched against alone)")
    print(f"load average 1/5/15 min before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")


async def reply_sizes(address: str, prompt_ids: list[int]) -> dict[str, int]:
    sizes = {}
    async with channel(address) as ch:
        stub = expert_pb2_grpc.ExpertStub(ch)
        for k in (16, 64, 256):
            for name, enc in (("f32", expert_pb2.LOGPROB_F32), ("f16", expert_pb2.LOGPROB_F16)):
                reply = await stub.Step(expert_pb2.StepRequest(session_id=f"size{k}{name}", tokens=prompt_ids,
                                                               top_k=k, encoding=enc))
                sizes[f"k={k} {name}"] = reply.ByteSize()
    return sizes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions compared against one")
    parser.add_argument("--max-batch", type=int, default=8, help="the expert's --max-batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency-only", action="store_true", help="skip the in-process and reply-size parts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load(LoadOptions(model=args.model, device="cpu"))
    prompt_ids = loaded.tokenizer(PROMPT).input_ids
    prompts = [loaded.tokenizer(f"{TOPICS[i % len(TOPICS)]} {PROMPT}").input_ids for i in range(args.sessions)]
    if not args.concurrency_only:
        in_process_decode(loaded, prompt_ids, 4)  # warm-up
        local_ids, local_tps = in_process_decode(loaded, prompt_ids, args.tokens)
    del loaded

    port = free_port()
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", args.model,
                             "--port", str(port), "--host", "127.0.0.1", "--device", args.device,
                             "--threads", str(args.threads), "--max-batch", str(args.max_batch)],
                            env=dict(os.environ), stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address)
        cold_start = time.perf_counter() - began
        print(f"model {args.model}, {args.tokens} greedy tokens, top_k {args.top_k}, {args.threads} threads, "
              f"device {args.device}, max batch {args.max_batch}")
        if not args.concurrency_only:
            await grpc_decode(address, prompt_ids, 4, args.top_k)  # warm-up
            mesh_ids, mesh_tps = await grpc_decode(address, prompt_ids, args.tokens, args.top_k)
            sizes = await reply_sizes(address, prompt_ids)
        await concurrency(address, prompts, args.tokens, args.top_k)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    if args.concurrency_only:
        return
    print(f"in-process decode     {local_tps:7.2f} tokens/s")
    print(f"gRPC loopback decode  {mesh_tps:7.2f} tokens/s")
    print(f"ratio gRPC/in-process {mesh_tps / local_tps:7.3f}   (goal >= 0.9)")
    print(f"same tokens           {mesh_ids == local_ids}")
    print(f"cold start to SERVING {cold_start:7.2f} s       (goal <= 5 s, converted cache, includes speed probe)")
    for name, size in sizes.items():
        print(f"reply bytes {name:10s} {size:6d}")


if __name__ == "__main__":
    asyncio.run(main())

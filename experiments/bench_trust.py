"""Lying experts: tolerances from model variants, how fast a liar is quarantined, what spot checks cost.

    .venv/bin/python experiments/bench_trust.py calibrate [--real] [--positions 256]
    .venv/bin/python experiments/bench_trust.py liar [--lie shuffle|onehot|other] [--real] [--tokens 48]
    .venv/bin/python experiments/bench_trust.py honest [--checks 1000] [--real] [--live]
    .venv/bin/python experiments/bench_trust.py robust [--real]

calibrate: top-64 replies of one model loaded as float32, bfloat16 and NF4, teacher-forced over the
  Apache-2.0 license; prints the symmetric KL and the top-1 gap (router.trust.compare) of every pair
  of variants and of each variant against lies (shuffled log-probabilities, all mass on one token,
  another model's reply), as percentiles. The tolerances in router.trust come from these figures.
liar: a router and four experts of one model over gRPC in this process, one of them a real expert
  server whose Step replies a wrapper (LyingService, here) corrupts; generations with spot checks on
  every round until the liar is quarantined. Prints N (spot checks until then, and how many of them
  judged the liar) and the cost: extra Step calls per token and ms per token against the same mesh
  with spot checks off, measured in the same run.
robust: nats per token (teacher-forced NLL, Apache-2.0 license) of float32 and bfloat16 replies mixed
  with a lie (shuffled, one-hot) by the `linear` and the `robust` rule, against the honest pair alone.
honest: spot checks between honest variants (float32 / bfloat16, NF4 with --nf4) through the same
  comparison, on every position of real text, `--checks` of them; prints failed verdicts and the
  lowest trust any expert reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from mesh_llm.expert.service import ExpertService
from mesh_llm.pb import expert_pb2
from mesh_llm.router.trust import TrustBook, TrustConfig, compare, verdicts
from mesh_llm.wire import SparseDist, decode_topk, encode_topk
from meshlab.common import command_line

LIES = ("shuffle", "onehot", "other")
TOP_K = 64


def shuffled(d: SparseDist, rng: np.random.Generator) -> SparseDist:
    """The same ids and the same values, the values given to other ids."""
    return SparseDist(ids=d.ids, logprobs=rng.permutation(d.logprobs), rest_logmass=d.rest_logmass)


def onehot(d: SparseDist) -> SparseDist:
    """All mass on the listed id the reply finds least likely."""
    return SparseDist(ids=d.ids[[int(np.argmin(d.logprobs))]], logprobs=np.zeros(1), rest_logmass=-np.inf)


class LyingService(ExpertService):
    """A real expert whose Step replies are corrupted: shuffled, one-hot, or (lie 'other') another model's.

    For 'other' the engine serves another model and Info claims the model id of `claims`.
    """

    def __init__(self, engine, lie: str, *, claims: str = "", seed: int = 0):
        super().__init__(engine)
        self.lie = lie
        self.claims = claims
        self.rng = np.random.default_rng(seed)

    def info(self) -> expert_pb2.ExpertInfo:
        info = super().info()
        if self.claims:
            info.model_id = self.claims
        return info

    async def Step(self, request, context):
        reply = await super().Step(request, context)
        if self.lie == "other":
            return reply
        vocab = self.engine.loaded.vocab_size
        lied = []
        for msg in reply.distributions:
            d = decode_topk(msg, reply.encoding, vocab)
            d = shuffled(d, self.rng) if self.lie == "shuffle" else onehot(d)
            lied.append(encode_topk(d.ids, d.logprobs, d.rest_logmass, reply.encoding))
        del reply.distributions[:]
        reply.distributions.extend(lied)
        return reply


# calibration -------------------------------------------------------------------------------------

def _variants(model: str, nf4: bool) -> dict:
    from mesh_llm.models.loading import LoadOptions, load

    out = {"float32": load(LoadOptions(model=model, device="cpu")),
           "bfloat16": load(LoadOptions(model=model, device="cpu", dtype="bfloat16"))}
    if nf4:
        out["nf4"] = load(LoadOptions(model=model, device="cpu", quant="nf4"))
    return out


def _replies(loaded, positions: int) -> list[SparseDist]:
    from bench_router import recorded_replies

    return recorded_replies(loaded, min(positions, loaded.context_limit - 64), TOP_K)


def _summary(rows: list) -> dict:
    kl = np.array([c.kl for c in rows])
    gap = np.array([c.top1_gap for c in rows])
    corr = np.array([c.correlation for c in rows])

    def pct(a, q):
        return round(float(np.percentile(a, q)), 4)

    return {"n": len(rows), "kl_p50": pct(kl, 50), "kl_p99": pct(kl, 99), "kl_max": round(float(kl.max()), 4),
            "kl_min": round(float(kl.min()), 4), "gap_p50": pct(gap, 50), "gap_p99": pct(gap, 99),
            "gap_max": round(float(gap.max()), 4), "gap_min": round(float(gap.min()), 4),
            "corr_min": round(float(corr.min()), 4), "corr_p1": pct(corr, 1), "corr_p50": pct(corr, 50),
            "corr_p99": pct(corr, 99), "corr_max": round(float(corr.max()), 4)}


def calibrate(model: str, other: str | None, positions: int, nf4: bool) -> dict:
    """KL and top-1 gap between variants of one model, and between a variant and lies."""
    variants = _variants(model, nf4)
    replies = {name: _replies(loaded, positions) for name, loaded in variants.items()}
    vocab = variants["float32"].vocab_size
    n = min(len(r) for r in replies.values())
    names = list(replies)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a} vs {b}"] = _summary([compare(replies[a][j], replies[b][j], vocab) for j in range(n)])
    rng = np.random.default_rng(0)
    base = replies["float32"]
    lies = {"shuffle": [shuffled(d, rng) for d in base[:n]], "onehot": [onehot(d) for d in base[:n]]}
    if other:
        lies["other model"] = _replies(_variants(other, False)["float32"], positions)[:n]
    else:  # no second model of this tokenizer here: the model's own reply 7 positions later
        lies["other position"] = base[7:n] + base[:7]
    for name, lied in lies.items():
        for honest in names:
            out[f"{honest} vs {name}"] = _summary([compare(replies[honest][j], lied[j], vocab) for j in range(n)])
    return out


# robust mixing ----------------------------------------------------------------------------------------

def robust_gain(model: str, positions: int) -> dict:
    """Teacher-forced NLL of float32 + bfloat16 + one lie mixed by `linear` and by `robust`, and of the honest pair."""
    from mesh_llm.mixing.aggregation import mix
    from meshlab.data import apache_license_text

    variants = _variants(model, False)
    f32 = variants["float32"]
    honest = [_replies(variants[d], positions) for d in ("float32", "bfloat16")]
    n = len(honest[0]) - 1  # the last reply's next token lies past the recorded text
    text, _ = apache_license_text()
    targets = list(f32.tokenizer(text, add_special_tokens=False).input_ids)[65:65 + n]
    vocab, rng = f32.vocab_size, np.random.default_rng(0)
    lies = {"shuffle": [shuffled(d, rng) for d in honest[0]], "onehot": [onehot(d) for d in honest[0]]}

    def nll(rows: list[list[SparseDist]], rule: str) -> float:
        return round(-float(np.mean([mix([r[j] for r in rows], vocab_size=vocab, rule=rule).logprob_of(t, vocab)
                                     for j, t in enumerate(targets)])), 4)

    out = {"positions": n, "honest_pair_linear": nll(honest, "linear")}
    for name, lied in lies.items():
        out[f"with_{name}_linear"] = nll([*honest, lied], "linear")
        out[f"with_{name}_robust"] = nll([*honest, lied], "robust")
    out["honest_three_robust"] = nll([*honest, honest[0]], "robust")  # no liar: what dropping one costs
    return out


# honest checks -------------------------------------------------------------------------------------

def honest_checks(model: str, checks: int, nf4: bool, db: str) -> dict:
    """Judge three honest variants' replies position after position like the router's spot checks do."""
    from mesh_llm.store.db import open_engine

    variants = _variants(model, nf4)
    if len(variants) < 3:  # three replies give a majority: two float32 experts and a bfloat16 one
        variants = {"float32-a": variants["float32"], "float32-b": variants["float32"], "bfloat16": variants["bfloat16"]}
    vocab = next(iter(variants.values())).vocab_size
    book = TrustBook(open_engine(db))
    replies = {name: _replies(loaded, 1024) for name, loaded in variants.items()}
    n = min(len(r) for r in replies.values())
    failed, lowest, done = 0, 1.0, 0
    while done < checks:
        for j in range(n):
            if done >= checks:
                break
            judged = verdicts({name: r[j] for name, r in replies.items()}, vocab, book.config)
            book.record(judged)
            failed += sum(not passed for passed, _ in judged.values())
            lowest = min(lowest, min(book.trust(name) for name in replies))
            done += 1
    return {"checks": done, "positions": n, "failed_verdicts": failed, "lowest_trust": round(lowest, 4),
            "quarantined": [r.expert_id for r in book.rows() if r.quarantined],
            "threshold": book.config.threshold}


# the liar in a live mesh -----------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _served(service, router_invite: str, name: str):
    from mesh_llm.expert.join import RouterLink
    from mesh_llm.expert.server import resolve_join
    from mesh_llm.grpc_util import bind, new_server
    from mesh_llm.pb import expert_pb2_grpc

    server = new_server()
    expert_pb2_grpc.add_ExpertServicer_to_server(service, server)
    address = f"127.0.0.1:{bind(server, '127.0.0.1', 0)}"
    await server.start()
    router, secret = resolve_join(None, router_invite)
    link = RouterLink(router=router, secret=secret, advertise=address, name=name, info=service.info,
                      active_sessions=lambda: 0)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.registered.wait(), 60)
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(0)
        service.shutdown()


async def _generate(stub, until=None, **fields) -> tuple[list, object, float]:
    """(token events, summary, seconds) of one Generate call; stops early once until() is true after a token."""
    from mesh_llm.pb import router_pb2

    began = time.perf_counter()
    tokens, done = [], None
    call = stub.Generate(router_pb2.GenerateRequest(**fields), timeout=600)
    async for event in call:
        if event.HasField("token"):
            tokens.append(event.token)
            if until is not None and until():
                call.cancel()  # the router stops this generation now, not when the call is collected
                break
        else:
            done = event.done
    return tokens, done, time.perf_counter() - began


def _step_calls(router) -> float:
    from mesh_llm.router.metrics import router_metrics

    metrics = router_metrics(router.registry)
    return sum(s.value for m in metrics.expert_calls.collect() for s in m.samples)


@contextlib.asynccontextmanager
async def _mesh(services: list, workdir: Path):
    """A router spot-checking every round (K=2) with these expert services joined; yields (router, stub, links)."""
    from mesh_llm.grpc_util import channel
    from mesh_llm.node import RouterConfig, start_router
    from mesh_llm.pb import router_pb2_grpc
    from mesh_llm.router.settings import MeshSettings

    settings = MeshSettings(default_k=2, spot_check=1.0, default_top_k=TOP_K, default_extra=0)
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{workdir / 'router.db'}",
                                             secret="bench", settings=settings))
    try:
        async with contextlib.AsyncExitStack() as stack:
            links = [await stack.enter_async_context(_served(service, router.invite, f"expert-{i}"))
                     for i, service in enumerate(services)]
            ch = await stack.enter_async_context(channel(router.address))
            yield router, router_pb2_grpc.RouterStub(ch), links
    finally:
        await router.stop(0)


async def honest_live(model: str, checks: int, tokens: int, workdir: Path) -> dict:
    """Float32, float32 and bfloat16 experts of one model, every round spot-checked, until `checks` rounds."""
    from mesh_llm.expert.engine import StepEngine
    from mesh_llm.router.trust import trust_book

    variants = _variants(model, False)
    services = [ExpertService(StepEngine(variants[d])) for d in ("float32", "float32", "bfloat16")]
    async with _mesh(services, workdir) as (router, stub, _):
        book = trust_book(router.registry)
        rounds = generations = 0
        lowest = 1.0
        while rounds < checks:
            _, done, _ = await _generate(stub, prompt="Once upon a time", max_tokens=tokens, seed=generations,
                                         temperature=1.0)
            rounds += done.rounds
            generations += 1
            lowest = min([lowest] + [r.trust for r in book.rows()])
        rows = book.rows()
        return {"model": model, "checked_rounds": rounds, "generations": generations,
                "verdicts": sum(r.checks for r in rows), "failed_verdicts": sum(r.failed for r in rows),
                "lowest_trust_after_a_generation": round(lowest, 4),
                "quarantined": [r.expert_id for r in rows if r.quarantined], "threshold": book.config.threshold}


async def liar_run(model: str, other: str | None, lie: str, tokens: int, workdir: Path, rounds: int) -> dict:
    """Quarantine of one liar among three honest experts, and the per-token cost of spot checks."""
    from mesh_llm.expert.engine import StepEngine
    from mesh_llm.router.trust import trust_book

    honest = _variants(model, False)["float32"]
    liar_model = _variants(other, False)["float32"] if lie == "other" else honest
    services = [ExpertService(StepEngine(honest)) for _ in range(3)]
    services.append(LyingService(StepEngine(liar_model), lie, claims=honest.model_id))
    result: dict = {"lie": lie, "model": model}
    async with _mesh(services, workdir) as (router, stub, links):
        liar = links[-1]
        book = trust_book(router.registry)

        def caught():
            return any(r.quarantined for r in book.rows() if r.expert_id == liar.expert_id)

        checks = generations = 0
        while not caught() and generations < 50:  # every round is spot-checked: rounds = checks
            toks, _, _ = await _generate(stub, until=caught, prompt="The capital of France is",
                                         max_tokens=tokens, seed=generations, k=2)
            generations += 1
            checks += len(toks)
        liar_row = next(r for r in book.rows() if r.expert_id == liar.expert_id)
        result.update(quarantined=liar_row.quarantined, spot_checks_until_quarantine=checks,
                      checks_judging_liar=liar_row.checks, liar_failed=liar_row.failed,
                      liar_trust=round(liar_row.trust, 3),
                      honest_lowest_trust=round(min((r.trust for r in book.rows()
                                                     if r.expert_id != liar.expert_id), default=1.0), 3))
        await asyncio.sleep(2.0)  # the generation left when the liar was caught stops on the router meanwhile
        result["cost"] = await _check_cost(router, stub, tokens, rounds)
    return result


async def _check_cost(router, stub, tokens: int, rounds: int) -> dict:
    """Step calls per token (pooled) and ms per token (median of runs) with spot checks on every round, on 5%
    of rounds and off, alternated in one run."""
    ms: dict[str, list] = {}
    calls: dict[str, list] = {}
    rates = (0.0, 1.0, 0.05)
    for r in range(rounds):
        for rate in rates[r % 3:] + rates[:r % 3]:  # each rate goes first, second and third in turn
            router.service.settings.spot_check = rate
            before = _step_calls(router)
            toks, _, seconds = await _generate(stub, prompt="Rivers flow to the sea and", max_tokens=tokens,
                                               seed=100 + r, k=2)
            ms.setdefault(f"{rate:g}", []).append(seconds * 1000 / max(len(toks), 1))
            calls.setdefault(f"{rate:g}", []).append((_step_calls(router) - before, len(toks)))
    out = {rate: {"ms_per_token": round(float(np.median(ms[rate])), 3),
                  "calls_per_token": round(sum(c for c, _ in calls[rate]) / max(sum(n for _, n in calls[rate]), 1), 4)}
           for rate in ms}
    base = out["0"]
    for rate in ("1", "0.05"):
        out[rate]["ms_ratio_vs_off"] = round(out[rate]["ms_per_token"] / base["ms_per_token"], 3)
        out[rate]["extra_calls_per_token"] = round(out[rate]["calls_per_token"] - base["calls_per_token"], 4)
    return out


def _tiny_models(workdir: Path) -> tuple[str, str]:
    from mesh_llm.testing.tiny_model import build_tiny_llama

    return (str(build_tiny_llama(workdir / "tiny0", seed=0)), str(build_tiny_llama(workdir / "tiny1", seed=1)))


def _real_checkpoint() -> str:
    """The converted smollm2-135m checkpoint folder in MESH_HOME (pulled first when missing)."""
    from mesh_llm.models.catalog import resolve
    from mesh_llm.models.fetch import pull
    from mesh_llm.models.loading import checkpoint_for

    entry = resolve("smollm2-135m")
    pull(entry)
    return str(checkpoint_for(entry))


def main(argv: list[str] | None = None) -> dict:
    """Run one part of the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("calibrate", "liar", "honest", "robust"))
    parser.add_argument("--real", action="store_true", help="smollm2-135m instead of tiny random models")
    parser.add_argument("--nf4", action="store_true", help="include an NF4 variant (bitsandbytes on the CPU)")
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--lie", choices=LIES, default="shuffle")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=9, help="alternations of the spot-check cost measurement")
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--live", action="store_true", help="honest: spot checks in a live mesh of three experts "
                        "(float32, float32, bfloat16) instead of replies judged offline")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tiny, tiny_other = _tiny_models(workdir)
        model, other = (_real_checkpoint(), None) if args.real else (tiny, tiny_other)
        os.environ["MESH_HOME"] = str(workdir / "home")  # keys and the audit key of this run stay in it
        if args.part == "robust":
            figures = robust_gain(model, args.positions)
        elif args.part == "calibrate":
            figures = calibrate(model, other, args.positions, args.nf4)
        elif args.part == "honest" and args.live:
            figures = asyncio.run(honest_live(model, args.checks, args.tokens, workdir))
        elif args.part == "honest":
            figures = honest_checks(model, args.checks, args.nf4, f"sqlite:///{workdir / 'trust.db'}")
        else:
            lie = args.lie
            if lie == "other" and other is None:
                other = tiny_other  # not reached for --real: another model of its tokenizer is not at hand
            figures = asyncio.run(liar_run(model, other, lie, args.tokens, workdir, args.rounds))
    figures["command"] = command_line(__file__, argv)
    figures["config"] = TrustConfig().__dict__
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()

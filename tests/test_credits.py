"""Credits: the ledger equals the tokens served (real router and tiny experts), survives restarts, shows in
`mesh credits`, `mesh status` and /metrics, and a busy router serves clients with credits first."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from typer.testing import CliRunner

from mesh_llm.auth import Credentials
from mesh_llm.cli.main import app
from mesh_llm.grpc_util import channel
from mesh_llm.node import RouterConfig, start_router
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.credits import Admission, CreditPolicy, read_ledger
from mesh_llm.router.metrics import router_metrics
from mesh_llm.store.db import open_engine
from tests.expert_helpers import running_expert
from tests.mesh_helpers import local_mesh

PROMPT = "The capital of France is"


def _ledger_total(db_url: str) -> int:
    engine = open_engine(db_url)
    try:
        return sum(r.tokens for r in read_ledger(engine))
    finally:
        engine.dispose()


async def test_ledger_sums_equal_tokens_served_and_survive_a_restart(tiny_loaded, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'router.db'}"
    config = RouterConfig(port=0, db_url=db_url, secret="s3cret")
    async with local_mesh([tiny_loaded] * 3, tmp_path, router_config=config) as mesh:
        served = 0
        for k, tokens in ((2, 9), (1, 7), (3, 5)):
            events, done = await mesh.generate(prompt=PROMPT, k=k, max_tokens=tokens, seed=k)
            assert done.finish_reason in ("length", "eos") and events
            served += sum(len(e.expert_ids) for e in events)
        rows = mesh.router.service.credits.rows()
        assert sum(r.tokens for r in rows) == served
        by_donor = Counter()
        for r in rows:
            by_donor[r.donor[:16] or "(no key)"] += r.tokens
        per_expert = {e.expert_id: e.tokens_served for e in mesh.router.registry.experts()}
        assert {r.expert_id: r.tokens for r in rows} == {e: n for e, n in per_expert.items() if n}
        exposition = router_metrics(mesh.router.registry).exposition().decode()
        scraped = sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                      if line.startswith("mesh_router_credits_total{"))
        assert scraped == served
        status = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--router", mesh.router.address])
        assert "credits by donor: " + " · ".join(f"{d} {n}" for d, n in by_donor.most_common()) in status.output
    assert _ledger_total(db_url) == served  # written to the store, read by a fresh engine
    restarted = await start_router(config)
    try:
        assert sum(r.tokens for r in restarted.service.credits.rows()) == served
    finally:
        await restarted.stop(0)
    shown = CliRunner().invoke(app, ["credits", "--db", db_url])
    assert shown.exit_code == 0, shown.output
    assert all(f"donor {d}: {n} credits" in shown.output for d, n in by_donor.items())


async def test_a_keyed_registration_credits_its_donor(tiny_loaded, tmp_path):
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret")
    router = await start_router(config)
    try:
        async with running_expert(tiny_loaded) as (expert, _), channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            await stub.RegisterExpert(router_pb2.RegisterExpertRequest(
                address=expert.address, expert_key="alice-key"), timeout=10,
                metadata=Credentials(bearer="s3cret").metadata())
            events = [e async for e in stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, k=1, max_tokens=6),
                                                     timeout=60)]
        tokens = sum(e.HasField("token") for e in events)
        alice = router.service.identity("alice-key")
        [row] = router.service.credits.rows()
        assert (row.donor, row.tokens) == (alice, tokens)
        assert router.service.credits.balance(alice) == tokens
        assert router.service.credits.balance(router.service.identity("bob-key")) == 0
    finally:
        await router.stop(0)


async def _first_token_and_end(stub, **fields) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    first = None
    async for event in stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120):
        if event.HasField("token") and first is None:
            first = loop.time()
    return first, loop.time()


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("by_credits", [True, False])
async def test_busy_router_serves_clients_with_credits_first(tiny_loaded, tmp_path, by_credits):
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret",
                          credits=CreditPolicy(max_active=1, by_credits=by_credits))
    async with local_mesh([tiny_loaded] * 2, tmp_path, router_config=config) as mesh:
        service = mesh.router.service
        [first, _] = [e.link.expert_id for e in mesh.experts]
        service.credits.bind(first, service.identity("alice-key"))  # what alice's keyed registration does
        await mesh.generate(prompt=PROMPT, k=2, max_tokens=4)
        assert service.credits.balance(service.identity("alice-key")) > 0
        async with service.admission.slot(0):  # the mesh is busy: its one slot is taken
            poor = asyncio.create_task(_first_token_and_end(mesh.stub, prompt=PROMPT, k=2, max_tokens=6))
            await _wait_for(lambda: service.admission.waiting == 1)
            rich = asyncio.create_task(_first_token_and_end(mesh.stub, prompt=PROMPT, k=2, max_tokens=6,
                                                            donor_key="alice-key"))
            await _wait_for(lambda: service.admission.waiting == 2)
        (poor_first, poor_end), (rich_first, rich_end) = await asyncio.gather(poor, rich)
    if by_credits:
        assert rich_end <= poor_first  # one slot: the client with credits ran entirely before the other began
    else:
        assert poor_end <= rich_first  # first come, first served


async def test_admission_hands_slots_over_and_forgets_cancelled_waiters():
    admission = Admission(CreditPolicy(max_active=1, by_credits=True))
    order: list[str] = []

    async def run(name: str, credits: int) -> None:
        async with admission.slot(credits):
            order.append(name)
            await asyncio.sleep(0.01)

    async with admission.slot(0):
        tasks = [asyncio.create_task(run(n, c)) for n, c in (("low", 1), ("gone", 50), ("high", 9))]
        await _wait_for(lambda: admission.waiting == 3)
        tasks[1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["high", "low"] and admission.running == 0 and admission.waiting == 0

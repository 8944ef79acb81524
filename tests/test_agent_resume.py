"""An agent task whose router is SIGKILLed mid-generation resumes it from the last checkpoint once a new
router process is up, and ends with the text an uninterrupted run of the same request gives."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from sqlalchemy import select

from mesh_llm.agent.loop import Agent, AgentConfig
from mesh_llm.agent.progress import Progress
from mesh_llm.agent.tasks import TaskStore
from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
from mesh_llm.governance.core import Governance
from mesh_llm.models.loading import LoadOptions
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import stream_generate
from mesh_llm.store.checkpoint_tables import checkpoints
from mesh_llm.testing.agent import governance_folder
from tests.test_agent_loop import long_tiny, long_tiny_b  # noqa: F401  (fixtures)
from tests.test_resume import _free_port, _online, _start_router

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
KILL_AT = 10  # tokens streamed before the router dies (it checkpoints every 4)


class _KillRouter(Progress):
    """Progress that SIGKILLs the router once KILL_AT tokens have streamed and starts a new one on its port."""

    def __init__(self, restart) -> None:
        self.restart, self.restarted, self.seen, self.last = restart, None, 0, 0

    def stage(self, task_id: int, stage: str, text: str) -> None:
        pass

    def tokens(self, task_id: int, count: int) -> None:
        self.seen, self.last = max(self.seen, count), count
        if count == KILL_AT and self.restarted is None:
            self.restarted = asyncio.get_running_loop().create_task(self.restart())


async def test_a_task_generation_survives_a_router_sigkill(long_tiny, long_tiny_b, tmp_path, mesh_home):  # noqa: F811
    port, db_url = _free_port(), f"sqlite:///{tmp_path / 'router.db'}"
    address = f"127.0.0.1:{port}"
    first, invite = await _start_router(port, db_url, mesh_home)
    routers, experts = [first], []

    async def restart():
        routers[-1].send_signal(signal.SIGKILL)
        await asyncio.to_thread(routers[-1].wait, 10)
        routers.append((await _start_router(port, db_url, mesh_home))[0])

    try:
        joined, secret = resolve_join(None, invite)
        for loaded in (long_tiny, long_tiny_b):  # slowed so the kill lands mid-generation
            experts.append(await start_expert(ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0,
                                                           measure_speed=False, router=joined, secret=secret,
                                                           delay_ms=60), loaded))
        await _online(address, 2)
        gov = Governance.open(db_url, gov_dir=governance_folder(tmp_path / "gov", phase=2, source=REPO_GOV))
        store = TaskStore(gov.engine)
        config = AgentConfig(router=address, k=2, temperature=0.0, resume_wait_s=90, rationale_max=60, text_max=60)
        agent = Agent(config=config, gov=gov, store=store)
        agent.progress = progress = _KillRouter(restart)
        task = store.submit({"type": "test_generation", "kinds": ["note"]}, source="test")
        task = await agent.run_task(store.claim(task.id, subset=None, expert_ids=()))
        assert progress.restarted is not None, (progress.seen, task.state, task.error)
        await progress.restarted
        assert len(routers) == 2 and progress.seen > KILL_AT, (task.state, task.error)
        steps = {r.event: json.loads(r.detail) for r in gov.audit_rows(200) if r.event.startswith("agent_generation")}
        assert set(steps) == {"agent_generation_lost", "agent_generation_resumed"}, steps
        assert "generation lost" not in task.error and task.raw_output, task.error

        generation_id = steps["agent_generation_resumed"]["generation_id"]
        with gov.engine.connect() as conn:  # the request as the router stored it (finished now, so not resumable)
            row = conn.execute(select(checkpoints).where(checkpoints.c.generation_id == generation_id)).one()
        assert row.finish_reason and row.tokens >= 4
        request = router_pb2.GenerateRequest.FromString(row.request)
        done = None
        async for event in stream_generate(address, request):  # the same request again, never interrupted
            if event.HasField("done"):
                done = event.done
        assert done is not None and done.text == task.raw_output
        assert progress.last == done.completion_tokens  # the resumed stream counted from its replayed start, once
    finally:
        for router in routers:
            router.kill()
            router.wait(10)
        for expert in experts:
            await expert.stop(0)

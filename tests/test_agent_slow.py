"""`slow`: one real agent task on the default model produces a valid, actionable proposal."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.agent import schema
from mesh_llm.agent.loop import Agent, AgentConfig
from mesh_llm.agent.tasks import TaskStore
from mesh_llm.governance import keys
from mesh_llm.governance.core import Governance
from mesh_llm.governance.policy import add_member
from mesh_llm.models.catalog import DEFAULT_MODEL
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.node import RouterConfig
from mesh_llm.testing.agent import governance_folder
from tests.mesh_helpers import local_mesh
from tests.real_model import real_mesh_home  # noqa: F401

pytestmark = pytest.mark.slow
REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
ACTIONABLE = ("set_default_k", "set_selection_policy", "set_step_deadline", "quarantine_expert")


async def test_one_real_task_yields_a_valid_actionable_proposal(real_mesh_home, tmp_path, monkeypatch):  # noqa: F811
    loaded = load(LoadOptions(model=DEFAULT_MODEL, device="cpu"))
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))  # keys and the store stay out of the model cache
    gov_dir = governance_folder(tmp_path / "gov", phase=2, source=REPO_GOV)
    add_member(gov_dir / "members.toml", "agent", keys.new_key("agent"), role="proposer")  # signs the proposals
    db = f"sqlite:///{tmp_path / 'router.db'}"
    config = RouterConfig(port=0, db_url=db, secret="s3cret", governance_dir=gov_dir)
    async with local_mesh([loaded] * 2, tmp_path, config) as mesh:
        gov = Governance.open(db, gov_dir=gov_dir)
        store = TaskStore(gov.engine)
        agent = Agent(config=AgentConfig(router=mesh.router.address, k=2, temperature=0.0), gov=gov, store=store)
        task = store.submit({"type": "scheduler_optimization", "kinds": list(ACTIONABLE),
                             "context": "Users report slow answers; expert round trips vary a lot."}, source="test")
        task = await agent.run_task(store.claim(task.id, subset=None, expert_ids=()))
        assert task.error == "" and task.proposal is not None, task
        online = sorted(e.link.expert_id for e in mesh.experts)
        assert schema.check(agent.schema_for(task, online), task.raw_output) == task.proposal
        assert task.proposal["kind"] in ACTIONABLE and gov.registry.handler(task.proposal["kind"]) is None
        assert mesh.router.governance.registry.handler(task.proposal["kind"]) is not None  # the router can apply it
        assert (task.tier, task.state) == ("deploy_minor", "awaiting_votes")
        assert task.baseline["metric"] == "probe_tokens_per_second" and task.baseline["value"] > 0
        assert len(task.proposal["rationale"]) >= 1 and "Cluster state:" in task.prompt

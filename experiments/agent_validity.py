"""Share of agent tasks whose mesh output is a schema-valid proposal, the share that is also useful, and where
the proposals landed.

Starts a router and N experts in this process (tiny random Llamas by default, or a catalog model),
runs T agent tasks through the router (task types in rotation, constrained decoding on), and
checks every raw output with the agent's own checker (independent of the grammar engine) and every
schema-valid proposal with the usefulness check (it changes something, its free text is not filler or
copied from the prompt, its rationale cites an observed metric) against the cluster state observed
just before the task.

    .venv/bin/python experiments/agent_validity.py                       # tiny random experts
    .venv/bin/python experiments/agent_validity.py --model smollm2-135m --tasks 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mesh_llm.agent import observe, usefulness
from mesh_llm.agent.loop import Agent, AgentConfig
from mesh_llm.agent.schema import OutputProblem, check
from mesh_llm.agent.tasks import ROTATION, TASK_TYPES, TaskStore
from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
from mesh_llm.governance import keys
from mesh_llm.governance.core import Governance
from mesh_llm.governance.policy import add_member
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.node import RouterConfig, start_router
from mesh_llm.testing.agent import governance_folder

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"


def load_models(model: str, experts: int, workdir: Path) -> list:
    """Loaded models, one per expert: distinct tiny random Llamas, or one catalog model shared by all."""
    if model == "tiny":
        from mesh_llm.testing.tiny_model import build_tiny_llama

        return [load(LoadOptions(model=str(build_tiny_llama(workdir / f"tiny{i}", seed=i, context=2048)),
                                 device="cpu")) for i in range(experts)]
    from mesh_llm.models.catalog import resolve
    from mesh_llm.models.fetch import pull
    from mesh_llm.models.loading import checkpoint_for

    entry = resolve(model)
    pull(entry)
    checkpoint_for(entry)
    loaded = load(LoadOptions(model=model, device="cpu"))
    return [loaded] * experts


async def run(args) -> int:
    """Run the tasks and print the validity share and the tier counts."""
    workdir = Path(tempfile.mkdtemp(prefix="agent_validity_"))
    models = load_models(args.model, args.experts, workdir)
    os.environ["MESH_HOME"] = str(workdir / "home")  # keys, tokenizers and the store of this run only
    gov_dir = governance_folder(workdir / "gov", phase=args.phase, source=REPO_GOV)
    add_member(gov_dir / "members.toml", "agent", keys.new_key("agent"), role="proposer")  # signs the proposals
    db = f"sqlite:///{workdir / 'mesh.db'}"
    router = await start_router(RouterConfig(port=0, db_url=db, secret="validity", governance_dir=gov_dir))
    experts = []
    try:
        address, secret = resolve_join(None, router.invite)
        for loaded in models:
            expert = await start_expert(ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0,
                                                     measure_speed=False, router=address, secret=secret), loaded)
            await asyncio.wait_for(expert.link.registered.wait(), 30)
            experts.append(expert)
        gov = Governance.open(db, gov_dir=gov_dir)
        store = TaskStore(gov.engine)
        agent = Agent(config=AgentConfig(router=router.address, k=args.k, temperature=args.temperature,
                                         rationale_max=args.rationale_max), gov=gov, store=store)
        online = sorted(e.link.expert_id for e in experts)
        valid, useful, tiers, states = 0, 0, collections.Counter(), collections.Counter()
        print(f"{args.tasks} tasks, {args.experts} x {args.model}, k={args.k}, phase {args.phase}, "
              f"temperature {args.temperature}")
        for i in range(args.tasks):
            type_name = ROTATION[i % len(ROTATION)]
            task = store.create(type_name, kinds=TASK_TYPES[type_name].kinds, source="agent_validity")
            task = store.claim(task.id, subset=None, expert_ids=())
            snap = await observe.take(router.address, gov, store)
            began = time.perf_counter()
            task = await agent.run_task(task)
            seconds = time.perf_counter() - began
            schema = agent.schema_for(task, online)
            try:
                proposal = check(schema, task.raw_output)
                ok = True
            except OutputProblem as exc:
                ok = False
                print(f"  invalid: {exc}")
            problems = usefulness.problems(proposal, prompt=task.prompt, snap=snap,
                                           free_text=usefulness.free_text_params(schema, proposal["kind"])) \
                if ok else ["not schema-valid"]
            valid += ok
            useful += not problems
            if ok and problems:
                print(f"  no-op: {'; '.join(problems)}")
            tiers[task.tier or "-"] += 1
            states[task.state] += 1
            print(f"#{task.id:<3} {seconds:6.1f}s {'valid  ' if ok else 'INVALID'} {'useful' if not problems else 'no-op ':<6} "
                  f"{task.state:<15} "
                  f"{task.tier or '-':<13} {task.raw_output[:150]}")
        print(f"schema-valid proposals: {valid}/{args.tasks} = {valid / args.tasks:.0%}")
        print(f"useful proposals: {useful}/{args.tasks} = {useful / args.tasks:.0%} (schema-valid and not a no-op)")
        print("tiers: " + ", ".join(f"{k} {v}" for k, v in sorted(tiers.items())))
        print("states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        return 0 if valid == args.tasks else 1
    finally:
        for expert in experts:
            await expert.stop(0)
        await router.stop(0)


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random Llamas) or a catalog name, e.g. smollm2-135m")
    parser.add_argument("--tasks", type=int, default=10, help="agent tasks to run")
    parser.add_argument("--experts", type=int, default=2, help="experts in the mesh")
    parser.add_argument("--k", type=int, default=2, help="experts mixed per token")
    parser.add_argument("--phase", type=int, default=3, help="governance phase (3 allows every tier)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (seeded per task)")
    parser.add_argument("--rationale-max", type=int, default=160, help="longest rationale in characters")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

"""A whole mesh in one process for tests: a router and experts that join it with the invite token."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import torch

from mesh_llm.expert.server import ExpertConfig, RunningExpert, resolve_join, start_expert
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions
from mesh_llm.node import RouterConfig, RunningRouter, start_router
from mesh_llm.pb import router_pb2, router_pb2_grpc


@dataclass
class Mesh:
    router: RunningRouter
    experts: list[RunningExpert]
    stub: router_pb2_grpc.RouterStub

    async def add_expert(self, loaded, **kw) -> RunningExpert:
        """Start an expert for loaded and wait until the router lists it online."""
        router, secret = resolve_join(None, self.router.invite)
        config = ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0, measure_speed=False,
                              router=router, secret=secret, **kw)
        expert = await start_expert(config, loaded)
        await asyncio.wait_for(expert.link.registered.wait(), 10)
        self.experts.append(expert)
        return expert

    async def generate(self, **fields) -> tuple[list[router_pb2.TokenEvent], router_pb2.GenerationDone]:
        """Run one Generate call to the end; return the token events and the final summary."""
        tokens, done = [], None
        async for event in self.stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120):
            if event.HasField("token"):
                tokens.append(event.token)
            else:
                done = event.done
        return tokens, done

    async def generate_killing(self, victim: RunningExpert, after: int, **fields
                               ) -> tuple[list[router_pb2.TokenEvent], router_pb2.GenerationDone]:
        """Like generate, but crash the victim expert (no deregistration) once `after` tokens have arrived."""
        tokens, done = [], None
        async for event in self.stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120):
            if event.HasField("token"):
                tokens.append(event.token)
                if len(tokens) == after:
                    for task in victim.tasks:  # heartbeats stop as in a crash; the router is not told
                        task.cancel()
                    await victim.server.stop(0)
            else:
                done = event.done
        return tokens, done


@contextlib.asynccontextmanager
async def local_mesh(loaded_models, tmp_path, router_config: RouterConfig | None = None, **expert_kw):
    """A router on a temp SQLite file with one expert per loaded model."""
    config = router_config or RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret")
    router = await start_router(config)
    mesh = None
    try:
        async with channel(router.address) as ch:
            mesh = Mesh(router=router, experts=[], stub=router_pb2_grpc.RouterStub(ch))
            for loaded in loaded_models:
                await mesh.add_expert(loaded, **expert_kw)
            yield mesh
    finally:
        for expert in mesh.experts if mesh else []:
            await expert.stop(0)
        await router.stop(0)


def greedy_reference(loaded, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation of prompt_ids by one model, full forward each step (no cache)."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]

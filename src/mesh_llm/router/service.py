"""The Router gRPC servicer: registration, heartbeats, status and streaming generation."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque

import grpc

from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.generation import Generation, GenerationError
from mesh_llm.router.pool import ExpertPool
from mesh_llm.router.registry import ExpertSpec, Registry
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.tokenizers import TokenizerCache

log = logging.getLogger(__name__)


class HaltState:
    """The router's view of the kill switch: an event set while halted, with the reason."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        """Enter the halted state (every generation stops at its next wait)."""
        self.reason = reason
        self.event.set()

    def clear(self) -> None:
        """Leave the halted state."""
        self.reason = ""
        self.event.clear()


class RouterService(router_pb2_grpc.RouterServicer):
    """Serves the Router service over a registry, an expert pool and mesh settings."""

    def __init__(self, *, registry: Registry, settings: MeshSettings, secret: str, halt: HaltState,
                 pool: ExpertPool | None = None, tokenizers: TokenizerCache | None = None,
                 phase: callable = lambda: 1):
        self.registry = registry
        self.settings = settings
        self.secret = secret
        self.halt = halt
        self.pool = pool or ExpertPool()
        self.tokenizers = tokenizers or TokenizerCache()
        self.phase = phase
        self.active: set[asyncio.Task] = set()
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) of finished generations

    async def _check_secret(self, given: str, context) -> None:
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "wrong or missing mesh secret; join with the invite token `mesh router serve` printed")

    async def RegisterExpert(self, request, context):
        await self._check_secret(request.mesh_secret, context)
        if not request.address or not request.info.tokenizer_fingerprint or not request.info.vocab_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "RegisterExpert needs an address and the expert's Info (fingerprint, vocab_size)")
        expert_id = self.registry.register(request.address, ExpertSpec.from_proto(request.info), name=request.name)
        await self.pool.forget(request.address)  # a restarted expert at the same address gets a fresh channel
        return router_pb2.RegisterExpertReply(expert_id=expert_id,
                                              heartbeat_interval_s=self.registry.config.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        await self._check_secret(request.mesh_secret, context)
        known = self.registry.heartbeat(request.expert_id, active_sessions=request.active_sessions,
                                        tokens_per_second=request.tokens_per_second)
        return router_pb2.HeartbeatReply(known=known)

    async def ListExperts(self, request, context):
        return router_pb2.ListExpertsReply(experts=[r.to_proto() for r in self.registry.experts()])

    async def GetRouterStatus(self, request, context):
        s = self.settings
        return router_pb2.RouterStatus(
            experts=[r.to_proto() for r in self.registry.experts()], default_k=s.default_k,
            default_policy=s.default_policy, default_mix=s.default_mix, halted=self.halt.event.is_set(),
            halt_reason=self.halt.reason, recent_tokens_per_second=self.recent_tokens_per_second(),
            active_generations=len(self.active), phase=self.phase())

    def recent_tokens_per_second(self, window_s: float = 60.0) -> float:
        """Tokens generated per second over the last window_s seconds."""
        now = time.monotonic()
        tokens = sum(n for t, n in self._recent if now - t <= window_s)
        return tokens / window_s

    async def Generate(self, request, context):
        if self.halt.event.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"the mesh is halted ({self.halt.reason}); a quorum of `mesh resume` votes lifts it")
        try:
            generation = Generation(request=request, registry=self.registry, pool=self.pool,
                                    tokenizers=self.tokenizers, settings=self.settings, halt=self.halt.event)
            await generation.start()
        except GenerationError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        task = asyncio.current_task()
        self.active.add(task)
        tokens = 0
        try:
            async for event in generation.run():
                tokens += event.HasField("token")
                yield event
        finally:
            self.active.discard(task)
            self._recent.append((time.monotonic(), tokens))

    async def close(self) -> None:
        """Close expert channels."""
        await self.pool.close()

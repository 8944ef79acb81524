"""Sandbox validation: replay the experts' recorded top-k replies on a fixed probe text under a proposed setting.

The experts are asked once per runner (one Step with all_positions over the probe text) and the
replies are kept; a proposal is then judged on the teacher-forced NLL of the probe text under the
mixture the router would form (aggregation.mix with the router's rule and the experts' weights),
with the current and with the proposed setting. Nothing in the live mesh changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_llm.agent.family import Families
from mesh_llm.errors import MeshError
from mesh_llm.grpc_util import channel
from mesh_llm.mixing.aggregation import mix
from mesh_llm.pb import expert_pb2, expert_pb2_grpc, router_pb2
from mesh_llm.wire import SparseDist, decode_topk

log = logging.getLogger(__name__)

PROBE_TEXT = ("The mesh routes every token to a few experts and mixes their answers. A good setting keeps the "
              "answers accurate and fast. The capital of France is Paris, and rivers flow to the sea.")


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    passed: bool  # the proposed setting is not worse than the current one by more than the tolerance
    metric: str  # what was measured
    current: float  # value under the current setting
    proposed: float  # value under the proposed setting
    detail: str  # one line for people and the audit log


@dataclass(frozen=True, kw_only=True)
class ProbeReplies:
    token_ids: tuple[int, ...]  # the probe text's tokens
    dists: dict[str, list[SparseDist]]  # per expert id: the distribution after each probe token
    vocab_size: int  # vocabulary of the family


class Sandbox:
    """Simulates proposals on recorded expert replies (one Step per expert, then cached)."""

    def __init__(self, families: Families, *, probe_text: str = PROBE_TEXT, top_k: int = 64,
                 tolerance: float = 0.01) -> None:
        """Judge on probe_text with top_k entries per expert; pass when NLL rises by at most tolerance."""
        self.families = families
        self.probe_text = probe_text
        self.top_k = top_k
        self.tolerance = tolerance
        self._cache: dict[tuple[str, str], list[SparseDist]] = {}  # (expert id, model id) -> replies

    async def replies(self, experts: Sequence[router_pb2.ExpertStatus]) -> ProbeReplies:
        """The experts' replies on the probe text (one tokenizer family), asked once and cached."""
        families = {e.tokenizer_fingerprint for e in experts}
        if len(families) != 1:
            raise MeshError(f"the sandbox mixes one tokenizer family at a time, got {len(families)}")
        family = await self.families.get(families.pop(), [e.address for e in experts])
        ids = family.tokenizer(self.probe_text).input_ids[: max(family.context_limit - 1, 2)]
        if len(ids) < 2:
            raise MeshError("the probe text is too short to score")
        top_k = min(self.top_k, family.max_top_k or self.top_k)
        missing = [e for e in experts if (e.expert_id, e.model_id) not in self._cache]
        fetched = await asyncio.gather(*(self._step(e.address, ids, top_k, family.vocab_size) for e in missing))
        for expert, dists in zip(missing, fetched):
            self._cache[(expert.expert_id, expert.model_id)] = dists
        return ProbeReplies(token_ids=tuple(ids), vocab_size=family.vocab_size,
                            dists={e.expert_id: self._cache[(e.expert_id, e.model_id)] for e in experts})

    @staticmethod
    async def _step(address: str, ids: list[int], top_k: int, vocab_size: int) -> list[SparseDist]:
        session = f"sandbox-{uuid.uuid4().hex}"
        async with channel(address) as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            reply = await stub.Step(expert_pb2.StepRequest(session_id=session, start_position=0, tokens=ids,
                                                           top_k=top_k, all_positions=True), timeout=60)
            await stub.CloseSession(expert_pb2.CloseSessionRequest(session_id=session), timeout=10)
        if len(reply.distributions) != len(ids):
            raise MeshError(f"expert at {address} sent {len(reply.distributions)} distributions for {len(ids)} tokens")
        return [decode_topk(d, reply.encoding, vocab_size) for d in reply.distributions]

    @staticmethod
    def nll(replies: ProbeReplies, weights: dict[str, float], rule: str = "linear") -> float:
        """Mean teacher-forced NLL (nats/token) of the probe text under the weighted mixture."""
        experts = sorted(replies.dists)
        w = [weights[e] for e in experts]
        if sum(w) <= 0:
            return math.inf  # nothing left to mix: the router could not answer at all
        total = 0.0
        ids = replies.token_ids
        for pos in range(len(ids) - 1):
            mixed = mix([replies.dists[e][pos] for e in experts], vocab_size=replies.vocab_size, weights=w,
                        rule=rule or "linear")
            total -= mixed.logprob_of(ids[pos + 1], replies.vocab_size)
        return total / (len(ids) - 1)

    async def simulate(self, proposal: dict, status: router_pb2.RouterStatus,
                       scope: Sequence[str]) -> SandboxResult:
        """Judge a proposal on the probe replies of the online experts in scope; MeshError if it cannot be simulated."""
        kind = proposal["kind"]
        if kind != "set_expert_weight":
            raise MeshError(f"no sandbox simulation for {kind}; it cannot pass validation")
        target = proposal["target"]
        by_id = {e.expert_id: e for e in status.experts}
        if target not in by_id:
            raise MeshError(f"expert {target} is not in the registry")
        fingerprint = by_id[target].tokenizer_fingerprint
        experts = [e for e in status.experts if e.state == "online" and e.expert_id in set(scope)
                   and e.tokenizer_fingerprint == fingerprint]
        if target not in {e.expert_id for e in experts}:
            experts.append(by_id[target])
        replies = await self.replies(experts)
        current = {e.expert_id: e.weight for e in experts}
        proposed = {**current, target: float(proposal["params"]["weight"])}
        before = self.nll(replies, current, status.default_mix)
        after = self.nll(replies, proposed, status.default_mix)
        passed = after <= before + self.tolerance
        detail = (f"probe NLL over {len(replies.token_ids) - 1} tokens, {len(experts)} expert(s): "
                  f"{before:.4f} nats/token now, {after:.4f} with {target} weight "
                  f"{current[target]:g} -> {proposed[target]:g} (tolerance {self.tolerance:g}): "
                  f"{'pass' if passed else 'fail'}")
        return SandboxResult(passed=passed, metric="probe_nll", current=before, proposed=after, detail=detail)

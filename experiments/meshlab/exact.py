"""Exact scoring through a real mesh: a router and in-process experts on loopback, asked with the Score RPC."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh_llm.expert.server import ExpertConfig, RunningExpert, start_expert
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions
from mesh_llm.node import RouterConfig, RunningRouter, start_router
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.settings import MeshSettings

SECRET = "exact-scoring"


@dataclass(kw_only=True)
class ScoringMesh:
    router: RunningRouter  # the router serving Score
    experts: list[RunningExpert]  # one per loaded model, in the order given
    stub: router_pb2_grpc.RouterStub  # Router stub on loopback

    @property
    def expert_ids(self) -> list[str]:
        """Registry id of each expert, in the order the models were given."""
        return [e.link.expert_id for e in self.experts]

    async def score(self, tokens: Sequence[int], members: Sequence[int],
                    weights: Sequence[float] | None = None) -> tuple[np.ndarray, float]:
        """Exact log-probabilities of tokens[1:] under the linear mix of `members` (uniform by default), and seconds."""
        ids = [self.expert_ids[m] for m in members]
        began = time.perf_counter()
        reply = await self.stub.Score(router_pb2.ScoreRequest(
            token_ids=list(tokens), expert_ids=ids, weights=list(weights) if weights else [1.0] * len(ids)),
            timeout=600)
        return np.array([t.logprob for t in reply.tokens[1:]], dtype=np.float64), time.perf_counter() - began


@contextlib.asynccontextmanager
async def scoring_mesh(loaded_models: Sequence, workdir: Path):
    """A router plus one in-process expert per loaded model, all registered online; yields a ScoringMesh."""
    workdir.mkdir(parents=True, exist_ok=True)
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{workdir / 'router.db'}", secret=SECRET,
                                             settings=MeshSettings(step_deadline_s=120.0)))
    experts: list[RunningExpert] = []
    try:
        for i, loaded in enumerate(loaded_models):
            config = ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0, router=router.address,
                                  secret=SECRET, name=f"x{i}", measure_speed=False)
            experts.append(await start_expert(config, loaded))
            await asyncio.wait_for(experts[-1].link.registered.wait(), 60)
        async with channel(router.address) as ch:
            yield ScoringMesh(router=router, experts=experts, stub=router_pb2_grpc.RouterStub(ch))
    finally:
        for expert in experts:
            await expert.stop(0)
        await router.stop(0)


@dataclass(frozen=True, kw_only=True)
class MeshComparison:
    label: str  # experts mixed, joined by "+"
    members: tuple[int, ...]  # their indices
    text_lp: np.ndarray  # per text token: exact log-probability through the mesh
    answer_lp: list[np.ndarray]  # per (question, choice), flattened: the answer tokens' log-probabilities
    seconds_per_question: list[float]  # wall time of one question's Score calls (its choices at once)


async def score_through_mesh(mesh: ScoringMesh, members: tuple[int, ...], label: str, text_ids: Sequence[int],
                             mc: Sequence[tuple[list[int], list[list[int]]]]) -> MeshComparison:
    """Score the text and every answer of every question with Score (uniform weights over members)."""
    text_lp, _ = await mesh.score(text_ids, members) if len(text_ids) > 1 else (np.zeros(0), 0.0)
    answers: list[np.ndarray] = []
    seconds = []
    for ctx, conts in mc:
        began = time.perf_counter()
        scored = await asyncio.gather(*(mesh.score(ctx + cont, members) for cont in conts))
        seconds.append(time.perf_counter() - began)
        answers += [lp[len(ctx) - 1:] for lp, _ in scored]
    return MeshComparison(label=label, members=members, text_lp=text_lp, answer_lp=answers,
                          seconds_per_question=seconds)


def comparison_row(mesh: MeshComparison, *, inproc_text: np.ndarray, inproc_answers: Sequence[np.ndarray],
                   questions: Sequence, choice_scores) -> dict:
    """One result row: accuracy and NLL through the mesh against in-process full-vocabulary scoring, and the gaps."""
    offsets = np.cumsum([0] + [len(q.choices) for q in questions])
    acc = {"mesh": [0, 0], "inproc": [0, 0]}
    disagree = 0
    for qi, q in enumerate(questions):
        picks = {}
        for name, rows in (("mesh", mesh.answer_lp), ("inproc", inproc_answers)):
            raw, per_char = choice_scores(rows[offsets[qi]:offsets[qi + 1]], q.choices)
            acc[name][0] += raw == q.gold
            acc[name][1] += per_char == q.gold
            picks[name] = (raw, per_char)
        disagree += picks["mesh"] != picks["inproc"]
    deltas = np.concatenate([np.abs(a - b) for a, b in zip(mesh.answer_lp, inproc_answers, strict=True)]
                            + [np.abs(mesh.text_lp - inproc_text)])
    n = max(len(questions), 1)
    return {"kind": "mesh_exact", "experts": mesh.label, "k": len(mesh.members), "questions": len(questions),
            "acc_mesh": acc["mesh"][0] / n, "acc_inproc": acc["inproc"][0] / n,
            "acc_per_char_mesh": acc["mesh"][1] / n, "acc_per_char_inproc": acc["inproc"][1] / n,
            "choice_disagreements": disagree, "text_nll_mesh": float(-np.mean(mesh.text_lp)),
            "text_nll_inproc": float(-np.mean(inproc_text)), "max_abs_dlogprob": float(deltas.max()),
            "mean_abs_dlogprob": float(deltas.mean()), "tokens_compared": int(deltas.size),
            "seconds_per_question": float(np.mean(mesh.seconds_per_question)) if mesh.seconds_per_question else 0.0}

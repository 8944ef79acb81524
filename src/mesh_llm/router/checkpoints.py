"""Generation checkpoints in the store: what a restarted router needs to continue a generation exactly.

A checkpoint holds the request, the tokens so far (with their log-probabilities and the experts
mixed for each), the positions each expert's session holds, and the selection and sampling RNG
states. Resuming with the same session id lets experts that still hold the session roll it back
to the checkpoint (the others are re-filled), so a greedy run goes on as if never interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import Engine, select

from mesh_llm.errors import StatusError
from mesh_llm.pb import router_pb2
from mesh_llm.store.checkpoint_tables import checkpoints
from mesh_llm.store.dialect import upsert

DEFAULT_EVERY = 16  # completion tokens between checkpoints
FINISHED = ("stop", "length", "eos")  # finish reasons after which there is nothing to resume


class ResumeRefused(StatusError):
    """A resume request for a generation that has no checkpoint or already finished."""


@dataclass(kw_only=True)
class Snapshot:
    completion: list[int]  # generated ids so far
    logprobs: list[float]  # log-probability of each under its mixture
    experts: list[list[str]]  # experts mixed for each token
    held: dict[str, int]  # tokens each expert's session holds
    rounds: int  # round trips so far
    drafted: int  # tokens drafted so far
    accepted: int  # drafted tokens accepted so far
    notes: list[str] = field(default_factory=list)  # degradations reported so far
    selection_rng: dict = field(default_factory=dict)  # numpy bit generator state of expert selection
    sampler_rng: dict = field(default_factory=dict)  # numpy bit generator state of token sampling


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    generation_id: str  # the generation's (and its expert sessions') id
    request: router_pb2.GenerateRequest  # as first sent
    snapshot: Snapshot  # state at the last checkpoint
    finish_reason: str  # "" while resumable


class CheckpointStore:
    """Writes and reads generation checkpoints; one row per generation, overwritten every `every` tokens."""

    def __init__(self, engine: Engine, every: int = DEFAULT_EVERY) -> None:
        """Checkpoint every `every` completion tokens (0 turns checkpoints off)."""
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 tokens, got {every}")
        self.engine = engine
        self.every = every

    def due(self, tokens: int, last: int) -> bool:
        """Whether a generation at `tokens` tokens, last checkpointed at `last`, should checkpoint now."""
        return self.every > 0 and tokens - last >= self.every

    def save(self, generation_id: str, request: router_pb2.GenerateRequest, snapshot: Snapshot) -> None:
        """Write (or overwrite) the generation's checkpoint."""
        now = time.time()
        with self.engine.begin() as conn:
            upsert(conn, checkpoints, {"generation_id": generation_id, "request": request.SerializeToString(),
                                       "state": json.dumps(asdict(snapshot)), "tokens": len(snapshot.completion),
                                       "finish_reason": "", "created_at": now, "updated_at": now},
                   ["generation_id"])

    def finish(self, generation_id: str, reason: str) -> None:
        """Mark a checkpointed generation as finished, so it is not resumed."""
        with self.engine.begin() as conn:
            conn.execute(checkpoints.update().where(checkpoints.c.generation_id == generation_id)
                         .values(finish_reason=reason, updated_at=time.time()))

    def load(self, generation_id: str) -> Checkpoint:
        """The generation's last checkpoint; ResumeRefused when there is none or it finished."""
        with self.engine.connect() as conn:
            row = conn.execute(select(checkpoints).where(checkpoints.c.generation_id == generation_id)).first()
        if row is None:
            raise ResumeRefused("NOT_FOUND", f"no checkpoint of generation {generation_id!r} in this router's store; "
                                f"a generation is checkpointed after every {self.every or 'N (now off)'} tokens "
                                "(`mesh router serve --checkpoint-every N`)")
        if row.finish_reason:
            raise ResumeRefused("FAILED_PRECONDITION", f"generation {generation_id} already finished "
                                f"({row.finish_reason}); there is nothing to resume")
        request = router_pb2.GenerateRequest.FromString(row.request)
        return Checkpoint(generation_id=generation_id, request=request, snapshot=Snapshot(**json.loads(row.state)),
                          finish_reason=row.finish_reason)


def restore_rngs(snapshot: Snapshot, *, selection, sampler) -> None:
    """Put the selection and sampling numpy generators back in their checkpointed states."""
    if snapshot.selection_rng:
        selection.bit_generator.state = snapshot.selection_rng
    if snapshot.sampler_rng:
        sampler.bit_generator.state = snapshot.sampler_rng

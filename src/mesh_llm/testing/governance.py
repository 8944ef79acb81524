"""Helpers for tests and benchmarks: a controllable clock and a Governance with in-memory member keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.core import Governance
from mesh_llm.governance.keys import public_key_b64
from mesh_llm.governance.policy import Member, Policy
from mesh_llm.governance.signing import SignedMessage, sign
from mesh_llm.store.db import open_engine

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ManualClock:
    now: float = 1_700_000_000.0  # unix seconds it reports until moved

    def __call__(self) -> float:
        """The current (manual) time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@dataclass(frozen=True, kw_only=True)
class Signers:
    keys: dict[str, Ed25519PrivateKey]  # member name -> private key
    clock: ManualClock | None = None  # time stamped on messages (real time when None)

    def members(self) -> list[Member]:
        """Member entries for these keys."""
        return [Member(name=n, public_key=public_key_b64(k)) for n, k in self.keys.items()]

    def msg(self, name: str, payload: dict) -> SignedMessage:
        """A message signed by member name."""
        if self.clock is None:
            return sign(self.keys[name], name, payload)
        return sign(self.keys[name], name, payload, clock=self.clock)

    def halt(self, name: str, reason: str = "test halt") -> SignedMessage:
        """A signed halt."""
        return self.msg(name, {"action": "halt", "reason": reason})

    def resume(self, name: str) -> SignedMessage:
        """A signed resume vote."""
        return self.msg(name, {"action": "resume"})

    def vote(self, name: str, proposal_id: int, choice: str = "approve") -> SignedMessage:
        """A signed vote."""
        return self.msg(name, {"action": "vote", "proposal_id": proposal_id, "choice": choice})


def make_signers(names: list[str], clock: ManualClock | None = None) -> Signers:
    """Fresh in-memory keys for these member names."""
    return Signers(keys={n: Ed25519PrivateKey.generate() for n in names}, clock=clock)


def open_governance(db_path: Path, policy: Policy, signers: Signers, *, clock=None,
                    registry: ActionRegistry | None = None) -> Governance:
    """Governance over a SQLite file with the signers as members."""
    kwargs = {"clock": clock} if clock is not None else {}
    return Governance(engine=open_engine(f"sqlite:///{db_path}"), policy=policy, members=signers.members(),
                      registry=registry, **kwargs)


def manual_governance(db_path: Path, policy: Policy, names: tuple[str, ...] = ("alice", "bob", "carol"), *,
                      registry: ActionRegistry | None = None) -> tuple[Governance, Signers, ManualClock]:
    """Governance on a manual clock with fresh members `names`, and their signers."""
    clock = ManualClock()
    signers = make_signers(list(names), clock)
    return open_governance(db_path, policy, signers, clock=clock, registry=registry), signers, clock

"""Helpers for agent tests and experiments: a governance folder with members whose keys are under MESH_HOME."""

from __future__ import annotations

import logging
from pathlib import Path

from mesh_llm.governance import keys
from mesh_llm.governance.policy import add_member, governance_dir
from mesh_llm.governance.signing import SignedMessage, sign

log = logging.getLogger(__name__)


def governance_folder(folder: Path, *, phase: int = 2, members: tuple[str, ...] = ("alice", "bob", "carol"),
                      source: Path | None = None) -> Path:
    """Copy policy.toml (from source or the repository's) starting in `phase`; add members with fresh keys."""
    text = ((source or governance_dir()) / "policy.toml").read_text()
    lines = [f"initial_phase = {phase}" if line.startswith("initial_phase") else line for line in text.splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text("\n".join(lines) + "\n")
    (folder / "members.toml").write_text("")
    for name in members:
        add_member(folder / "members.toml", name, keys.new_key(name))
    return folder


def signed_vote(member: str, proposal_id: int, choice: str = "approve") -> SignedMessage:
    """A vote signed with member's key under MESH_HOME/keys."""
    return sign(keys.load_key(member), member, {"action": "vote", "proposal_id": proposal_id, "choice": choice})


def signed_halt(member: str, reason: str = "test halt") -> SignedMessage:
    """A halt signed with member's key under MESH_HOME/keys."""
    return sign(keys.load_key(member), member, {"action": "halt", "reason": reason})

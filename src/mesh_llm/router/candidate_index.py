"""Online experts per tokenizer fingerprint, kept up to date so a bounded sample costs O(sample), not O(experts)."""

from __future__ import annotations

import random


class CandidateIndex:
    """Expert ids grouped by fingerprint, with O(1) add, discard and draw of a random member."""

    def __init__(self) -> None:
        self._members: dict[str, list[str]] = {}  # fingerprint -> ids, in no particular order
        self._where: dict[str, tuple[str, int]] = {}  # id -> (fingerprint, position in its list)

    def add(self, expert_id: str, fingerprint: str) -> None:
        """Index an expert under fingerprint (moving it if it was under another)."""
        if self._where.get(expert_id, ("",))[0] == fingerprint:
            return
        self.discard(expert_id)
        ids = self._members.setdefault(fingerprint, [])
        self._where[expert_id] = (fingerprint, len(ids))
        ids.append(expert_id)

    def discard(self, expert_id: str) -> None:
        """Drop an expert from the index, if it is there."""
        place = self._where.pop(expert_id, None)
        if place is None:
            return
        fingerprint, pos = place
        ids = self._members[fingerprint]
        last = ids.pop()
        if last != expert_id:  # move the last id into the freed slot
            ids[pos] = last
            self._where[last] = (fingerprint, pos)

    def holds(self, expert_id: str, fingerprint: str) -> bool:
        """Whether the expert is indexed under fingerprint."""
        return self._where.get(expert_id, ("",))[0] == fingerprint

    def count(self, fingerprint: str) -> int:
        """How many experts are indexed under fingerprint."""
        return len(self._members.get(fingerprint, ()))

    def sample(self, fingerprint: str, size: int, rng: random.Random) -> list[str]:
        """Up to size distinct ids of the fingerprint, drawn at random."""
        ids = self._members.get(fingerprint, [])
        if len(ids) <= size:
            return list(ids)
        if len(ids) < 4 * size:
            return rng.sample(ids, size)
        return list(dict.fromkeys(rng.choices(ids, k=size)))  # a rare repeat costs one candidate, not a set per draw

"""Disjoint subsets of the online experts, one per parallel agent stream; sticky as experts come and go."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def split(expert_ids: Iterable[str], n: int) -> list[tuple[str, ...]]:
    """n disjoint groups of the ids, deterministic: sorted ids dealt round-robin."""
    if n < 1:
        raise ValueError(f"--subsets must be >= 1, got {n}")
    ordered = sorted(set(expert_ids))
    return [tuple(ordered[i::n]) for i in range(n)]


@dataclass(frozen=True, kw_only=True)
class SubsetView:
    index: int  # subset number, 0-based
    members: tuple[str, ...]  # experts assigned to it
    online: tuple[str, ...]  # of those, online now
    k: int  # experts per token it can mix now (0 = paused)
    degraded: bool  # fewer online experts than the wanted k
    paused: bool  # no online expert: the subset waits


class Subsets:
    """Assignment of experts to n subsets: first a deterministic split, then new experts join the smallest subset.

    An expert keeps its subset for the life of the runner. A subset whose experts go offline runs
    with a smaller k, or pauses; it never takes experts assigned to another subset.
    """

    def __init__(self, n: int, *, k: int) -> None:
        """n subsets, each mixing up to k experts per token."""
        if n < 1 or k < 1:
            raise ValueError(f"subsets and k must be >= 1, got {n} and {k}")
        self.n = n
        self.k = k
        self.assigned: dict[str, int] = {}  # expert id -> subset index

    def update(self, online: Iterable[str]) -> list[SubsetView]:
        """Assign newly seen online experts and return every subset's view of who is online."""
        online = sorted(set(online))
        fresh = [e for e in online if e not in self.assigned]
        if fresh and not self.assigned:
            for index, group in enumerate(split(fresh, self.n)):
                for expert in group:
                    self.assigned[expert] = index
        else:
            for expert in fresh:
                sizes = [sum(1 for s in self.assigned.values() if s == i) for i in range(self.n)]
                self.assigned[expert] = min(range(self.n), key=lambda i: (sizes[i], i))
                log.info("expert %s joins agent subset %d", expert, self.assigned[expert])
        return [self.view(i, online) for i in range(self.n)]

    def view(self, index: int, online: Iterable[str]) -> SubsetView:
        """Subset index as seen with these experts online."""
        members = tuple(sorted(e for e, s in self.assigned.items() if s == index))
        live = tuple(e for e in members if e in set(online))
        k = min(self.k, len(live))
        return SubsetView(index=index, members=members, online=live, k=k, degraded=0 < len(live) < self.k,
                          paused=not live)

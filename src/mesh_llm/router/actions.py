"""Governance action handlers that change a running router's real settings and return their inverse.

Each handler takes (target, params) as governance stores them and returns the params that undo
the change, so a halt (or an automatic rollback) can revert it through the same handler.
"""

from __future__ import annotations

import logging
import math

from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import ActionError
from mesh_llm.mixing.selection import get_policy
from mesh_llm.router.registry import QUARANTINED, Registry
from mesh_llm.router.settings import MeshSettings

log = logging.getLogger(__name__)


class RouterActions:
    """Handlers for the router's built-in action kinds, bound to one router's settings and registry."""

    def __init__(self, *, settings: MeshSettings, registry: Registry) -> None:
        """Act on these (live) settings and this expert registry."""
        self.settings = settings
        self.registry = registry

    def set_default_k(self, _target: str, params: dict) -> dict:
        """Set the default number of experts mixed per token; return the old value."""
        k = params["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ActionError(f"default k must be an integer >= 1, got {k!r}")
        old, self.settings.default_k = self.settings.default_k, k
        log.warning("governance: default_k %d -> %d", old, k)
        return {"k": old}

    def set_selection_policy(self, _target: str, params: dict) -> dict:
        """Set the default selection policy (a name get_policy knows); return the old one."""
        name = params["policy"]
        get_policy(name)  # UnknownPolicy (a ValueError) names the known policies
        old, self.settings.default_policy = self.settings.default_policy, name
        log.warning("governance: default_policy %s -> %s", old, name)
        return {"policy": old}

    def set_expert_weight(self, target: str, params: dict) -> dict:
        """Set one expert's mixing weight (target: expert id); return its old weight."""
        old = self.registry.get(target).weight
        self.registry.set_weight(target, float(params["weight"]))
        log.warning("governance: expert %s weight %s -> %s", target, old, params["weight"])
        return {"weight": old}

    def quarantine_expert(self, target: str, params: dict) -> dict:
        """Quarantine (or release) one expert (target: expert id); return whether it was quarantined."""
        was = self.registry.get(target).state == QUARANTINED
        if params["quarantined"]:
            self.registry.quarantine(target, reason="governance action")
        else:
            self.registry.unquarantine(target)
        return {"quarantined": was}

    def set_step_deadline(self, _target: str, params: dict) -> dict:
        """Set the per-token straggler deadline in seconds; return the old one."""
        seconds = float(params["seconds"])
        if not math.isfinite(seconds) or seconds <= 0:
            raise ActionError(f"step deadline must be a positive number of seconds, got {seconds!r}")
        old, self.settings.step_deadline_s = self.settings.step_deadline_s, seconds
        log.warning("governance: step_deadline_s %s -> %s", old, seconds)
        return {"seconds": old}

    def register(self, actions: ActionRegistry) -> None:
        """Register every handler on a governance action registry (built-in kinds keep their tiers and bounds)."""
        for kind in ("set_default_k", "set_selection_policy", "set_expert_weight", "quarantine_expert",
                     "set_step_deadline"):
            actions.register(kind, getattr(self, kind))


def router_action_registry(*, settings: MeshSettings, registry: Registry) -> ActionRegistry:
    """A governance ActionRegistry with the router's handlers registered."""
    actions = ActionRegistry()
    RouterActions(settings=settings, registry=registry).register(actions)
    return actions

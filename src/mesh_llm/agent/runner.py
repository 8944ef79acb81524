"""`mesh agent run`: one stream of tasks per subset of experts, follow-ups, and a stop within the halt bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from mesh_llm.agent.loop import Agent, AgentConfig
from mesh_llm.agent.progress import Progress
from mesh_llm.agent.subsets import Subsets, SubsetView
from mesh_llm.agent.tasks import QUEUED, ROTATION, TASK_TYPES, WAITING, TaskRecord, TaskStore
from mesh_llm.errors import MeshError
from mesh_llm.governance import keys
from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import KeyStoreError
from mesh_llm.router.client import RouterUnavailable, router_status

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    agent: AgentConfig = field(default_factory=AgentConfig)  # how each task runs
    interval_s: float = 600.0  # each subset starts a new task this often (queued tasks go first, at once)
    subsets: int = 1  # disjoint groups of experts, each running its own task concurrently
    once: bool = False  # one task per subset, one follow-up pass, then return
    poll_s: float = 1.0  # how often queued tasks, follow-ups and the experts are looked at
    halt_poll_s: float = 0.1  # how often the store and the router are asked whether the mesh is halted
    follow_up: bool = True  # move waiting tasks on (reviews, votes, measurement after applying)


@dataclass(kw_only=True)
class RunReport:
    started: list[int] = field(default_factory=list)  # task ids run
    followed: list[int] = field(default_factory=list)  # task ids moved on by follow-ups
    requeued: list[int] = field(default_factory=list)  # interrupted tasks requeued at start
    halted: bool = False  # stopped by a halt
    halt_reason: str = ""  # the halt's reason


class Runner:
    """Runs agent tasks concurrently, one per subset, until stopped, halted, or (once) done."""

    def __init__(self, config: RunnerConfig, *, gov: Governance, store: TaskStore, agent: Agent | None = None,
                 progress: Progress | None = None) -> None:
        """Run with this governance store and task store (the router's database); tasks report to progress."""
        self.config = config
        self.gov = gov
        self.store = store
        self.agent = agent or Agent(config=config.agent, gov=gov, store=store, progress=progress)
        self.subsets = Subsets(config.subsets, k=config.agent.k)
        self.in_flight: dict[int, asyncio.Task] = {}  # subset index -> running task coroutine
        self.report = RunReport()
        self._rotation = 0
        self._last_created: dict[int, float] = {}
        self._paused: set[int] = set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask the runner to stop after cancelling what is in flight."""
        self._stop.set()

    async def run(self) -> RunReport:
        """Recover interrupted tasks, then run until stop(), a halt, or (once) one round; return what happened."""
        self.gov.refresh()
        if self.gov.switch.is_halted:
            raise MeshError(f"the mesh is halted ({self.gov.switch.reason}); the agent does not start until a "
                            "quorum of `mesh resume` votes lifts it")
        self._check_key()
        self.report.requeued = self.store.recover()
        self.store.audit("agent_runner_started", {"subsets": self.config.subsets, "once": self.config.once,
                                                  "requeued": self.report.requeued})
        main = asyncio.create_task(self._main())
        watchers = [asyncio.create_task(self._watch_store()), asyncio.create_task(self._watch_router())]
        try:
            await asyncio.wait({main, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            self.gov.refresh()  # a halt can end the round's generation before a watcher's next poll
            if self.gov.switch.is_halted and not self.report.halted:
                self._halted(self.gov.switch.reason)
        finally:
            for task in (main, *watchers):
                task.cancel()
            await self._cancel_in_flight()
            for task in (main, *watchers):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if main.done() and not main.cancelled() and main.exception() is not None:
                raise main.exception()
        self.store.audit("agent_runner_stopped", {"halted": self.report.halted, "reason": self.report.halt_reason,
                                                  "started": self.report.started})
        return self.report

    def _check_key(self) -> None:
        """Refuse to start without the key that signs proposals; warn when this trust root does not list it."""
        name = self.config.agent.key
        try:
            public = keys.public_key_b64(keys.load_key(name))
        except KeyStoreError as exc:
            raise MeshError(f"the agent signs its proposals with key {name!r}: {exc}; then list it in the router's "
                            f"members.toml with `mesh members add {name} PUBKEY --role proposer`") from None
        if not any(m.name == name and m.public_key == public for m in self.gov.members):
            log.warning("key %r is not in %s: the router refuses the agent's proposals unless its members.toml lists "
                        "it (`mesh members add %s PUBKEY --role proposer`)", name, self.gov.members_path, name)

    async def _watch_store(self) -> None:
        """Return as soon as the store records a halt (by any member, through any process)."""
        while True:
            self.gov.refresh()
            if self.gov.switch.is_halted:
                return self._halted(self.gov.switch.reason)
            await asyncio.sleep(self.config.halt_poll_s)

    async def _watch_router(self) -> None:
        """Return as soon as the router reports itself halted (in case it uses another store)."""
        while True:
            with contextlib.suppress(RouterUnavailable):
                status = await router_status(self.config.agent.router, timeout=2.0)
                if status.halted:
                    return self._halted(status.halt_reason)
            await asyncio.sleep(max(self.config.halt_poll_s, 0.5))

    def _halted(self, reason: str) -> None:
        self.report.halted, self.report.halt_reason = True, reason
        log.warning("mesh halted (%s): the agent stops", reason)

    async def _cancel_in_flight(self) -> None:
        running = [t for t in self.in_flight.values() if not t.done()]
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.in_flight.clear()

    async def _main(self) -> None:
        while not self._stop.is_set():
            try:
                views = await self._subset_views()
            except RouterUnavailable as exc:
                if self.config.once:
                    raise
                log.warning("agent: %s; trying again in %.0f s", exc, self.config.poll_s)
                await asyncio.sleep(self.config.poll_s)
                continue
            for view in views:
                self._start(view)
            if self.config.once:
                if self.in_flight:
                    await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
                if self.config.follow_up:
                    await self._follow_ups()
                return
            if self.config.follow_up:
                await self._follow_ups()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.poll_s)

    async def _subset_views(self) -> list[SubsetView]:
        status = await router_status(self.config.agent.router)
        views = self.subsets.update(e.expert_id for e in status.experts if e.state == "online")
        for view in views:
            if view.paused and view.index not in self._paused:
                self._paused.add(view.index)
                self.store.audit("agent_subset_paused", {"subset": view.index, "members": list(view.members)})
            elif not view.paused and view.index in self._paused:
                self._paused.discard(view.index)
                self.store.audit("agent_subset_resumed", {"subset": view.index, "online": list(view.online)})
        return views

    def _start(self, view: SubsetView) -> None:
        """Start this subset's next task unless one is in flight, it is paused, or none is due."""
        current = self.in_flight.get(view.index)
        if current is not None and not current.done():
            return
        if view.paused:
            return
        task = self._next_task(view)
        if task is None:
            return
        self.report.started.append(task.id)
        if view.degraded:
            self.store.step(task.id, "agent_subset_degraded", {"subset": view.index, "k": view.k,
                                                                "online": list(view.online)})
        self.in_flight[view.index] = asyncio.create_task(self.agent.run_task(task, view), name=f"agent-task-{task.id}")

    def _next_task(self, view: SubsetView) -> TaskRecord | None:
        for queued in self.store.list(states={QUEUED}, oldest_first=True):
            claimed = self.store.claim(queued.id, subset=view.index, expert_ids=view.online)
            if claimed is not None:
                return claimed
        now = time.monotonic()
        last = self._last_created.get(view.index)
        if not self.config.once and last is not None and now - last < self.config.interval_s:
            return None
        self._last_created[view.index] = now
        type_name = ROTATION[self._rotation % len(ROTATION)]
        self._rotation += 1
        created = self.store.create(type_name, kinds=TASK_TYPES[type_name].kinds, source="runner", subset=view.index)
        return self.store.claim(created.id, subset=view.index, expert_ids=view.online)

    async def _follow_ups(self) -> None:
        for task in self.store.list(states=WAITING, oldest_first=True):
            try:
                moved = await self.agent.follow_up(task)
            except (MeshError, RouterUnavailable) as exc:
                log.warning("follow-up of task %d failed: %s", task.id, exc)
                continue
            if moved.state != task.state:
                self.report.followed.append(task.id)

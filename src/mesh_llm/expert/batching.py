"""Continuous batching: concurrent sessions' steps share one forward pass.

Each session keeps its own KV cache. For a batched step the caches are left-padded to the longest
and stacked, the new tokens right-padded to the most any step appends; the attention mask hides
all padding and each row gets its own position ids, so every row computes what it would alone.
Afterwards each session takes back its own positions of the grown cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

log = logging.getLogger(__name__)
GATHER_SHARE = 0.5  # at most this share of the last batch's time is spent waiting for more steps
GATHER_MAX_S = 0.05  # and never longer than this
PAD_LIMIT = 1.25  # steps of different lengths share a pass while padded tokens stay within this factor of real ones


@dataclass(frozen=True, kw_only=True)
class StepCall:
    session_id: str  # caller-chosen session id
    start: int  # position of tokens[0]; below the held length rolls the session back
    tokens: list[int]  # tokens appended
    top_k: int  # entries per distribution
    all_positions: bool = False  # a distribution after every appended token, not only the last
    score_ids: Sequence[int] = ()  # score_ids[j] is scored after tokens[j]
    value_bytes: int = 4  # bytes per log-probability in the reply (4 float32, 2 float16)


@dataclass(frozen=True, kw_only=True)
class PackedCaches:
    cache: object  # DynamicCache of the whole batch, left-padded
    attention_mask: object  # [batch, past + new] tensor, 0 on padding
    position_ids: object  # [batch, new] tensor, each row from its own session length
    pads: list[int]  # left padding of each row


def pack_caches(caches: Sequence, lengths: Sequence[int], counts: Sequence[int], config, device) -> PackedCaches:
    """Stack per-session caches (cache i holds lengths[i] positions, counts[i] tokens come) into one batch cache."""
    import torch
    from transformers import DynamicCache

    longest = max(lengths)
    pads = [longest - n for n in lengths]
    data = None
    if longest:
        template = next(c for c, n in zip(caches, lengths) if n)
        data = []
        for layer in range(len(template.layers)):
            keys, values = [], []
            for cache, pad, n in zip(caches, pads, lengths):
                keys.append(_left_pad(cache.layers[layer].keys if n else None, template.layers[layer].keys, pad))
                values.append(_left_pad(cache.layers[layer].values if n else None, template.layers[layer].values, pad))
            data.append((torch.cat(keys), torch.cat(values)))
    width = max(counts)
    mask = torch.ones(len(lengths), longest + width, dtype=torch.long, device=device)
    for row, (pad, count) in enumerate(zip(pads, counts)):
        mask[row, :pad] = 0
        mask[row, longest + count:] = 0
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(width, device=device)
    return PackedCaches(cache=DynamicCache(ddp_cache_data=data, config=config), attention_mask=mask,
                        position_ids=positions, pads=pads)


def unpack_cache(packed: PackedCaches, row: int, length: int, config):
    """Row `row` of the grown batch cache as a session cache of its own holding `length` positions."""
    from transformers import DynamicCache

    pad = packed.pads[row]
    span = slice(pad, pad + length)
    data = [(layer.keys[row:row + 1, :, span].clone(), layer.values[row:row + 1, :, span].clone())
            for layer in packed.cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def _left_pad(tensor, template, pad: int):
    """tensor ([1, heads, n, dim]) with pad zero positions in front; a missing tensor becomes all padding."""
    import torch

    if tensor is None:
        shape = (1, template.shape[1], pad, template.shape[3])
        return torch.zeros(shape, dtype=template.dtype, device=template.device)
    return torch.nn.functional.pad(tensor, (0, 0, pad, 0)) if pad else tensor


def batch_groups(calls: Sequence[StepCall]) -> list[list[int]]:
    """Indexes of calls that run in one forward pass: similar numbers of appended tokens (padding within PAD_LIMIT)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(calls)), key=lambda i: len(calls[i].tokens)):
        count = len(calls[i].tokens)
        if groups and (len(groups[-1]) + 1) * count <= PAD_LIMIT * (real + count):
            groups[-1].append(i)
            real += count
        else:
            groups.append([i])
            real = count
    return groups


class StepGatherer:
    """Queues Step calls and hands them to run_batch in batches of at most max_batch, one batch at a time.

    Calls arriving while a batch runs form the next one. After a batch, it waits a moment (a small share of
    that batch's time) for the sessions just answered to send their next step, so lock-step clients
    keep sharing one pass instead of splitting into alternating small batches.
    """

    def __init__(self, run_batch: Callable[[list[StepCall]], list], executor: Executor, max_batch: int,
                 on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.run_batch = run_batch  # runs on executor; returns a result or an exception per call
        self.executor = executor
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch  # told each batch's size
        self._pending: list[tuple[StepCall, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_size = 0
        self._last_seconds = 0.0

    async def submit(self, call: StepCall):
        """The engine's result for call once its batch has run; raises the call's error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((call, future))
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._dispatch())
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        """Stop dispatching; calls still queued are cancelled."""
        if self._task is not None:
            self._task.cancel()
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await self._gather_more()
            batch = self._take()
            if not batch:
                continue
            began = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [c for c, _ in batch])
            except Exception as exc:  # the batch as a whole failed: every call in it gets the error
                results = [exc] * len(batch)
            self._last_seconds = time.perf_counter() - began
            self._last_size = len(batch)
            self.on_batch(len(batch))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def _gather_more(self) -> None:
        """Wait briefly while fewer steps are queued than the last batch had (its sessions are about to return)."""
        target = min(self.max_batch, self._last_size)
        deadline = time.perf_counter() + min(GATHER_MAX_S, GATHER_SHARE * self._last_seconds)
        while len(self._pending) < target and (left := deadline - time.perf_counter()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                break

    def _take(self) -> list[tuple[StepCall, asyncio.Future]]:
        """Up to max_batch queued calls in arrival order, at most one per session (a second waits its turn)."""
        batch, rest, sessions = [], [], set()
        for item in self._pending:
            call, future = item
            if future.done():
                continue
            if len(batch) < self.max_batch and call.session_id not in sessions:
                sessions.add(call.session_id)
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

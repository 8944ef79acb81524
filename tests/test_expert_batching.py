"""Continuous batching in the expert: one forward pass for concurrent sessions, results equal to unbatched ones."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mesh_llm.expert.batching import StepCall, StepGatherer
from mesh_llm.expert.engine import StepEngine
from mesh_llm.expert.sessions import SessionLimits
from mesh_llm.pb import expert_pb2
from tests.api_helpers import api_mesh
from tests.expert_helpers import decode_reply, reference_logprobs, running_expert
from tests.test_expert_service import assert_matches

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

PROMPTS = {"a": [5, 17, 42], "b": [9, 8, 7, 6, 5, 4, 3, 2], "c": [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110,
                                                              111, 112], "d": [33]}


def batches_and_steps(service) -> tuple[float, float]:
    """Batches an expert service ran and the Step calls in them, from its batch-size histogram."""
    samples = service.metrics.batch_size.collect()[0].samples
    return tuple(next(s.value for s in samples if s.name.endswith(end)) for end in ("_count", "_sum"))


@contextlib.contextmanager
def forward_batches(model):
    """Batch sizes of the model's forward passes while the block runs (a hook that only records)."""
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def test_sessions_of_different_lengths_share_one_pass_and_match_unbatched(tiny_loaded):
    engine = StepEngine(tiny_loaded, SessionLimits())
    for sid, prompt in PROMPTS.items():
        engine.step(sid, 0, prompt, 8, False)
    nxt = {"a": [11], "b": [12], "c": [13], "d": [14]}
    calls = [StepCall(session_id=sid, start=len(PROMPTS[sid]), tokens=nxt[sid], top_k=16) for sid in PROMPTS]
    with forward_batches(tiny_loaded.model) as sizes:
        results = engine.step_batch(calls)
    assert sizes == [4]
    for call, result in zip(calls, results):
        full = PROMPTS[call.session_id] + call.tokens
        assert result.session_length == len(full)
        assert_matches(result.distributions[0], reference_logprobs(tiny_loaded, full)[-1], 16)
    # the sessions' caches came back correctly: a later batched step still matches
    calls = [StepCall(session_id=sid, start=len(PROMPTS[sid]) + 1, tokens=[20], top_k=16) for sid in PROMPTS]
    for call, result in zip(calls, engine.step_batch(calls)):
        full = PROMPTS[call.session_id] + nxt[call.session_id] + [20]
        assert_matches(result.distributions[0], reference_logprobs(tiny_loaded, full)[-1], 16)


def test_verify_steps_with_rollback_and_scores_batch_together(tiny_loaded):
    engine = StepEngine(tiny_loaded, SessionLimits())
    for sid, prompt in PROMPTS.items():
        engine.step(sid, 0, prompt, 8, False)
    # each session drops its last prompt token and verifies three drafted tokens at every position
    drafts = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9], "d": [10, 11, 12]}
    calls = [StepCall(session_id=sid, start=len(PROMPTS[sid]) - 1, tokens=drafts[sid], top_k=12, all_positions=True,
                      score_ids=[40, 41]) for sid in PROMPTS if sid != "d"]
    calls.append(StepCall(session_id="d", start=0, tokens=drafts["d"], top_k=12, all_positions=True))
    with forward_batches(tiny_loaded.model) as sizes:
        results = engine.step_batch(calls)
    assert sizes == [4]
    for call, result in zip(calls, results):
        full = PROMPTS[call.session_id][:call.start] + call.tokens
        ref = reference_logprobs(tiny_loaded, full)
        assert result.session_length == len(full)
        assert len(result.distributions) == 3
        for j, dist in enumerate(result.distributions):
            assert_matches(dist, ref[call.start + j], 12)
        expected = [ref[call.start + j, sid] for j, sid in enumerate(call.score_ids)]
        np.testing.assert_allclose(result.scores, expected, atol=1e-4)


def test_prefills_and_verify_steps_of_different_lengths_share_one_padded_pass(tiny_loaded):
    engine = StepEngine(tiny_loaded, SessionLimits())
    engine.step("old", 0, PROMPTS["b"], 8, False)
    calls = [StepCall(session_id="x", start=0, tokens=[3, 4, 5, 6, 7, 8], top_k=8),
             StepCall(session_id="y", start=0, tokens=[9, 10, 11, 12, 13, 14, 15], top_k=8, all_positions=True),
             StepCall(session_id="old", start=6, tokens=[21, 22, 23, 24, 25], top_k=8, score_ids=[30, 31])]
    with forward_batches(tiny_loaded.model) as sizes:
        results = engine.step_batch(calls)
    assert sizes == [3]
    fulls = [calls[0].tokens, calls[1].tokens, PROMPTS["b"][:6] + calls[2].tokens]
    for call, result, full in zip(calls, results, fulls):
        ref = reference_logprobs(tiny_loaded, full)
        assert result.session_length == len(full)
        assert_matches(result.distributions[-1], ref[-1], 8)
    for j, dist in enumerate(results[1].distributions):
        assert_matches(dist, reference_logprobs(tiny_loaded, fulls[1])[j], 8)
    ref_old = reference_logprobs(tiny_loaded, fulls[2])
    np.testing.assert_allclose(results[2].scores, [ref_old[6, 30], ref_old[7, 31]], atol=1e-4)
    # the padded positions did not enter the caches: the next decode of every session still matches
    nxt = [StepCall(session_id=c.session_id, start=len(full), tokens=[40], top_k=8) for c, full in zip(calls, fulls)]
    for result, full in zip(engine.step_batch(nxt), fulls):
        assert_matches(result.distributions[0], reference_logprobs(tiny_loaded, full + [40])[-1], 8)


def test_steps_of_very_different_sizes_run_as_separate_passes_and_errors_stay_per_call(tiny_loaded):
    engine = StepEngine(tiny_loaded, SessionLimits())
    engine.step("a", 0, PROMPTS["a"], 8, False)
    calls = [StepCall(session_id="a", start=3, tokens=[50], top_k=8),
             StepCall(session_id="b", start=0, tokens=PROMPTS["b"], top_k=8),
             StepCall(session_id="gap", start=4, tokens=[1], top_k=8),
             StepCall(session_id="c", start=0, tokens=PROMPTS["c"][:8], top_k=8)]
    with forward_batches(tiny_loaded.model) as sizes:
        results = engine.step_batch(calls)
    assert sorted(sizes) == [1, 2]
    assert results[2].code == "NOT_FOUND" and "start_position 0" in str(results[2])
    for i in (0, 1, 3):
        full = (PROMPTS["a"] + [50]) if i == 0 else calls[i].tokens
        assert_matches(results[i].distributions[0], reference_logprobs(tiny_loaded, full)[-1], 8)


async def test_concurrent_grpc_sessions_are_batched_and_match_reference(tiny_loaded):
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded, SessionLimits(max_batch=8)) as (running, stub):
        async def session(sid: str) -> list[int]:
            tokens = list(PROMPTS[sid])
            reply = await stub.Step(expert_pb2.StepRequest(session_id=sid, tokens=tokens, top_k=8))
            for _ in range(4):
                dist = decode_reply(reply, vocab)[0]
                assert_matches(dist, reference_logprobs(tiny_loaded, tokens)[-1], 8)
                tokens.append(int(dist.ids[np.argmax(dist.logprobs)]))
                reply = await stub.Step(expert_pb2.StepRequest(session_id=sid, start_position=len(tokens) - 1,
                                                               tokens=tokens[-1:], top_k=8))
            return tokens

        await asyncio.gather(*(session(sid) for sid in PROMPTS))
        batches, steps = batches_and_steps(running.service)
    assert steps == 4 * 5  # every step ran once
    assert batches < steps, "no two steps shared a forward pass"


async def test_max_batch_one_runs_every_step_alone(tiny_loaded):
    async with running_expert(tiny_loaded, SessionLimits(max_batch=1)) as (running, stub):
        with forward_batches(tiny_loaded.model) as sizes:
            await asyncio.gather(*(stub.Step(expert_pb2.StepRequest(session_id=sid, tokens=prompt[:1], top_k=4))
                                   for sid, prompt in PROMPTS.items()))
    assert sizes == [1, 1, 1, 1]


async def test_a_session_never_appears_twice_in_one_batch(tiny_loaded):
    engine = StepEngine(tiny_loaded, SessionLimits())
    with ThreadPoolExecutor(max_workers=1) as worker:
        gatherer = StepGatherer(engine.step_batch, worker, max_batch=8)
        first, second = await asyncio.gather(
            gatherer.submit(StepCall(session_id="s", start=0, tokens=PROMPTS["b"], top_k=8)),
            gatherer.submit(StepCall(session_id="s", start=8, tokens=[60], top_k=8)))
        gatherer.close()
    assert (first.session_length, second.session_length) == (8, 9)
    assert_matches(second.distributions[0], reference_logprobs(tiny_loaded, PROMPTS["b"] + [60])[-1], 8)


@pytest.mark.parametrize("batched", [False, True])
def test_steps_use_the_cache_argument_not_deprecated_past_key_values(tiny_loaded, batched):
    engine = StepEngine(tiny_loaded, SessionLimits())
    engine.step("a", 0, [1, 2], 4, False)
    engine.step("b", 0, [3], 4, False)
    calls = [StepCall(session_id="a", start=2, tokens=[5], top_k=4)]
    if batched:
        calls.append(StepCall(session_id="b", start=1, tokens=[6], top_k=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = engine.step_batch(calls)
    assert [r.session_length for r in results] == [3, 2][:len(calls)]


async def test_32_concurrent_http_generations_on_3_experts_all_complete_batched(tiny_loaded, tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    load_http = importlib.import_module("load_http")
    async with api_mesh([tiny_loaded] * 3, tmp_path, expert_kw={"limits": SessionLimits(max_batch=8)}) as (mesh, api):
        result = await load_http.load_round(api.base_url, requests=32, max_tokens=8)
        counts = [batches_and_steps(e.service) for e in mesh.experts]
    assert result.errors == [] and result.completed == 32
    assert result.completion_tokens > 32
    assert all(batches > 0 for batches, _ in counts)  # every expert served
    assert sum(b for b, _ in counts) < sum(s for _, s in counts)  # steps of different generations shared passes

"""Exact scoring: Step score_ids against a full forward pass, Score through the router, /v1/completions echo."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mesh_llm.pb import expert_pb2, router_pb2
from tests.expert_helpers import decode_reply, reference_logprobs, running_expert
from tests.real_model import real_mesh_home  # noqa: F401  (fixture)

TOKENS = [5, 17, 42, 99, 3, 250, 7, 11, 12, 13, 14, 200]


async def step(stub, sid, start, tokens, *, k=16, all_positions=False, score_ids=()):
    return await stub.Step(expert_pb2.StepRequest(session_id=sid, start_position=start, tokens=tokens, top_k=k,
                                                  all_positions=all_positions, score_ids=list(score_ids)))


@pytest.mark.parametrize("all_positions", [False, True])
async def test_step_scores_equal_log_softmax_of_a_full_forward_at_every_position(tiny_loaded, all_positions):
    ref = reference_logprobs(tiny_loaded, TOKENS)
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (_, stub):
        got = []
        for start, end in [(0, 5), (5, 9), (9, len(TOKENS))]:  # chunks of one session; the last scores one fewer
            score_ids = TOKENS[start + 1:end + 1]
            reply = await step(stub, "s", start, TOKENS[start:end], all_positions=all_positions, score_ids=score_ids)
            assert len(reply.score_logprobs) == len(score_ids)
            got += list(reply.score_logprobs)
            # the top-k distributions are those of a step without scores (bit for bit when the same rows are
            # computed; with one row the output layer runs over more rows, so float noise only)
            plain = await step(stub, "p", start, TOKENS[start:end], all_positions=all_positions)
            assert len(reply.distributions) == (end - start if all_positions else 1)
            for with_scores, without in zip(decode_reply(reply, vocab), decode_reply(plain, vocab), strict=True):
                np.testing.assert_array_equal(with_scores.ids, without.ids)
                np.testing.assert_allclose(with_scores.logprobs, without.logprobs, atol=0 if all_positions else 1e-5)
        expected = ref[np.arange(len(TOKENS) - 1), TOKENS[1:]]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        # a score id need not be the next token: any id of the vocabulary is scored exactly
        reply = await step(stub, "q", 0, TOKENS[:3], score_ids=[vocab - 1, 0])
        np.testing.assert_allclose(reply.score_logprobs, [ref[0, vocab - 1], ref[1, 0]], atol=1e-5)


@pytest.mark.parametrize("score_ids, words", [
    (list(range(len(TOKENS) + 1)), "at most one per appended token"),
    ([1, 10_000], "outside the vocabulary"),
])
async def test_bad_score_ids_are_refused_and_the_expert_keeps_serving(tiny_loaded, score_ids, words):
    async with running_expert(tiny_loaded) as (running, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "s", 0, TOKENS, score_ids=score_ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert len(running.service.engine.sessions) == 0
        reply = await step(stub, "s", 0, TOKENS, score_ids=TOKENS[1:])
        assert reply.session_length == len(TOKENS) and len(reply.score_logprobs) == len(TOKENS) - 1


async def test_a_reply_over_the_message_limit_is_refused_before_computing(tiny_loaded):
    vocab = tiny_loaded.vocab_size
    async with running_expert(tiny_loaded) as (running, stub):
        engine = running.service.engine
        engine.max_reply_bytes = 100_000
        steps = engine.steps
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await step(stub, "s", 0, list(range(100)), k=vocab, all_positions=True, score_ids=range(1, 100))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fewer tokens per step" in err.value.details() and "smaller top_k" in err.value.details()
        assert engine.steps == steps and len(engine.sessions) == 0  # nothing was computed or kept
        # the same tokens fit with a small top_k, or one distribution
        reply = await step(stub, "s", 0, list(range(100)), k=4, all_positions=True, score_ids=range(1, 100))
        assert len(reply.distributions) == 100 and reply.ByteSize() < engine.reply_bytes(100, 4, 4, 99)
        reply = await step(stub, "t", 0, list(range(100)), k=vocab, score_ids=range(1, 100))
        assert len(reply.distributions) == 1 and len(reply.score_logprobs) == 99


# ---- Score through the router ----


@pytest.fixture(scope="module")
def tiny_loaded_b(tiny_model_dir_b):
    """The seed-1 tiny model (same tokenizer, other weights), loaded like tiny_loaded."""
    from mesh_llm.models.loading import LoadOptions, load

    return load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))


def mixture_reference(models, weights, tokens) -> np.ndarray:
    """(positions, vocab) log of Σ w_i p_i from each model's full forward pass, in float64."""
    rows = np.stack([reference_logprobs(m, tokens).astype(np.float64) for m in models])
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return np.logaddexp.reduce(rows + np.log(w)[:, None, None], axis=0)


async def test_score_of_a_k2_linear_mixture_equals_the_in_process_mixture(tiny_loaded, tiny_loaded_b, tmp_path):
    from tests.mesh_helpers import local_mesh

    vocab = tiny_loaded.vocab_size
    ref = mixture_reference([tiny_loaded, tiny_loaded_b], [0.3, 0.7], TOKENS)  # before the mesh: heartbeats go on
    own = reference_logprobs(tiny_loaded_b, TOKENS)[np.arange(len(TOKENS) - 1), TOKENS[1:]]
    async with local_mesh([tiny_loaded, tiny_loaded_b], tmp_path) as mesh:
        ids = [e.link.expert_id for e in mesh.experts]
        reply = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=TOKENS, expert_ids=ids, weights=[0.3, 0.7],
                                                              top_logprobs=5, top_k=vocab), timeout=60)
        assert [t.token_id for t in reply.tokens] == TOKENS and not reply.tokens[0].HasField("logprob")
        got = np.array([t.logprob for t in reply.tokens[1:]])
        np.testing.assert_allclose(got, ref[np.arange(len(TOKENS) - 1), TOKENS[1:]], atol=1e-5, rtol=0)
        for j, token in enumerate(reply.tokens[1:]):  # every expert listed everything: alternatives are exact
            best = np.argsort(-ref[j], kind="stable")[:5]
            assert [a.token_id for a in token.alternatives] == best.tolist()
            assert all(a.exact for a in token.alternatives)
            np.testing.assert_allclose([a.logprob for a in token.alternatives], ref[j, best], atol=1e-5)
        by_id = {e.expert_id: e for e in reply.experts}
        assert sorted(by_id) == sorted(ids)
        assert by_id[ids[0]].weight == pytest.approx(0.3) and by_id[ids[1]].weight == pytest.approx(0.7)
        np.testing.assert_allclose(by_id[ids[1]].logprobs, own, atol=1e-5)

        # with a small top-k, alternatives not listed by both experts are marked inexact and are lower bounds
        small = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=TOKENS, expert_ids=ids, weights=[0.3, 0.7],
                                                              top_logprobs=4, top_k=4), timeout=60)
        np.testing.assert_allclose([t.logprob for t in small.tokens[1:]], got, atol=1e-6)
        for j, token in enumerate(small.tokens[1:]):
            for a in token.alternatives:
                true = ref[j, a.token_id]
                assert a.logprob == pytest.approx(true, abs=1e-5) if a.exact else a.logprob <= true + 1e-6
        # sessions are closed afterwards
        assert all(len(e.service.engine.sessions) == 0 for e in mesh.experts)


async def test_score_text_gives_token_strings_and_offsets_and_uses_registry_weights(tiny_loaded, tiny_loaded_b,
                                                                                      tmp_path):
    from tests.mesh_helpers import local_mesh

    text = "The capital of France is Paris. Rivers flow to the sea."
    ids = list(tiny_loaded.tokenizer(text).input_ids)
    ref = mixture_reference([tiny_loaded, tiny_loaded_b], [1, 1], ids)  # registry weights are 1
    async with local_mesh([tiny_loaded, tiny_loaded_b], tmp_path) as mesh:
        reply = await mesh.stub.Score(router_pb2.ScoreRequest(prompt=text, k=2, top_logprobs=2), timeout=60)
        assert reply.text == text
        assert [t.token_id for t in reply.tokens] == ids
        offsets = [t.text_offset for t in reply.tokens] + [len(text)]
        assert "".join(text[a:b] for a, b in zip(offsets, offsets[1:])) == text
        assert "".join(t.text for t in reply.tokens) == text
        np.testing.assert_allclose([t.logprob for t in reply.tokens[1:]], ref[np.arange(len(ids) - 1), ids[1:]],
                                   atol=1e-5)
        assert all(len(t.alternatives) == 2 for t in reply.tokens[1:])
        # token ids come back with their decoded text and offsets too
        by_ids = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=ids, k=2), timeout=60)
        assert by_ids.text == text and [t.text_offset for t in by_ids.tokens] == offsets[:-1]
        assert all(not t.alternatives for t in by_ids.tokens)


async def test_score_tokens_in_chunks_survives_an_evicted_session(tiny_loaded, tiny_loaded_b, tmp_path):
    from mesh_llm.router.scoring import score_tokens
    from mesh_llm.router.steps import Target
    from tests.mesh_helpers import local_mesh

    class EvictingStub:
        """Closes the session before the second chunk, as an expert under memory pressure would."""

        def __init__(self, stub):
            self.stub, self.calls = stub, 0

        async def Step(self, request, timeout):
            self.calls += 1
            if request.start_position > 0 and self.calls == 2:
                await self.stub.CloseSession(expert_pb2.CloseSessionRequest(session_id=request.session_id))
            return await self.stub.Step(request, timeout=timeout)

        async def CloseSession(self, request, timeout):
            return await self.stub.CloseSession(request, timeout=timeout)

    ref = mixture_reference([tiny_loaded, tiny_loaded_b], [1, 3], TOKENS)
    async with local_mesh([tiny_loaded, tiny_loaded_b], tmp_path) as mesh:
        pool = mesh.router.service.pool
        targets = [Target(expert_id=e.link.expert_id, stub=pool.stub(e.address), vocab_size=tiny_loaded.vocab_size)
                   for e in mesh.experts]
        whole = await score_tokens(targets, [1, 3], TOKENS, top_logprobs=3)
        evicting = EvictingStub(targets[0].stub)
        targets[0] = Target(expert_id=targets[0].expert_id, stub=evicting, vocab_size=tiny_loaded.vocab_size)
        chunked = await score_tokens(targets, [1, 3], TOKENS, top_logprobs=3, chunk_tokens=5)
        assert evicting.calls == 5  # three chunks, the second one after re-opening the session with its prefix
        np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)
        assert [[a.token_id for a in alts] for alts in chunked.alternatives] == \
            [[a.token_id for a in alts] for alts in whole.alternatives]
        np.testing.assert_allclose(whole.logprobs, ref[np.arange(len(TOKENS) - 1), TOKENS[1:]], atol=1e-5)


@pytest.mark.parametrize("fields, code, words", [
    ({"prompt": "x", "token_ids": [1]}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    ({"token_ids": [1, 100_000]}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"token_ids": [1, 2], "expert_ids": ["nope"]}, grpc.StatusCode.NOT_FOUND, "unknown expert"),
    ({"token_ids": [1, 2], "k": 3}, grpc.StatusCode.INVALID_ARGUMENT, "k=3"),
    ({"token_ids": [1, 2], "top_logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT, "0..20"),
    ({"token_ids": list(range(300))}, grpc.StatusCode.INVALID_ARGUMENT, "context limit"),
    ({"token_ids": [1, 2], "weights": [1.0, 2.0]}, grpc.StatusCode.INVALID_ARGUMENT, "one weight per expert_ids"),
])
async def test_score_refuses_bad_requests_with_what_to_send(tiny_loaded, tmp_path, fields, code, words):
    from tests.mesh_helpers import local_mesh

    async with local_mesh([tiny_loaded, tiny_loaded], tmp_path) as mesh:
        if "weights" in fields:
            fields["expert_ids"] = [e.link.expert_id for e in mesh.experts][:1]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.Score(router_pb2.ScoreRequest(**fields), timeout=60)
        assert err.value.code() == code and words in err.value.details()


async def test_score_names_an_expert_that_fails_and_counts_its_failure(tiny_loaded, tmp_path):
    from tests.mesh_helpers import local_mesh

    async with local_mesh([tiny_loaded, tiny_loaded], tmp_path) as mesh:
        ids = [e.link.expert_id for e in mesh.experts]
        await mesh.experts[1].server.stop(0)  # a crash: its gRPC server is gone, the registry does not know yet
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=TOKENS, expert_ids=ids), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and ids[1] in err.value.details()
        assert mesh.router.registry.get(ids[1]).failures == 1
        assert len(mesh.experts[0].service.engine.sessions) == 0  # the good expert's session was closed


# ---- /v1/completions echo + logprobs (lm-evaluation-harness's loglikelihood request) ----


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness's local-completions backend makes of a reply (its parse_logprobs)."""
    logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))


async def test_completions_echo_logprobs_is_the_exact_score_in_the_shape_lm_eval_parses(tiny_loaded, tiny_loaded_b,
                                                                                         tmp_path):
    import httpx2

    from tests.api_helpers import api_mesh, client

    context = TOKENS[:8]
    continuation = TOKENS[8:]
    ref = mixture_reference([tiny_loaded, tiny_loaded_b], [1, 1], TOKENS)
    picked = list(context)  # a continuation the mixture itself would pick greedily
    for _ in range(3):
        picked.append(int(mixture_reference([tiny_loaded, tiny_loaded_b], [1, 1], picked)[-1].argmax()))
    async with api_mesh([tiny_loaded, tiny_loaded_b], tmp_path) as (mesh, api):
        exact = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=TOKENS, k=2, top_logprobs=1), timeout=60)
        expected = [t.logprob for t in exact.tokens[1:]]
        np.testing.assert_allclose(expected, ref[np.arange(len(TOKENS) - 1), TOKENS[1:]], atol=1e-5)
        # the request lm-eval sends for a loglikelihood: token ids, echo, logprobs 1, max_tokens 1, temperature 0
        payload = {"model": "mesh", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": True}
        async with httpx2.AsyncClient(base_url=api.origin, timeout=60) as http:
            reply = await http.post("/v1/completions", json=payload)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(TOKENS) + 1  # the prompt, then the generated token lm-eval drops
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(TOKENS)] == expected  # the same float64 values as Score
        total, greedy = lm_eval_parse(choice, len(context))
        assert total == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-9)
        argmax = ref[np.arange(len(context) - 1, len(TOKENS) - 1)].argmax(axis=1)
        assert greedy == bool(np.all(argmax == np.array(continuation)))
        assert lp["text_offset"][:len(TOKENS)] == [t.text_offset for t in exact.tokens]
        # a continuation the mixture itself would pick greedily is reported greedy
        async with httpx2.AsyncClient(base_url=api.origin, timeout=60) as http:
            greedy_reply = await http.post("/v1/completions", json={**payload, "prompt": [picked]})
        assert lm_eval_parse(greedy_reply.json()["choices"][0], len(context))[1] is True
        assert choice["text"].startswith(exact.text) and lp["tokens"][:len(TOKENS)] == [t.text for t in exact.tokens]

        # max_tokens 0 through the real openai client: only the prompt, N alternatives plus the chosen token
        c = client(api)
        only = await c.completions.create(model="mesh", prompt=TOKENS, echo=True, logprobs=3, max_tokens=0,
                                          extra_body={"k": 2})
        assert only.choices[0].text == exact.text and only.choices[0].finish_reason == "length"
        got = only.choices[0].logprobs
        assert got.token_logprobs[0] is None and got.token_logprobs[1:] == expected
        assert got.tokens == [t.text for t in exact.tokens] and got.text_offset == [t.text_offset for t in exact.tokens]
        alternatives = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=TOKENS, k=2, top_logprobs=3),
                                             timeout=60)
        for top, token in zip(got.top_logprobs[1:], alternatives.tokens[1:], strict=True):
            listed = [(a.text, a.logprob) for a in token.alternatives] + [(token.text, token.logprob)]
            assert top == {text: value for text, value in reversed(listed)}  # the first of equal texts wins
        assert only.usage.prompt_tokens == len(TOKENS) and only.usage.completion_tokens == 0

        # a text prompt echoes as sent, offsets into it
        text = "The capital of France is Paris."
        plain = await c.completions.create(model="mesh", prompt=text, echo=True, logprobs=0, max_tokens=0)
        offsets = plain.choices[0].logprobs.text_offset
        assert plain.choices[0].text == text and offsets[0] == 0 and offsets == sorted(offsets)
        assert all(len(top) == 1 for top in plain.choices[0].logprobs.top_logprobs[1:])
        # without echo a token-id prompt generates like its text
        ids = list(tiny_loaded.tokenizer(text).input_ids)
        by_ids = await c.completions.create(model="mesh", prompt=ids, max_tokens=4, temperature=0, extra_body={"k": 2})
        by_text = await c.completions.create(model="mesh", prompt=text, max_tokens=4, temperature=0,
                                             extra_body={"k": 2})
        assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("body, words", [
    ({"prompt": "Hi", "logprobs": 2}, "logprobs need echo=true"),
    ({"prompt": "Hi", "echo": True, "logprobs": 2, "stream": True}, "stream=true"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens 0"),
    ({"prompt": "Hi", "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": [[1, 2], [3]], "echo": True}, "one prompt per request"),
    ({"prompt": [1, 100_000], "echo": True, "logprobs": 1, "max_tokens": 0}, "outside the vocabulary"),
])
async def test_completions_echo_refusals_say_what_to_send(tiny_loaded, tmp_path, body, words):
    import httpx2

    from tests.api_helpers import api_mesh

    async with api_mesh([tiny_loaded], tmp_path) as (_, api):
        async with httpx2.AsyncClient(base_url=api.origin, timeout=60) as http:
            reply = await http.post("/v1/completions", json={"model": "mesh", **body})
        assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text


# ---- experiments/quality.py --through-mesh on tiny models ----


def test_quality_through_the_mesh_equals_in_process_full_vocabulary_scoring(tiny_loaded, tiny_loaded_b):
    import importlib
    import sys
    from pathlib import Path

    from mesh_llm.testing.tiny_model import CORPUS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    quality = importlib.import_module("quality")
    from meshlab.data import MCQuestion

    experts = [quality.Expert(label="a", loaded=tiny_loaded, quant="none", dtype="float32"),
               quality.Expert(label="b", loaded=tiny_loaded_b, quant="none", dtype="float32")]
    ids = list(tiny_loaded.tokenizer(CORPUS, add_special_tokens=False).input_ids)[:40]
    questions = [MCQuestion(qid="q1", context="The capital of France is", choices=(" Paris.", " Rome."), gold=0),
                 MCQuestion(qid="q2", context="Rivers flow to the", choices=(" sea.", " dog.", " fox."), gold=0)]
    rows, _ = quality.evaluate(experts, texts={"corpus": ids}, questions=questions, ks=[1, 2], rules=["linear"],
                               top_ks=[8], progress=False, through_mesh=True)
    exact = {r["experts"]: r for r in rows if r["kind"] == "mesh_exact"}
    assert sorted(exact) == ["a", "a+b", "b"]
    full = {r["experts"]: r for r in rows if r["kind"] == "text" and r["top_k"] == "full"}
    for label, r in exact.items():
        assert r["acc_mesh"] == r["acc_inproc"] and r["choice_disagreements"] == 0
        assert r["max_abs_dlogprob"] < 1e-4 and r["tokens_compared"] > len(ids)
        assert r["text_nll_inproc"] == pytest.approx(full[label]["nll"], abs=1e-9)
        assert r["text_nll_mesh"] == pytest.approx(r["text_nll_inproc"], abs=1e-5)
    assert "Exact scoring through the mesh" in quality.markdown_report(rows, [])


# ---- the real default model ----

ARC_STYLE = [
    ("Question: Which gas do plants take in from the air to make their food?\nAnswer:",
     (" carbon dioxide", " oxygen", " helium", " neon"), 0),
    ("Question: What is the capital of France?\nAnswer:", (" Paris", " Berlin", " Madrid", " Rome"), 0),
    ("Question: Water freezes at what temperature in degrees Celsius?\nAnswer:", (" 0", " 50", " 100", " 30"), 0),
]


@pytest.mark.slow
async def test_real_model_scoring_through_the_mesh_equals_in_process_scoring(real_mesh_home, tmp_path):  # noqa: F811
    from mesh_llm.models.catalog import DEFAULT_MODEL
    from mesh_llm.models.loading import LoadOptions, load
    from tests.mesh_helpers import local_mesh

    loaded = load(LoadOptions(model=DEFAULT_MODEL, device="cpu"))
    tok = loaded.tokenizer
    cases = []  # (context length, ids, in-process log_softmax rows), computed before the mesh runs
    for context, choices, _ in ARC_STYLE:
        ctx = list(tok(context, add_special_tokens=False).input_ids)
        for choice in choices:
            ids = ctx + list(tok(choice, add_special_tokens=False).input_ids)
            cases.append((len(ctx), ids, reference_logprobs(loaded, ids).astype(np.float64)))
    worst = 0.0
    sums_mesh, sums_ref = [], []
    async with local_mesh([loaded, loaded], tmp_path) as mesh:
        for n_ctx, ids, ref in cases:
            reply = await mesh.stub.Score(router_pb2.ScoreRequest(token_ids=ids, k=2, top_logprobs=5), timeout=120)
            got = np.array([t.logprob for t in reply.tokens[1:]])
            expected = ref[np.arange(len(ids) - 1), ids[1:]]  # two copies of one model mix to that model
            worst = max(worst, float(np.abs(got - expected).max()))
            for j, token in enumerate(reply.tokens[1:]):  # the top alternative is the model's own most likely
                assert token.alternatives[0].token_id == int(ref[j].argmax()) and token.alternatives[0].exact
            sums_mesh.append(got[n_ctx - 1:].sum())
            sums_ref.append(expected[n_ctx - 1:].sum())
    assert worst < 1e-4, worst
    start = 0
    for _, choices, gold in ARC_STYLE:
        mesh_pick = int(np.argmax(sums_mesh[start:start + len(choices)]))
        assert mesh_pick == int(np.argmax(sums_ref[start:start + len(choices)])) == gold  # the model knows these
        start += len(choices)

"""The agent's proposal schema, its independent checker, and subsets (no mesh needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mesh_llm.agent import schema
from mesh_llm.agent.subsets import Subsets, split
from mesh_llm.agent.tasks import TASK_TYPES
from mesh_llm.governance.tiers import BUILTIN_SPECS, ProposalIn, Tier, classify

EXPERTS = ("e-aaa", "e-bbb")


def _schema(kinds=None, **kw):
    kinds = kinds or [k for k in BUILTIN_SPECS]
    return schema.build([BUILTIN_SPECS[k] for k in kinds], experts=EXPERTS, **kw)


def test_every_task_type_names_only_declared_kinds():
    for task_type in TASK_TYPES.values():
        assert task_type.kinds and set(task_type.kinds) <= set(BUILTIN_SPECS), task_type.name


def test_schema_targets_params_and_length_bound():
    s = _schema(rationale_max=40, text_max=30)
    assert s.targets["set_default_k"] == ("router",)
    assert s.targets["set_expert_weight"] == EXPERTS
    assert s.targets["note"] == ("mesh", "router", *EXPERTS)
    weights = s.params["set_expert_weight"]["weight"].choices
    assert weights[0] == 0.0 and weights[-1] == 4.0 and len(weights) == 17
    deadlines = s.params["set_step_deadline"]["seconds"].choices
    assert min(deadlines) == 0.05 and max(deadlines) == 30.0
    branches = s.schema["anyOf"]
    assert [b["properties"]["kind"]["const"] for b in branches] == list(s.kinds)
    # every admitted value of every declared bound is inside governance's bounds: classify keeps the tier
    for kind, rules in s.params.items():
        for name, rule in rules.items():
            for value in rule.choices or ():
                p = ProposalIn(kind=kind, target=s.targets[kind][0], params={name: value}, rationale="x")
                assert classify(BUILTIN_SPECS[kind], p)[0] == BUILTIN_SPECS[kind].tier


def test_facts_that_leave_no_room_for_a_reason_or_need_escapes_are_dropped():
    long = "e-aaa " + "x" * 30
    s = _schema(rationale_max=40, facts=(*FACTS, long, 'e-aaa said "hi"', FACTS[0]))
    assert s.facts == FACTS
    assert _schema(rationale_max=20, facts=FACTS).facts == ()  # nothing fits: free text as before


def test_expert_kinds_are_dropped_without_experts():
    s = schema.build([BUILTIN_SPECS["set_expert_weight"], BUILTIN_SPECS["note"]], experts=())
    assert s.kinds == ("note",) and "anyOf" not in s.schema


@pytest.mark.parametrize("text, refusal, words", [
    ('{"kind":"set_default_k","target":"router","params":{"k":99},"rationale":"more"}', True, "out of bounds"),
    ('{"kind":"set_expert_weight","target":"e-nope","params":{"weight":1.0},"rationale":"x"}', True, "e-nope"),
    ('{"kind":"rm_rf","target":"router","params":{},"rationale":"x"}', True, "not one this task"),
    ('{"kind":"set_default_k","target":"router","params":{"k":2},"rationale":"quote \\" inside"}', True, "rationale"),
    ('{"kind":"set_default_k","target":"router","params":{"k":2}', False, "not JSON"),
    ('["set_default_k"]', False, "keys"),
])
def test_check_refuses_with_a_reason(text, refusal, words):
    with pytest.raises(schema.OutputProblem) as err:
        schema.check(_schema(), text)
    assert err.value.refusal is refusal and words in str(err.value)


def test_check_accepts_ints_for_float_grid_values():
    s = _schema()
    value = schema.check(s, '{"kind":"set_expert_weight","target":"e-aaa","params":{"weight":4},"rationale":"ok"}')
    assert value["params"]["weight"] == 4


FACTS = ("e-aaa rtt 41.2 ms", "e-bbb 3 failures", "p90 rtt 380.7 ms")


@pytest.mark.parametrize("facts", [(), FACTS])
def test_random_walks_under_the_grammar_always_pass_the_checker(tiny_loaded, facts):
    """Uniformly random allowed tokens (a worst-case model) always make a checkable, bounded proposal."""
    import llguidance
    import llguidance.hf

    tok = tiny_loaded.tokenizer
    ll_tok = llguidance.hf.from_tokenizer(tok)
    s = _schema(rationale_max=40, text_max=40, facts=facts)
    assert s.facts == facts
    grammar = llguidance.LLMatcher.grammar_from_json_schema(s.schema, defaults={"whitespace_flexible": False})
    rng = random.Random(0)
    kinds = set()
    for _ in range(40):
        matcher = llguidance.LLMatcher(ll_tok, grammar)
        out = []
        while not matcher.is_stopped():
            bits = np.unpackbits(np.frombuffer(bytes(matcher.compute_bitmask()), dtype=np.uint8), bitorder="little")
            allowed = np.flatnonzero(bits[: len(tok)])
            token = int(rng.choice(list(allowed)))
            assert matcher.consume_token(token)
            out.append(token)
            assert len(out) <= s.max_chars, "the output bound must hold for any token choice"
        text = tok.decode(out)
        proposal = schema.check(s, text)
        kinds.add(proposal["kind"])
        assert len(text) <= s.max_chars
        if facts:  # a fact, a separator, a space and a reason of its own
            lead = next(f for f in facts if proposal["rationale"].startswith(f))
            assert proposal["rationale"][len(lead)] in ",;:" and len(proposal["rationale"]) >= len(lead) + 14
    assert len(kinds) >= 4  # every branch is reachable


def test_split_is_disjoint_deterministic_and_subsets_stay_sticky():
    ids = [f"e-{i}" for i in range(7)]
    groups = split(reversed(ids), 3)
    assert groups == split(ids, 3)
    assert sorted(sum(map(list, groups), [])) == sorted(ids) and len(set(sum(map(list, groups), []))) == 7
    subsets = Subsets(2, k=2)
    views = subsets.update(["e-a", "e-b", "e-c", "e-d"])
    assert [v.members for v in views] == [("e-a", "e-c"), ("e-b", "e-d")] and all(v.k == 2 for v in views)
    views = subsets.update(["e-a", "e-b", "e-d"])  # e-c went offline: subset 0 degrades, it does not steal
    assert views[0].online == ("e-a",) and views[0].k == 1 and views[0].degraded
    assert views[1].online == ("e-b", "e-d")
    views = subsets.update(["e-b", "e-d"])
    assert views[0].paused and views[0].k == 0 and views[1].k == 2
    views = subsets.update(["e-b", "e-d", "e-e"])  # a newcomer joins the smallest subset
    assert "e-e" in views[0].members and views[0].online == ("e-e",)
    assert json.dumps([v.members for v in views])  # plain data


def test_tiers_of_the_task_kinds_cover_every_gate():
    tiers = {BUILTIN_SPECS[k].tier for t in TASK_TYPES.values() for k in t.kinds}
    assert tiers == set(Tier)

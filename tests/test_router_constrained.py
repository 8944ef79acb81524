"""Grammar-constrained generation and expert allow-lists through a real router."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.mesh_helpers import local_mesh

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["set_default_k", "quarantine_expert", "set_selection_policy"]},
        "k": {"type": "integer", "minimum": 1, "maximum": 4},
        "rationale": {"type": "string", "maxLength": 40},
    },
    "required": ["kind", "k", "rationale"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_random_model_output_is_always_schema_valid(tiny_loaded, tmp_path, temperature):
    async with local_mesh([tiny_loaded] * 2, tmp_path) as mesh:
        for seed in range(3):
            tokens, done = await mesh.generate(prompt="Propose a change:", k=2, max_tokens=120, seed=seed,
                                               temperature=temperature, json_schema=json.dumps(SCHEMA))
            assert done.finish_reason == "stop", done
            value = json.loads(done.text)
            assert set(value) == {"kind", "k", "rationale"}
            assert value["kind"] in SCHEMA["properties"]["kind"]["enum"]
            assert 1 <= value["k"] <= 4 and len(value["rationale"]) <= 40


async def test_bad_schema_and_unknown_expert_ids_are_refused(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded] * 3, tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt="x", json_schema="{not json")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "json_schema" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt="x", expert_ids=["e-nope"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        chosen = [e.link.expert_id for e in mesh.experts[:2]]
        tokens, done = await mesh.generate(prompt="The capital", k=2, max_tokens=6, expert_ids=chosen)
        assert all(set(t.expert_ids) == set(chosen) for t in tokens)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.generate(prompt="x", k=3, expert_ids=chosen)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

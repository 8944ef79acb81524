"""Draft-verify rounds on the real default model: greedy text unchanged, the model drafter's drafts accepted."""

from __future__ import annotations

import pytest

from mesh_llm.models.catalog import DEFAULT_MODEL
from mesh_llm.models.loading import LoadOptions, load
from tests.mesh_helpers import local_mesh
from tests.real_model import real_mesh_home  # noqa: F401

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?",
           "Repeat this list twice: apples, pears, plums, cherries, figs."]


async def test_real_model_drafts_keep_the_greedy_text(real_mesh_home, tmp_path):  # noqa: F811
    loaded = load(LoadOptions(model=DEFAULT_MODEL, device="cpu"))
    texts = {}
    async with local_mesh([loaded, loaded], tmp_path) as mesh:
        for prompt in PROMPTS:
            common = dict(prompt=prompt, chat=True, k=2, max_tokens=32)
            plain, plain_done = await mesh.generate(**common)
            texts[prompt] = plain_done.text
            for draft in ("ngram", f"model:{DEFAULT_MODEL}"):
                tokens, done = await mesh.generate(draft=draft, **common)
                assert [t.token_id for t in tokens] == [t.token_id for t in plain], (prompt, draft)
                assert done.text == plain_done.text
                if draft.startswith("model"):  # the experts' own model as drafter: its drafts are accepted
                    # (how many rounds draft depends on measured costs: a benchmark figure, not a test one)
                    assert done.drafted_tokens > 0 and done.accepted_tokens >= 0.8 * done.drafted_tokens
    assert "Paris" in texts[PROMPTS[0]]

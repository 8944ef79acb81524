"""`mesh demo` on the real default model."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mesh_llm.cli.demo import DemoConfig, run_demo
from tests.real_model import real_mesh_home  # noqa: F401

pytestmark = pytest.mark.slow


async def test_demo_two_experts_k2_answers_paris(real_mesh_home):  # noqa: F811
    out = io.StringIO()
    done = await run_demo(DemoConfig(experts=2, k=2, max_tokens=24), Console(file=out, width=120))
    assert "Paris" in done.text, out.getvalue()
    assert done.finish_reason in ("eos", "length")
    assert "expert-1" in out.getvalue() and "expert-2" in out.getvalue()

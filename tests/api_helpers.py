"""A whole mesh in one process with the HTTP API (OpenAI-compatible /v1, /console, /metrics) beside the router."""

from __future__ import annotations

import contextlib
from pathlib import Path

import openai

from mesh_llm.api import ApiConfig, RunningApi, start_api
from mesh_llm.governance import keys as member_keys
from mesh_llm.governance.policy import add_member
from mesh_llm.node import RouterConfig
from tests.mesh_helpers import local_mesh

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
PROMPT = "The capital of France is"
_CLIENTS: list[openai.AsyncOpenAI] = []  # closed when the api_mesh that made them ends


@contextlib.asynccontextmanager
async def api_mesh(loaded_models, tmp_path, *, router_config: RouterConfig | None = None, **api_kw):
    """local_mesh plus the HTTP API on a free loopback port; yields (mesh, running api)."""
    async with local_mesh(loaded_models, tmp_path, router_config,
                          **api_kw.pop("expert_kw", {})) as mesh:
        api = await start_api(mesh.router, ApiConfig(port=0, **api_kw))
        try:
            yield mesh, api
        finally:
            while _CLIENTS:
                await _CLIENTS.pop().close()
            await api.stop()


def client(api: RunningApi, key: str = "none-needed", **kw) -> openai.AsyncOpenAI:
    """The real openai client pointed at this API over its socket (no retries: errors show at once)."""
    made = openai.AsyncOpenAI(base_url=api.base_url, api_key=key, max_retries=0, timeout=60, **kw)
    _CLIENTS.append(made)
    return made


def governed_config(tmp_path: Path, members: tuple[str, ...] = ("alice", "bob")) -> RouterConfig:
    """A RouterConfig whose governance folder has members with keys in MESH_HOME (so tests can halt)."""
    folder = tmp_path / "governance"
    folder.mkdir()
    (folder / "policy.toml").write_text((REPO_GOV / "policy.toml").read_text())
    for name in members:
        add_member(folder / "members.toml", name, member_keys.new_key(name))
    return RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", governance_dir=folder,
                        governance_poll_s=0.05)

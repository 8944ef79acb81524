"""/console: one self-contained page (no CDN), its status JSON, and /metrics in Prometheus text format."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mesh_llm.api.errors import ApiError
from mesh_llm.api.mesh import model_entries
from mesh_llm.router.client import RouterUnavailable, router_status

pages = APIRouter()  # no key: the page itself holds nothing secret and asks for a key when one is needed
keyed = APIRouter()  # behind the API key when keys are configured


def _context(request: Request):
    return request.app.state.ctx


def console_html() -> str:
    """The console page (HTML with its CSS and JS inline)."""
    return resources.files("mesh_llm.api").joinpath("console.html").read_text(encoding="utf-8")


@pages.get("/console", response_class=HTMLResponse)
async def console_page(request: Request) -> HTMLResponse:
    """The console, when the router was started with --console."""
    if not _context(request).console:
        raise ApiError(404, "the console is off; start the router with `mesh router serve --console`",
                       code="console_off")
    return HTMLResponse(console_html(), headers={"Cache-Control": "no-store"})


@keyed.get("/console/api/status")
async def console_status(request: Request) -> dict:
    """Experts, defaults, phase, halt state and recent tokens/s, read through the router's GetRouterStatus."""
    ctx = _context(request)
    if not ctx.console:
        raise ApiError(404, "the console is off; start the router with `mesh router serve --console`",
                       code="console_off")
    try:
        st = await router_status(ctx.router_address)
    except RouterUnavailable as exc:
        raise ctx.router_error(exc) from None
    experts = [{"expert_id": e.expert_id, "name": e.name or e.expert_id, "model": e.model_id, "device": e.device,
                "quantization": e.quantization, "state": e.state, "rtt_ms": round(e.rtt_ms, 2),
                "failures": e.failures, "weight": e.weight, "tokens_served": e.tokens_served,
                "tokens_per_second": round(e.tokens_per_second, 2), "address": e.address,
                "family": e.tokenizer_fingerprint[:12]} for e in st.experts]
    return {"experts": experts, "k": st.default_k, "policy": st.default_policy, "mix": st.default_mix,
            "phase": st.phase, "halted": st.halted, "halt_reason": st.halt_reason,
            "recent_tokens_per_second": round(st.recent_tokens_per_second, 3),
            "active_generations": st.active_generations, "models": [m["id"] for m in model_entries(ctx)],
            "draft": st.default_draft, "tokens_per_round": round(st.tokens_per_round, 3),
            "draft_acceptance": round(st.draft_acceptance, 3)}


@keyed.get("/metrics")
async def metrics(request: Request) -> Response:
    """The router's metrics in Prometheus text format."""
    return Response(_context(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

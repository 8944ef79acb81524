"""`mesh router serve`, `mesh status`, `mesh generate` and `mesh demo`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import typer
from rich.console import Console

from mesh_llm.cli.errors import friendly_errors

console = Console()
router_app = typer.Typer(help="Run the router: registry, K-of-N selection, mixing and generation.",
                         no_args_is_help=True)
ROUTER_HELP = "Router HOST:PORT (default: $MESH_ROUTER or 127.0.0.1:50050)."


DRAFT_HELP = ("Drafter for multi-token rounds: none (one token per round trip), ngram (prompt lookup, free) or "
              "model:NAME (a small catalog model run in the router, e.g. model:smollm2-135m); the experts verify "
              "every drafted token in one round trip and the output is unchanged.")


def tls_files(cert: Path | None, key: Path | None):
    """The TlsFiles of --tls-cert/--tls-key (None when neither is given); both or neither."""
    from mesh_llm.grpc_util import TlsFiles

    if (cert is None) != (key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together: pass both, or neither for plain TCP")
    if cert is None:
        return None
    for path in (cert, key):
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file; pass the PEM certificate and its private key")
    return TlsFiles(cert=cert, key=key)


def _router(address: str | None) -> str:
    from mesh_llm.router.client import DEFAULT_ROUTER

    return address or os.environ.get("MESH_ROUTER") or DEFAULT_ROUTER


@router_app.command("serve")
def serve(
    port: int = typer.Option(50050, help="Port to listen on (0 picks a free one)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; 0.0.0.0 accepts remote experts."),
    db: str = typer.Option(None, help="SQLAlchemy URL of the store (default: SQLite file under MESH_HOME)."),
    advertise: str = typer.Option(None, help="HOST:PORT put in the invite token (default: the address bound)."),
    k: int = typer.Option(2, help="Default experts mixed per token."),
    policy: str = typer.Option("random", help="Default selection policy: random, capacity, latency, posterior "
                               "(experts that best explain the recent context) or posterior-prompt (the prompt only)."),
    mix: str = typer.Option("linear", help="Default aggregation: linear, geometric or robust (with K >= 3 the "
                            "expert farthest from the others is left out, the rest mixed linearly)."),
    fill: str = typer.Option("spread", help="Default fill for a token missing from an expert's top-k: spread (its "
                             "leftover mass spread over the ids it did not list), zero or floor."),
    spot_check: float = typer.Option(0.05, help="Fraction of rounds whose replies are compared with other experts "
                                     "of the same model; experts that keep disagreeing lose trust and are "
                                     "quarantined."),
    top_k: int = typer.Option(64, help="Default top-k entries asked of each expert."),
    deadline_s: float = typer.Option(10.0, help="Longest wait for one token's expert replies."),
    extra: int = typer.Option(1, help="Default straggler over-selection: ask K+extra experts, mix the first K "
                              "good replies (seeded requests ask exactly K unless they name --extra)."),
    family: str = typer.Option("", help="Tokenizer fingerprint (64 hex digits, as /v1/models shows it) mixed when "
                               "a request names none (default: the family of the first expert checked)."),
    draft: str = typer.Option("none", help="Default " + DRAFT_HELP[0].lower() + DRAFT_HELP[1:]),
    draft_max: int = typer.Option(8, help="Most tokens drafted per round (the draft length adapts within 1..this)."),
    posterior_temperature: float = typer.Option(0.1, help="Policy posterior: nats/token of context likelihood "
                                                "per e-fold of an expert's weight (lower = sharper routing)."),
    posterior_floor: float = typer.Option(0.05, help="Policy posterior: least mixing weight of a selected expert."),
    governance: Path = typer.Option(None, "--governance", help="Governance folder (policy.toml, members.toml) to "
                                    "trust (default: $MESH_GOVERNANCE_DIR, else MESH_HOME/governance)."),
    api_port: int = typer.Option(None, help="Serve the OpenAI-compatible HTTP API (/v1, /metrics) on this port, "
                                 "e.g. 9337 (0 picks a free one; default: off, or 9337 with --console)."),
    api_host: str = typer.Option("127.0.0.1", help="Interface the HTTP API listens on (loopback by default)."),
    api_key: list[str] = typer.Option([], help="API key clients must send as `Authorization: Bearer KEY` "
                                      "(repeatable; keys in MESH_HOME/api_keys count too)."),
    new_api_key: bool = typer.Option(False, help="Make a random API key, add it to MESH_HOME/api_keys and use it."),
    console_page: bool = typer.Option(False, "--console", help="Serve the web console at /console on the API port."),
    grace_s: float = typer.Option(5.0, help="On SIGTERM or Ctrl-C, running generations get this long to finish."),
    tls_cert: Path = typer.Option(None, help="PEM certificate: serve gRPC over TLS (its sha256 goes into the invite "
                                  "token, and joining experts pin it). Needs --tls-key."),
    tls_key: Path = typer.Option(None, help="PEM private key of --tls-cert."),
    checkpoint_every: int = typer.Option(16, help="Save each generation's state in the store every N tokens, so "
                                         "`mesh generate --resume ID` continues it after a restart (0 = off)."),
    max_active: int = typer.Option(0, help="Generations run at once; more wait for a slot (the mesh is busy) "
                                   "(0 = no limit)."),
    credit_priority: bool = typer.Option(False, help="When busy, start waiting clients whose donor key has the most "
                                         "credits first (else first come, first served)."),
    max_prompt_chars: int = typer.Option(1 << 20, help="Longest prompt a generation may send, in characters; longer "
                                         "ones are refused (gRPC INVALID_ARGUMENT, HTTP 400) before any expert works."),
) -> None:
    """Serve the Router service and print the invite token donors pass to `mesh-expert serve --join`."""
    from mesh_llm.cli.expert_cmd import stop_on_signals
    from mesh_llm.node import RouterConfig, start_router
    from mesh_llm.router.credits import CreditPolicy
    from mesh_llm.router.settings import MeshSettings

    settings = MeshSettings(default_k=k, default_policy=policy, default_mix=mix, default_fill=fill,
                            default_top_k=top_k, step_deadline_s=deadline_s, default_draft=draft,
                            default_draft_max=draft_max,
                            posterior_temperature=posterior_temperature, posterior_floor=posterior_floor,
                            default_extra=extra, family=family.strip().lower(), spot_check=spot_check)
    try:
        settings.validate()
    except ValueError as exc:  # a setting no generation could use: say which, without a traceback
        raise typer.BadParameter(str(exc)) from None
    if checkpoint_every < 0 or max_active < 0:
        raise typer.BadParameter("--checkpoint-every and --max-active take 0 (off) or a positive number")
    if max_prompt_chars < 1:
        raise typer.BadParameter(f"--max-prompt-chars must be at least 1, got {max_prompt_chars}")

    async def run() -> None:
        from mesh_llm.api import ApiConfig, client_settings, start_api
        from mesh_llm.api.keys import new_key
        from mesh_llm.api.server import DEFAULT_API_PORT

        keys = (new_key(), *api_key) if new_api_key else tuple(api_key)
        running = await start_router(RouterConfig(host=host, port=port, db_url=db, advertise=advertise,
                                                  settings=settings, governance_dir=governance, api_keys=keys,
                                                  tls=tls_files(tls_cert, tls_key),
                                                  checkpoint_every=checkpoint_every,
                                                  max_prompt_chars=max_prompt_chars,
                                                  credits=CreditPolicy(max_active=max_active,
                                                                       by_credits=credit_priority)))
        api = None
        try:
            stop = stop_on_signals()
            wants_api = api_port is not None or console_page or api_key or new_api_key
            if wants_api:  # both ports are bound before the invite token is printed
                api = await start_api(running, ApiConfig(
                    host=api_host, port=DEFAULT_API_PORT if api_port is None else api_port, keys=keys,
                    console=console_page))
            console.print(f"[bold green]router serving[/bold green] on {host}:{running.port}")
            # plain prints: a token wrapped at the terminal's width breaks when copied
            print(f"invite token: {running.invite}", flush=True)
            print(f"donors run:   mesh-expert serve --model smollm2-135m --join {running.invite}", flush=True)
            console.print(f"clients run:  mesh generate \"Hello\" --router {running.address}", soft_wrap=True)
            if api is not None:
                console.print(f"[bold green]OpenAI-compatible API[/bold green] on {api.base_url}"
                              + ("" if api.context.keys else " (no API key needed)"))
                for line in client_settings(api):
                    console.print("  " + line, highlight=False, soft_wrap=True)
            await stop.wait()
        finally:
            if api is not None:
                await api.stop()
            await running.stop(grace_s)

    with friendly_errors():
        try:
            asyncio.run(run())
        except KeyboardInterrupt:  # a second Ctrl-C during the grace period
            raise typer.Exit(130) from None


def status(router: str = typer.Option(None, help=ROUTER_HELP),
           show_all: bool = typer.Option(False, "--all", help="Also list experts gone longer than the router's "
                                         "retention period.")) -> None:
    """Experts with health and RTT, the defaults (K, policy, mix), phase, halt state and tokens/s."""
    from mesh_llm.cli.display import status_table
    from mesh_llm.router.client import router_status

    with friendly_errors():
        st = asyncio.run(router_status(_router(router), include_gone=show_all))
    halted = f"[red]HALTED[/red] ({st.halt_reason})" if st.halted else "[green]running[/green]"
    console.print(f"mesh {halted} · phase {st.phase} · k={st.default_k} · policy {st.default_policy} · "
                  f"mix {st.default_mix} · {st.recent_tokens_per_second:.2f} tokens/s (last minute) · "
                  f"{st.active_generations} active generation(s)")
    if st.tokens_per_round:
        console.print(f"draft {st.default_draft} · {st.tokens_per_round:.2f} tokens per round trip · "
                      f"{st.draft_acceptance:.0%} of drafted tokens accepted (recent generations)")
    console.print(status_table(st.experts))
    if st.credits:
        shown = " · ".join(f"{c.donor or '(no key)'} {c.credits}" for c in st.credits[:5])
        console.print(f"credits by donor: {shown}" + (" · ..." if len(st.credits) > 5 else ""))


def generate(
    prompt: str = typer.Argument("", help="The prompt (sent through the chat template unless --raw); none with "
                                 "--resume."),
    k: int = typer.Option(0, help="Experts mixed per token (0: router default)."),
    policy: str = typer.Option("", help="random, capacity, latency, posterior or posterior-prompt "
                               "(default: router's)."),
    mix: str = typer.Option("", help="linear, geometric or robust (default: router's)."),
    top_k: int = typer.Option(0, "--top-k", help="Entries asked of each expert (0: router default)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    sample_top_k: int = typer.Option(0, help="Sample among this many most likely tokens (0 = off)."),
    seed: int = typer.Option(None, help="Seed for selection and sampling (reproducible runs)."),
    max_tokens: int = typer.Option(128, help="Completion cap."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    extra: int = typer.Option(None, help="Over-select this many stragglers (ask K+extra, use the first K; "
                              "default: the router's, 0 with --seed)."),
    draft: str = typer.Option("", help=DRAFT_HELP + " Default: the router's."),
    draft_max: int = typer.Option(0, help="Most tokens drafted per round, 1..16 (0: router default)."),
    raw: bool = typer.Option(False, help="Send the prompt as is, without the chat template."),
    router: str = typer.Option(None, help=ROUTER_HELP),
    resume: str = typer.Option("", help="Continue generation ID from its last checkpoint (after a router restart); "
                               "the prompt and other options are those of the first run."),
    donor_key: str = typer.Option("", envvar="MESH_DONOR_KEY", help="Your donor key (the expert key your experts "
                                  "register with): a router started with --credit-priority serves you by credits."),
) -> None:
    """Generate through the mesh, streaming tokens coloured by the experts that produced them."""
    from mesh_llm.cli.display import StreamPrinter, print_stream
    from mesh_llm.pb import router_pb2
    from mesh_llm.router.client import router_status, stream_generate

    address = _router(router)
    fields = dict(prompt=prompt, k=k, policy=policy, mix=mix, top_k=top_k, temperature=temperature, top_p=top_p,
                  sample_top_k=sample_top_k, max_tokens=max_tokens, stop=stop, chat=not raw,
                  draft=draft, draft_max=draft_max)
    if seed is not None:
        fields["seed"] = seed
    if extra is not None:
        fields["extra"] = extra
    request = router_pb2.GenerateRequest(**fields, donor_key=donor_key)
    if resume:
        request = router_pb2.GenerateRequest(resume_id=resume, donor_key=donor_key)
    elif not prompt:
        raise typer.BadParameter("give a prompt, or --resume ID to continue a generation")

    async def announced(events):
        async for event in events:
            if event.HasField("token") and event.token.generation_id:
                Console(stderr=True).print(f"[dim]generation {event.token.generation_id} (after a router restart: "
                                           f"mesh generate --resume {event.token.generation_id})[/dim]")
            yield event

    async def run():
        names = {e.expert_id: e.name for e in (await router_status(address)).experts}
        printer = StreamPrinter(console, names)
        return await print_stream(printer, announced(stream_generate(address, request)))

    with friendly_errors():
        done = asyncio.run(run())
    if done.finish_reason in ("error", "halted"):
        raise typer.Exit(2)


def demo(
    prompt: str = typer.Argument("What is the capital of France?", help="Question to ask the mesh."),
    experts: int = typer.Option(3, help="Expert processes to start."),
    k: int = typer.Option(2, help="Experts mixed per token."),
    model: str = typer.Option("smollm2-135m", help="Model every expert serves (pulled if missing)."),
    prompt_option: str = typer.Option(None, "--prompt", help="The question, as an option (the argument wins).",
                                      hidden=True),
    max_tokens: int = typer.Option(48, help="Completion cap."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int = typer.Option(1, help="Seed for selection and sampling."),
    policy: str = typer.Option("random", help="Selection policy."),
    mix: str = typer.Option("linear", help="Aggregation rule."),
    quants: str = typer.Option("none", help="Comma-separated quantisation per expert, cycled (e.g. none,nf4)."),
) -> None:
    """Start a router and N local experts on the default model and stream an answer with its contributors."""
    from mesh_llm.cli.demo import DemoConfig, run_demo

    if prompt_option is not None and prompt == DemoConfig.prompt:
        prompt = prompt_option
    config = DemoConfig(model=model, experts=experts, k=k, prompt=prompt, max_tokens=max_tokens,
                        temperature=temperature, seed=seed, policy=policy, mix=mix,
                        quants=tuple(q.strip() for q in quants.split(",") if q.strip()))
    with friendly_errors():
        done = asyncio.run(run_demo(config, console))
    if done.finish_reason in ("error", "halted"):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add the router group and the status, generate and demo commands."""
    app.add_typer(router_app, name="router")
    app.command("status")(status)
    app.command("generate")(generate)
    app.command("demo")(demo)

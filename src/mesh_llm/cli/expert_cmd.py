"""The `mesh-expert` command: a donor's node."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import typer

from mesh_llm.cli import logs
from mesh_llm.cli.errors import friendly_errors

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
app = typer.Typer(help="Run an expert node: a complete language model behind the mesh's gRPC service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail.")) -> None:
    """mesh-expert: donate a GPU (or CPU) to the mesh."""
    logs.configure(verbose)


class StopSignal(asyncio.Event):
    """Set by the first SIGTERM or SIGINT; `at` is when it came (time.monotonic())."""

    at: float | None = None


def stop_on_signals() -> StopSignal:
    """An event set by the first SIGTERM or SIGINT (even one a parent shell ignores); a second one acts at once."""
    loop = asyncio.get_running_loop()
    stop = StopSignal()

    def first(sig: signal.Signals) -> None:
        stop.at = time.monotonic()
        log.info("%s: stopping gracefully (send it again to stop at once)", sig.name)
        for s in STOP_SIGNALS:  # back to the defaults: a second signal ends the process
            loop.remove_signal_handler(s)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, first, sig)
    return stop


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Catalog name, .gguf file or checkpoint folder."),
    port: int = typer.Option(None, help="Port to listen on (default: a free one when joining a router, which is "
                             "told the address; 50051 otherwise; 0 always picks a free one)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback by default); for a remote router "
                             "pass 0.0.0.0 or this machine's address, with --advertise."),
    quant: str = typer.Option("none", help="none, or nf4 (4-bit through bitsandbytes)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    router: str = typer.Option(None, help="HOST:PORT of a router to register with."),
    join: str = typer.Option(None, help="Invite token printed by `mesh router serve` (address, secret and TLS pin)."),
    advertise: str = typer.Option(None, help="HOST:PORT the router dials (default: 127.0.0.1:PORT on loopback, else "
                                  "this machine's address toward the router); set it behind NAT or port forwarding."),
    name: str = typer.Option("", help="A label for this expert in `mesh status`."),
    max_sessions: int = typer.Option(64, help="Generation sessions held at once."),
    max_cache_mb: int = typer.Option(2048, help="KV-cache memory over all sessions, in MiB."),
    idle_s: float = typer.Option(300.0, help="Drop a session unused for this many seconds."),
    max_batch: int = typer.Option(8, min=1, help="Run up to this many concurrent sessions' steps in one forward "
                                  "pass (1: one step at a time)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    delay_ms: float = typer.Option(0.0, help="Emulated network latency added to every Step reply (experiments)."),
    metrics_port: int = typer.Option(0, help="Serve Prometheus /metrics on this port, on --host (0 = off)."),
    pull: bool = typer.Option(True, help="Fetch a catalog model missing from MESH_HOME first (--no-pull: fail "
                              "and name the `mesh models pull` command instead)."),
    grace_s: float = typer.Option(5.0, help="On SIGTERM or Ctrl-C, Step calls already running get this long."),
    tls_cert: Path = typer.Option(None, help="PEM certificate: serve over TLS (the router pins its sha256). "
                                  "Needs --tls-key."),
    tls_key: Path = typer.Option(None, help="PEM private key of --tls-cert."),
) -> None:
    """Load a model and serve Step/Info over gRPC; with --join, register with a router and heartbeat."""
    from mesh_llm.cli.router_cmd import tls_files
    from mesh_llm.expert.server import DEFAULT_PORT, ExpertConfig, resolve_invite, serve_forever
    from mesh_llm.expert.sessions import SessionLimits
    from mesh_llm.models.loading import LoadOptions

    with friendly_errors():
        if threads:
            import torch

            torch.set_num_threads(threads)
        invite = resolve_invite(router, join)
        router_addr = invite.router or None
        config = ExpertConfig(
            load=LoadOptions(model=model, quant=quant, dtype=dtype, device=device), host=host,
            port=port if port is not None else 0 if router_addr else DEFAULT_PORT,
            limits=SessionLimits(max_sessions=max_sessions, max_bytes=max_cache_mb << 20, idle_s=idle_s,
                                 max_batch=max_batch),
            router=router_addr, secret=invite.secret, router_pin=invite.fingerprint, tls=tls_files(tls_cert, tls_key),
            advertise=advertise, name=name, delay_ms=delay_ms,
            metrics_port=metrics_port or None, pull=pull, grace_s=grace_s,
        )

        signals: list[StopSignal] = []

        def stop_when() -> StopSignal:
            signals.append(stop_on_signals())
            return signals[0]

        try:  # signals keep their default effect while the model loads: nothing to clean up yet
            asyncio.run(serve_forever(config, stop_when, announce=_announce))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if signals and signals[0].at is not None:
            leave_busy_threads(signals[0].at + grace_s)


def leave_busy_threads(deadline: float) -> None:
    """Wait until deadline (monotonic) for threads still busy, e.g. a model step; then exit 0 without them."""
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("thread %s still busy when the grace period ended: exiting without waiting for it",
                        thread.name)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)


def _announce(running) -> None:
    where = f" and registers with router {running.link.router} as {running.link.advertise}" if running.link else ""
    print(f"expert serving on port {running.port}{where}", flush=True)


if __name__ == "__main__":
    app()

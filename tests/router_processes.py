"""Real `mesh router serve` processes for tests: started on a store, their invite tokens read from stdout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from contextlib import asynccontextmanager

from tests.test_resume import _free_port


@asynccontextmanager
async def router_processes(n: int, store_url: str, mesh_home, *extra: str):
    """Yield (addresses, invite tokens) of n routers serving on one store; kill them on exit."""
    procs, addresses, invites = [], [], []
    try:
        for _ in range(n):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", str(port), "--db", store_url,
                 *extra], env=dict(os.environ, MESH_HOME=str(mesh_home)), stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True))
            addresses.append(f"127.0.0.1:{port}")
            line = ""
            while not line.startswith("invite token: "):
                line = await asyncio.wait_for(asyncio.to_thread(procs[-1].stdout.readline), 120)
                assert line, "a router exited before printing its invite token"
            invites.append(line.split()[-1])
        yield addresses, invites
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)

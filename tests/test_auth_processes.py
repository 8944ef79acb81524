"""Real `mesh-expert serve` and `mesh router serve` processes: loopback by default, clear ends on refusal or busy ports."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from mesh_llm.invite import Invite, decode_invite, encode_invite
from mesh_llm.node import RouterConfig, start_router

EXIT_TIMEOUT_S = 120  # model load plus three refused registrations on a loaded 2-core machine


def _outbound_ip() -> str | None:
    """This machine's non-loopback address, or None when it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 9))
            ip = probe.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _expert(tiny_model_dir, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", str(tiny_model_dir),
                             "--no-pull", "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=os.environ.copy())


async def test_an_expert_with_a_wrong_secret_exits_with_the_reason(tiny_model_dir, tmp_path):
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'r.db'}", secret="s3cret"))
    try:
        wrong = encode_invite(Invite(router=decode_invite(router.invite).router, secret="not-the-secret"))
        proc = _expert(tiny_model_dir, "--join", wrong)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=EXIT_TIMEOUT_S)
    finally:
        await router.stop(0)
    assert proc.returncode not in (0, None), out
    assert "refused this expert 3 times" in out and "mesh secret" in out and "--join" in out


def test_an_expert_listens_on_loopback_unless_told_otherwise(tiny_model_dir):
    ip = _outbound_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to probe")
    proc = _expert(tiny_model_dir, "--port", "0")
    try:
        line = ""
        while "expert serving on port" not in line:
            line = proc.stdout.readline()
            assert line, "the expert ended before serving"
        port = int(line.split("port")[1].split()[0])
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_router_serve_checks_the_api_port_before_printing_the_invite(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        api_port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", "0",
                               "--db", f"sqlite:///{tmp_path / 'r.db'}", "--api-port", str(api_port)],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode != 0
    assert "invite token" not in done.stdout
    assert f"{api_port}" in done.stdout + done.stderr and "--api-port" in done.stdout + done.stderr

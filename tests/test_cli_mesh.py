"""The command line against real processes: router serve, expert serve --join, status and generate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.real_model import free_port


def run_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh_llm.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_router_expert_status_generate_processes(tiny_model_dir, mesh_home):
    env = dict(os.environ, MESH_HOME=str(mesh_home), COLUMNS="200")
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    expert = None
    try:
        invite = None
        for line in router.stdout:
            if m := re.search(r"invite token: (\S+)", line):
                invite = m.group(1)
                break
        assert invite and invite.startswith("mesh1_")
        expert = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model",
                                   str(tiny_model_dir), "--port", "0", "--host", "127.0.0.1", "--join", invite,
                                   "--name", "tiny-donor"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        address = f"127.0.0.1:{port}"
        for _ in range(120):
            status = run_cli("status", "--router", address, env=env)
            if "tiny-donor" in status.stdout and "online" in status.stdout:
                break
            time.sleep(0.5)
        assert "tiny-donor" in status.stdout and "online" in status.stdout, status.stdout + status.stderr
        gen = run_cli("generate", "The capital of France is", "--router", address, "--max-tokens", "5",
                      "--k", "1", "--raw", env=env)
        assert gen.returncode == 0, gen.stderr
        assert "finish: " in gen.stdout and "tiny-donor" in gen.stdout
        bad = run_cli("generate", "hello", "--router", address, "--k", "3", env=env)
        assert bad.returncode == 1 and "k=3" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for proc in (expert, router):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)


def test_status_without_router_says_how_to_start_one(mesh_home):
    env = dict(os.environ, MESH_HOME=str(mesh_home))
    result = run_cli("status", "--router", f"127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 1 and "mesh router serve" in result.stderr

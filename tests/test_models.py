"""Catalog, file checks, conversion cache, fingerprints and loading options."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mesh_llm.cli.main import app
from mesh_llm.models.catalog import DEFAULT_MODEL, UnknownModel, resolve, user_catalog_path
from mesh_llm.models.checks import ModelFileError, check_checkpoint
from mesh_llm.models.fetch import locate
from mesh_llm.models.loading import LoadError, LoadOptions, load
from mesh_llm.testing.tiny_model import build_tiny_llama


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModel) as err:
        resolve("no-such-model")
    assert DEFAULT_MODEL in str(err.value) and "mesh models list" in str(err.value)


def test_missing_and_truncated_default_model_name_the_fix(mesh_home):
    entry = resolve(DEFAULT_MODEL)
    with pytest.raises(ModelFileError) as err:
        locate(entry)
    assert "missing" in str(err.value) and f"mesh models pull {DEFAULT_MODEL}" in str(err.value)
    entry.folder.mkdir(parents=True)
    entry.download_path.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelFileError) as err:
        locate(entry)
    assert "truncated (104 of 98362432 bytes)" in str(err.value)


def test_truncated_weights_and_missing_shard_are_reported_by_name(tiny_model_dir, tmp_path):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError) as err:
        check_checkpoint(broken, "fix it")
    assert "model.safetensors is truncated" in str(err.value)
    sharded = shutil.copytree(tiny_model_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError) as err:
        load(LoadOptions(model=str(sharded), device="cpu"))
    assert "shard model-00002-of-00002.safetensors" in str(err.value) and "2 shards" in str(err.value)


def test_user_catalog_entries_and_bad_entries(mesh_home, tiny_model_dir):
    user_catalog_path().write_text(f'[models.tiny]\npath = "{tiny_model_dir}"\ndescription = "test"\n')
    assert resolve("tiny").source.path == tiny_model_dir
    user_catalog_path().write_text('[models.bad]\ndescription = "neither path nor repo"\n')
    with pytest.raises(Exception) as err:
        resolve("bad")
    assert "exactly one of path= or hf_repo=" in str(err.value)


def test_fingerprint_equal_for_same_tokenizer_and_differs_otherwise(tiny_loaded, tiny_model_dir_b, tmp_path):
    same = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    assert same.fingerprint == tiny_loaded.fingerprint
    other = load(LoadOptions(model=str(build_tiny_llama(tmp_path / "v", vocab_size=300)), device="cpu"))
    assert other.fingerprint != tiny_loaded.fingerprint


def test_bfloat16_and_nf4_load_through_the_same_path(tiny_model_dir):
    bf16 = load(LoadOptions(model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    assert next(bf16.model.parameters()).dtype.__str__() == "torch.bfloat16"
    assert bf16.kv_bytes_per_token * 2 == load(LoadOptions(model=str(tiny_model_dir), device="cpu")).kv_bytes_per_token
    nf4 = load(LoadOptions(model=str(tiny_model_dir), quant="nf4", device="cpu"))
    assert nf4.quantization == "nf4"
    assert any("4bit" in type(m).__name__ for m in nf4.model.modules())


def test_bad_load_options_are_refused(tiny_model_dir):
    with pytest.raises(LoadError, match="unknown quantisation"):
        load(LoadOptions(model=str(tiny_model_dir), quant="int3"))
    with pytest.raises(LoadError, match="unknown dtype"):
        load(LoadOptions(model=str(tiny_model_dir), dtype="float8"))
    with pytest.raises(LoadError, match="no CUDA device|unknown device"):
        load(LoadOptions(model=str(tiny_model_dir), device="cuda"))


def test_cli_models_list_and_verify_errors(mesh_home):
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and DEFAULT_MODEL in listed.output
    verify = runner.invoke(app, ["models", "verify", DEFAULT_MODEL])
    assert verify.exit_code == 1
    assert "missing" in verify.output and "Traceback" not in verify.output

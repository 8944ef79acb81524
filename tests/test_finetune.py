"""Domain-expert fine-tuning: training, exact resume, file-disjoint splits, catalog registration, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mesh_llm.models.catalog import all_entries, user_catalog_path
from mesh_llm.models.corpora import CorpusError, SplitConfig, path_spec, prepare_corpus
from mesh_llm.models.finetune import ExpertJob, TrainConfig, TrainError, finetune_expert, mean_nll, train
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.testing.tiny_model import CORPUS, build_tiny_llama

SENTENCES = [s.strip() + "." for s in CORPUS.split(".") if len(s.strip()) > 10]
TINY_TRAIN = TrainConfig(steps=3, seq_len=32, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                         train_layers=0)
TINY_SPLIT = SplitConfig(seed=0, heldout_tokens=150, max_train_tokens=5000, heldout_text_tokens=100)


def write_corpus(folder: Path, files: int = 10, seed: int = 0) -> Path:
    """Text files of shuffled sentences, each file distinct, paragraphs separated by blank lines."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(4)) + f" Note {i}-{p}." for p in range(6)]
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below root with its content (missing root: nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def job(corpus: Path, base: Path, **kw) -> ExpertJob:
    """A few-step expert job on a tiny model."""
    fields = dict(name="tiny-expert", corpus=str(corpus), base=str(base), tokenizer=str(base), train=TINY_TRAIN,
                  split=TINY_SPLIT, progress=False, eval_tokens=64)
    return ExpertJob(**{**fields, **kw})


@pytest.fixture
def tiny_train_ids(tiny_loaded) -> np.ndarray:
    """Token ids of a small repetitive training text."""
    text = " ".join(SENTENCES * 6)
    return np.array(tiny_loaded.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def fresh(model_dir: Path):
    """A newly loaded copy of a tiny model (training changes weights in place)."""
    return load(LoadOptions(model=str(model_dir), device="cpu"))


def test_loss_decreases_on_training_text(tiny_model_dir, tiny_train_ids, tmp_path):
    loaded = fresh(tiny_model_dir)
    before = mean_nll(loaded.model, tiny_train_ids, seq_len=64)
    config = TrainConfig(steps=30, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=3, checkpoint_every=100,
                         train_layers=0)
    result = train(loaded.model, tiny_train_ids, config, tmp_path / "run", progress=False)
    after = mean_nll(loaded.model, tiny_train_ids, seq_len=64)
    assert result.steps == 30 and len(result.losses) == 30
    assert after < before - 0.5, (before, after)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])


def test_last_layers_only_leaves_the_rest_untouched(tiny_model_dir, tiny_train_ids, tmp_path):
    loaded = fresh(tiny_model_dir)
    start = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    config = TrainConfig(steps=3, seq_len=32, batch_size=2, lr=1e-2, warmup_steps=1, train_layers=1)
    train(loaded.model, tiny_train_ids, config, tmp_path / "run", progress=False)
    after = loaded.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, tiny_train_ids, tmp_path):
    config = TrainConfig(seed=3, steps=8, seq_len=32, batch_size=2, lr=2e-3, warmup_steps=2, checkpoint_every=4,
                         train_layers=0)
    straight = fresh(tiny_model_dir)
    train(straight.model, tiny_train_ids, config, tmp_path / "straight", progress=False)

    interrupted = fresh(tiny_model_dir)
    calls = []

    def crash_on_sixth_step(module, args, kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt

    hook = interrupted.model.register_forward_pre_hook(crash_on_sixth_step, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted.model, tiny_train_ids, config, tmp_path / "resumed", progress=False)
    hook.remove()
    resumed = fresh(tiny_model_dir)
    result = train(resumed.model, tiny_train_ids, config, tmp_path / "resumed", resume=True, progress=False)
    assert result.steps == 8 and len(result.losses) == 8
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(want["model.layers.0.mlp.up_proj.weight"],
                           fresh(tiny_model_dir).model.state_dict()["model.layers.0.mlp.up_proj.weight"])

    with pytest.raises(TrainError, match="other settings"):
        train(fresh(tiny_model_dir).model, tiny_train_ids, TrainConfig(**{**config.__dict__, "lr": 1e-3}),
              tmp_path / "resumed", resume=True, progress=False)


def test_splits_are_disjoint_by_file_and_heldout_text_unseen(tiny_loaded, tmp_path):
    folder = write_corpus(tmp_path / "texts", files=12)
    shared = "This paragraph is copied into every file, so held-out text must leave it out entirely."
    for path in folder.iterdir():
        path.write_text(path.read_text() + "\n" + shared + "\n")
    corpus = prepare_corpus(path_spec(folder, "toy"), TINY_SPLIT, tiny_loaded.tokenizer, tiny_loaded.fingerprint)
    manifest = json.loads(corpus.manifest_path.read_text())
    train_files = {f["path"] for f in manifest["train"]["list"]}
    held_files = {f["path"] for f in manifest["heldout"]["list"]}
    assert train_files and held_files and not train_files & held_files
    assert train_files | held_files <= {str(p.resolve()) for p in folder.iterdir()}
    assert manifest["train"]["tokens"] == sum(f["tokens"] for f in manifest["train"]["list"])
    assert len(corpus.train_ids) == manifest["train"]["tokens"] + len(train_files)  # an EOS after each file
    heldout = corpus.heldout_path.read_text()
    assert heldout.strip() and shared not in heldout
    train_text = "".join(Path(p).read_text() for p in train_files)
    for paragraph in filter(str.strip, heldout.split("\n\n")):
        assert paragraph.strip() not in train_text
    again = prepare_corpus(path_spec(folder, "toy"), TINY_SPLIT, tiny_loaded.tokenizer, tiny_loaded.fingerprint)
    assert np.array_equal(again.train_ids, corpus.train_ids)
    other = prepare_corpus(path_spec(folder, "toy"), SplitConfig(**{**TINY_SPLIT.__dict__, "seed": 1}),
                           tiny_loaded.tokenizer, tiny_loaded.fingerprint)
    assert {f["path"] for f in json.loads(other.manifest_path.read_text())["heldout"]["list"]} != held_files


def test_registered_expert_loads_by_name_with_the_base_tokenizer(tiny_model_dir, tiny_loaded, tmp_path, mesh_home):
    corpus = write_corpus(tmp_path / "texts")
    result = finetune_expert(job(corpus, tiny_model_dir))
    assert result.steps == 3 and result.checkpoint == mesh_home / "models" / "tiny-expert" / "converted"
    assert "tiny-expert" in {e.name for e in all_entries()}
    expert = load(LoadOptions(model="tiny-expert", device="cpu"))
    assert expert.model_id == "tiny-expert" and expert.fingerprint == tiny_loaded.fingerprint
    base_w = tiny_loaded.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(expert.model.state_dict()["model.layers.0.self_attn.q_proj.weight"], base_w)
    assert (mesh_home / "corpora" / "tiny-expert" / "manifest.json").is_file()

    from mesh_llm.cli.main import app

    listed = CliRunner().invoke(app, ["models", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "tiny-expert" in listed.output
    user_catalog_path().write_text("")
    again = finetune_expert(job(corpus, tiny_model_dir, resume=True))  # finished: registered again, not retrained
    assert again == result and user_catalog_path().read_text().count("[models.tiny-expert]") == 1
    retrained = finetune_expert(job(corpus, tiny_model_dir))  # its own entry and folder: no clash
    assert retrained.steps == 3 and user_catalog_path().read_text().count("[models.tiny-expert]") == 1


def test_missing_or_empty_corpus_is_refused_and_nothing_written(tiny_model_dir, tmp_path, mesh_home):
    with pytest.raises(CorpusError, match="does not exist"):
        finetune_expert(job(tmp_path / "nowhere", tiny_model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="is empty"):
        finetune_expert(job(tmp_path / "empty", tiny_model_dir))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("too short")
    with pytest.raises(CorpusError, match="too little text"):
        finetune_expert(job(tmp_path / "tiny", tiny_model_dir))
    assert files_under(mesh_home) == {}

    from mesh_llm.cli.main import app

    out = CliRunner().invoke(app, ["models", "finetune", "x", "--corpus", str(tmp_path / "nowhere")])
    assert out.exit_code == 1 and "does not exist" in out.output and "Traceback" not in out.output


def test_catalog_name_clash_is_refused_unless_forced(tiny_model_dir, tmp_path, mesh_home):
    corpus = write_corpus(tmp_path / "texts")
    user_catalog_path().write_text('[models.tiny-expert]\npath = "/data/someone-elses-model"\n')
    before = files_under(mesh_home)
    with pytest.raises(TrainError, match="already has 'tiny-expert'.*--force"):
        finetune_expert(job(corpus, tiny_model_dir))
    with pytest.raises(TrainError, match="built-in model"):
        finetune_expert(job(corpus, tiny_model_dir, name="smollm2-135m"))
    assert files_under(mesh_home) == before

    finetune_expert(job(corpus, tiny_model_dir, force=True))
    text = user_catalog_path().read_text()
    assert "someone-elses-model" not in text and text.count("[models.tiny-expert]") == 1
    assert load(LoadOptions(model="tiny-expert", device="cpu")).model_id == "tiny-expert"


def test_foreign_model_folder_is_refused(tiny_model_dir, tmp_path, mesh_home):
    corpus = write_corpus(tmp_path / "texts")
    foreign = mesh_home / "models" / "tiny-expert" / "weights.gguf"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    with pytest.raises(TrainError, match="not made by fine-tuning"):
        finetune_expert(job(corpus, tiny_model_dir))
    assert files_under(mesh_home) == {"models/tiny-expert/weights.gguf": b"not ours"}


def test_base_of_another_tokenizer_is_refused(tiny_model_dir, tmp_path, mesh_home):
    corpus = write_corpus(tmp_path / "texts")
    other = build_tiny_llama(tmp_path / "other-family", vocab_size=320)
    with pytest.raises(TrainError, match=r"not the tokenizer of .*--base.*--tokenizer"):
        finetune_expert(job(corpus, other, tokenizer=str(tiny_model_dir)))
    assert files_under(mesh_home) == {}


def test_register_local_replaces_only_its_own_table(tmp_path):
    from mesh_llm.errors import MeshError
    from mesh_llm.models.catalog import register_local

    user_catalog_path().write_text('# my models\n[models.mine]\npath = "/data/mine"\n\n'
                                   '[models.tiny-expert]\npath = "/old"\ndescription = "old"\n')
    entry = register_local("tiny-expert", tmp_path / "ckpt", description="new", approx_params="1M")
    text = user_catalog_path().read_text()
    assert entry.source.path == tmp_path / "ckpt" and entry.description == "new"
    assert text.startswith("# my models\n[models.mine]") and '"/old"' not in text
    assert {"mine", "tiny-expert"} <= {e.name for e in all_entries()}
    with pytest.raises(MeshError, match="only letters"):
        register_local("a.b", tmp_path, description="", approx_params="?")

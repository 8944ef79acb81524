"""Seeded, resumable causal-LM fine-tuning on one token stream (CPU friendly), and held-out scoring."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mesh_llm.errors import MeshError
from mesh_llm.models.corpora import SplitConfig

log = logging.getLogger(__name__)

STATE = "state.pt"


class TrainError(MeshError):
    """Training cannot start or continue as asked; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How one fine-tuning run optimises (the defaults are the probe's best per minute on 2 cores)."""

    seed: int = 0  # seeds torch and the order in which training blocks are visited
    steps: int = 24  # optimizer steps of the whole run
    batch_size: int = 4  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 5e-4  # peak AdamW learning rate (linear warm-up, then cosine decay to a tenth)
    warmup_steps: int = 3  # steps of linear warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    train_layers: int = 4  # train only the last N decoder layers and the final norm; 0 trains every weight
    checkpoint_every: int = 8  # steps between resumable checkpoints (and one at the end)
    threads: int = 2  # torch intra-op threads


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a training run did."""

    steps: int  # optimizer steps done in total (across resumes)
    losses: list[float]  # training loss of every step, in order
    seconds: float  # wall time spent training (across resumes)
    tokens_per_s: float  # training tokens processed per second of training


def select_trainable(model, train_layers: int) -> list:
    """Freeze everything but the last train_layers decoder layers and the final norm (0: train all)."""
    params = dict(model.named_parameters())
    if train_layers <= 0:
        for p in params.values():
            p.requires_grad_(True)
        return list(params.values())
    layers = model.model.layers
    if train_layers > len(layers):
        raise TrainError(f"train_layers={train_layers} but the model has only {len(layers)} decoder layers")
    keep = {f"model.layers.{i}." for i in range(len(layers) - train_layers, len(layers))}
    trainable = []
    for name, p in params.items():
        on = any(name.startswith(k) for k in keep) or name.startswith("model.norm.")
        p.requires_grad_(on)
        if on:
            trainable.append(p)
    return trainable


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for a 0-based step: linear warm-up, then cosine from lr down to lr/10."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def block_indices(step: int, n_blocks: int, config: TrainConfig) -> np.ndarray:
    """Indices of the training blocks of one step: a fresh seeded permutation every epoch."""
    flat = np.arange(step * config.batch_size, (step + 1) * config.batch_size)
    epochs, offsets = flat // n_blocks, flat % n_blocks
    return np.array([np.random.default_rng((config.seed, int(e))).permutation(n_blocks)[o]
                     for e, o in zip(epochs, offsets)])


def _blocks(ids: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(ids) // seq_len
    if n == 0:
        raise TrainError(f"training text has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                         "add text to the corpus or lower seq_len")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def data_digest(ids: np.ndarray) -> str:
    """sha256 of a token stream, so a resumed run can prove it sees the same data."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def _save_state(path: Path, state: dict) -> None:
    import torch

    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def _load_state(path: Path, config: TrainConfig, digest: str) -> dict:
    import torch

    state = torch.load(path, weights_only=False)
    if state["config"] != asdict(config):
        raise TrainError(f"checkpoint {path} was made with other settings ({state['config']}); "
                         "resume with the same settings, or start over without --resume")
    if state["data"] != digest:
        raise TrainError(f"checkpoint {path} was trained on other data; start over without --resume")
    return state


def train(model, train_ids: np.ndarray, config: TrainConfig, workdir: Path, *, resume: bool = False,
          progress: bool = True, max_seconds: float | None = None) -> TrainResult:
    """Fine-tune model in place on train_ids; checkpoints in workdir, and resume continues bit-exactly."""
    import torch

    torch.set_num_threads(config.threads)
    blocks = _blocks(train_ids, config.seq_len)
    trainable = select_trainable(model, config.train_layers)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path, digest = workdir / STATE, data_digest(train_ids)
    step, losses, seconds = 0, [], 0.0
    torch.manual_seed(config.seed)
    if resume and state_path.is_file():
        state = _load_state(state_path, config, digest)
        with torch.no_grad():
            for name, p in zip(names, trainable):
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, losses, seconds = state["step"], state["losses"], state["seconds"]
        log.info("resuming at step %d of %d from %s", step, config.steps, state_path)
    elif not resume:
        state_path.unlink(missing_ok=True)

    def elapsed() -> float:
        return seconds + time.perf_counter() - started

    def checkpoint():
        _save_state(state_path, {"step": step, "losses": losses, "seconds": elapsed(), "data": digest,
                                 "config": asdict(config), "rng": torch.get_rng_state(),
                                 "params": {n: p.detach().clone() for n, p in zip(names, trainable)},
                                 "optimizer": optimizer.state_dict()})

    model.train()
    start_step, started = step, time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=f"training {workdir.name}", unit="step", disable=not progress)
    while step < config.steps:
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
        batch = torch.from_numpy(blocks[block_indices(step, len(blocks), config)])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
    bar.close()
    model.eval()
    this_run = time.perf_counter() - started
    rate = (step - start_step) * config.batch_size * config.seq_len / max(this_run, 1e-9)
    return TrainResult(steps=step, losses=losses, seconds=elapsed(), tokens_per_s=rate)


def mean_nll(model, ids, seq_len: int = 512) -> float:
    """Teacher-forced mean negative log-likelihood (nats/token) of ids, scored in blocks of seq_len."""
    import torch

    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start: start + seq_len + 1]
            if len(chunk) < 2:
                break
            logits = model(input_ids=chunk[None, :-1], use_cache=False).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum")
            total, count = total + float(nll), count + len(chunk) - 1
    return total / max(count, 1)


def probe(model, train_ids: np.ndarray, heldout_ids, candidates: dict[str, TrainConfig], seconds: float,
          workdir: Path) -> list[dict]:
    """Train each candidate for `seconds` from the same weights; report held-out NLL gained per minute."""
    import torch

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = mean_nll(model, heldout_ids)
    rows = []
    for label, config in candidates.items():
        model.load_state_dict(start)
        result = train(model, train_ids, config, workdir / label, max_seconds=seconds, progress=False)
        after = mean_nll(model, heldout_ids)
        minutes = result.seconds / 60
        rows.append({"method": label, "config": asdict(config), "steps": result.steps,
                     "seconds": round(result.seconds, 1), "train_tokens_per_s": round(result.tokens_per_s, 1),
                     "heldout_nll_before": round(before, 4), "heldout_nll_after": round(after, 4),
                     "nll_drop_per_min": round((before - after) / minutes, 4),
                     "last_train_loss": round(float(np.mean(result.losses[-5:])), 4)})
        log.info("probe %s: %s", label, rows[-1])
    model.load_state_dict(start)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    return rows


# ---- domain experts: checks, corpus, training, converted checkpoint, catalog entry ----

MARKER = "mesh_finetune.json"


@dataclass(frozen=True, kw_only=True)
class ExpertJob:
    """One domain expert to fine-tune, save and register."""

    name: str  # catalog name of the new expert, e.g. py-expert
    corpus: str  # a built-in domain (python, legal, man, prose) or an existing folder / text file
    base: str = "smollm2-135m"  # catalog name or checkpoint folder that is fine-tuned
    tokenizer: str = "smollm2-135m"  # catalog name or folder whose tokenizer the base must have
    train: TrainConfig = TrainConfig()  # optimisation settings
    split: SplitConfig | None = None  # file split and text budget (None: SplitConfig defaults)
    resume: bool = False  # continue from the last checkpoint instead of starting over
    force: bool = False  # replace a catalog entry or model folder of that name that fine-tuning did not make
    eval_tokens: int = 1024  # tokens of held-out (and of training) text scored before and after
    progress: bool = True  # show a progress bar


@dataclass(frozen=True, kw_only=True)
class ExpertResult:
    """A registered expert and its scores before and after fine-tuning."""

    name: str  # catalog name
    checkpoint: Path  # the converted checkpoint folder
    domain: str  # corpus domain
    steps: int  # optimizer steps
    seconds: float  # training wall time
    base_heldout_nll: float  # base model on the domain's held-out text (nats/token)
    heldout_nll: float  # expert on the same text
    base_train_nll: float  # base model on the first eval_tokens of the training text
    train_nll: float  # expert on the same training text


def expert_dir(name: str) -> Path:
    """MESH_HOME/models/<name>/converted: where an expert's checkpoint is written."""
    from mesh_llm.paths import mesh_home

    return mesh_home() / "models" / name / "converted"


def check_name_free(name: str, force: bool) -> None:
    """Refuse (unless force) a name whose catalog entry or model folder was not made by fine-tuning."""
    from mesh_llm.models.catalog import BUILTIN, NAME_PATTERN, LocalSource, all_entries, user_catalog_path

    if not NAME_PATTERN.fullmatch(name):
        raise TrainError(f"expert name {name!r} may hold only letters, digits, '_' and '-'")
    out = expert_dir(name)
    for entry in all_entries():
        if entry.name != name:
            continue
        ours = isinstance(entry.source, LocalSource) and entry.source.path == out and (out / MARKER).is_file()
        if not ours and not force:
            where = ("a built-in model" if any(b.name == name for b in BUILTIN)
                     else f"an entry of {user_catalog_path()} that fine-tuning did not make")
            raise TrainError(f"the catalog already has {name!r} ({where}); pick another name, or pass --force "
                             "to replace that entry")
    folder = out.parent
    if folder.exists() and any(folder.iterdir()) and not (out / MARKER).is_file() and not force:
        raise TrainError(f"{folder} already holds files not made by fine-tuning; pick another name, "
                         "or pass --force to replace them")


def _corpus_spec(job: ExpertJob):
    from mesh_llm.models.corpora import builtin_domains, path_spec

    domains = builtin_domains()
    return domains[job.corpus] if job.corpus in domains else path_spec(Path(job.corpus), domain=job.name)


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from mesh_llm.models.catalog import resolve
    from mesh_llm.models.loading import checkpoint_for

    return AutoTokenizer.from_pretrained(checkpoint_for(resolve(name)))


def check_tokenizer(loaded, expected: str) -> str:
    """The base's tokenizer fingerprint; raises TrainError when it differs from the expected model's."""
    from mesh_llm.models.fingerprint import tokenizer_fingerprint

    if expected == loaded.model_id:
        return loaded.fingerprint
    want = tokenizer_fingerprint(_load_tokenizer(expected))
    if want != loaded.fingerprint:
        raise TrainError(f"base model {loaded.model_id} has tokenizer {loaded.fingerprint[:12]}, not the tokenizer "
                         f"of {expected} ({want[:12]}), so its expert could never be mixed with that family; "
                         f"pass --base a checkpoint of {expected}'s family, or --tokenizer {loaded.model_id} "
                         "to fine-tune for that family instead")
    return want


def _save_expert(job: ExpertJob, loaded, fingerprint: str, record: dict) -> Path:
    import json
    import shutil

    from transformers import AutoTokenizer

    from mesh_llm.models.fingerprint import tokenizer_fingerprint

    out = expert_dir(job.name)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    loaded.model.save_pretrained(staging, safe_serialization=True)
    loaded.tokenizer.save_pretrained(staging)
    saved = tokenizer_fingerprint(AutoTokenizer.from_pretrained(staging))
    if saved != fingerprint:
        shutil.rmtree(staging)
        raise TrainError(f"the saved tokenizer of {job.name} has fingerprint {saved[:12]}, not {fingerprint[:12]}")
    (staging / MARKER).write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return out


def _finished(job: ExpertJob) -> ExpertResult | None:
    import json

    marker = expert_dir(job.name) / MARKER
    if not (job.resume and marker.is_file()):
        return None
    record = json.loads(marker.read_text())
    if record.get("train") != asdict(job.train) or record.get("base") != job.base:
        return None
    log.info("expert %s is already trained with these settings (%s)", job.name, marker)
    return ExpertResult(**{f: Path(record[f]) if f == "checkpoint" else record[f]
                           for f in ExpertResult.__dataclass_fields__})


def finetune_expert(job: ExpertJob) -> ExpertResult:
    """Fine-tune the base on one corpus, write it as a converted checkpoint and register it in the catalog."""
    from mesh_llm.models.catalog import register_local, resolve
    from mesh_llm.models.corpora import check_corpus

    check_name_free(job.name, job.force)
    spec = _corpus_spec(job)
    check_corpus(spec)
    outcome = _finished(job) or _train_expert(job, spec)
    base_entry = resolve(job.base)
    register_local(job.name, outcome.checkpoint, description=f"{base_entry.name} fine-tuned on {spec.description}",
                   approx_params=base_entry.approx_params)
    log.info("expert %s: held-out NLL %.3f (base %.3f), in %s", job.name, outcome.heldout_nll,
             outcome.base_heldout_nll, outcome.checkpoint)
    return outcome


def _train_expert(job: ExpertJob, spec) -> ExpertResult:
    import json

    from mesh_llm.models.corpora import prepare_corpus
    from mesh_llm.models.loading import LoadOptions, load
    from mesh_llm.paths import mesh_home

    loaded = load(LoadOptions(model=job.base, device="cpu", dtype="float32"))
    fingerprint = check_tokenizer(loaded, job.tokenizer)
    corpus = prepare_corpus(spec, job.split or SplitConfig(), loaded.tokenizer, fingerprint)
    heldout = loaded.tokenizer(corpus.heldout_path.read_text(), add_special_tokens=False)["input_ids"]
    heldout, train_sample = heldout[: job.eval_tokens], corpus.train_ids[: job.eval_tokens]
    workdir = mesh_home() / "finetune" / job.name
    workdir.mkdir(parents=True, exist_ok=True)
    base_eval = workdir / "base_eval.json"
    if not (job.resume and base_eval.is_file()):
        base_eval.write_text(json.dumps({"heldout": mean_nll(loaded.model, heldout),
                                         "train": mean_nll(loaded.model, train_sample)}))
    base_scores = json.loads(base_eval.read_text())
    result = train(loaded.model, corpus.train_ids, job.train, workdir, resume=job.resume, progress=job.progress)
    outcome = ExpertResult(
        name=job.name, checkpoint=expert_dir(job.name), domain=spec.domain, steps=result.steps,
        seconds=round(result.seconds, 1), base_heldout_nll=base_scores["heldout"],
        heldout_nll=mean_nll(loaded.model, heldout), base_train_nll=base_scores["train"],
        train_nll=mean_nll(loaded.model, train_sample))
    record = {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(outcome).items()},
              "base": job.base, "tokenizer_fingerprint": fingerprint, "train": asdict(job.train),
              "corpus_manifest": str(corpus.manifest_path), "heldout_text": str(corpus.heldout_path),
              "final_train_loss": float(np.mean(result.losses[-10:]))}
    _save_expert(job, loaded, fingerprint, record)
    (workdir / "result.json").write_text(json.dumps(record, indent=1))
    return outcome

"""Local text corpora for domain experts: collection on this machine, file-disjoint splits, manifests."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import random
import re
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mesh_llm.errors import MeshError
from mesh_llm.paths import mesh_home

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HELDOUT_TEXT = "heldout.txt"
TRAIN_TOKENS = "train_tokens.npy"
# changelogs are never read: recent ones are reserved for held-out evaluation elsewhere
REFUSED_NAME = re.compile(r"changelog", re.IGNORECASE)
# fortune files that are not English prose (code, ASCII art, Linux and Debian jokes, other languages)
NOT_PROSE = ("ascii-art", "computers", "debian", "linux", "linuxcookie", "perl", "knghtbrd", "translate-me",
             "definitions", "disclaimer")


class CorpusError(MeshError):
    """A corpus is missing, empty or unreadable; the message names the path and the fix."""


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """Where a domain's text files are and how to read them."""

    domain: str  # short name; also the folder MESH_HOME/corpora/<domain>
    description: str  # one line: what the text is and where it comes from
    globs: tuple[str, ...]  # absolute glob patterns (** recursive) of the files to read
    exclude: tuple[str, ...] = ()  # a file whose path contains one of these substrings is skipped
    reader: str = "auto"  # text, gzip, fortune, or auto (gzip for *.gz, else text)
    min_chars: int = 200  # shorter files are skipped (stubs, redirects)
    max_chars: int = 120_000  # longer files are skipped (generated code, data tables)
    hint: str = ""  # what to install or check when no file matches


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """How files are split between training and held-out, and how much text is used."""

    seed: int = 0  # shuffles the file order that decides each file's split
    heldout_tokens: int = 12_000  # whole files go to held-out until their tokens reach this
    max_train_tokens: int = 400_000  # whole files go to training until their tokens reach this
    heldout_text_tokens: int = 4096  # tokens of held-out text written to heldout.txt for evaluation


@dataclass(frozen=True, kw_only=True)
class PreparedCorpus:
    """A domain split, tokenized and saved under MESH_HOME/corpora."""

    domain: str  # the corpus's domain name
    folder: Path  # MESH_HOME/corpora/<domain>
    train_ids: np.ndarray  # int32 token ids of every training file, an EOS after each file
    heldout_path: Path  # held-out text for evaluation (never seen in training)
    manifest_path: Path  # JSON: files of each split with their token counts


def _purelib() -> str:
    return sysconfig.get_paths()["purelib"]


def builtin_domains() -> dict[str, CorpusSpec]:
    """The four domains found on a Debian machine with this package's virtual environment."""
    return {
        "python": CorpusSpec(domain="python", description="Python source of the installed packages (site-packages)",
                             globs=(f"{_purelib()}/**/*.py",), exclude=("/mesh_llm/", "/_pb2"),
                             hint="install the package's virtual environment (make install)"),
        "legal": CorpusSpec(domain="legal", description="license and copyright text (/usr/share/common-licenses, "
                            "/usr/share/doc/*/copyright)",
                            globs=("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"), reader="text"),
        "man": CorpusSpec(domain="man", description="English manual pages, troff source (/usr/share/man/man1-8, "
                          "without the generated gcloud pages)",
                          globs=("/usr/share/man/man[1-8]/*.gz",), reader="gzip", max_chars=60_000,
                          exclude=("/gcloud",)),  # 16k generated pages of one cloud tool would swamp the rest
        "prose": CorpusSpec(domain="prose", description="English prose, quotations and verse from the Debian "
                            "package fortunes (/usr/share/games/fortunes)",
                            globs=("/usr/share/games/fortunes/*",), exclude=(".dat", ".u8"), reader="fortune",
                            max_chars=400_000, hint="apt-get install fortunes"),
    }


def path_spec(path: Path, domain: str) -> CorpusSpec:
    """A corpus of every text file under path (or the file itself); raises CorpusError when path is missing."""
    path = path.expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist; pass an existing folder or text file, "
                          f"or one of the built-in domains: {', '.join(builtin_domains())}")
    pattern = str(path.resolve() / "**" / "*") if path.is_dir() else str(path.resolve())
    return CorpusSpec(domain=domain, description=f"text files under {path}", globs=(pattern,),
                      max_chars=2_000_000)


def _read(path: Path, reader: str) -> str | None:
    if reader == "auto":
        reader = "gzip" if path.suffix == ".gz" else "text"
    try:
        raw = gzip.decompress(path.read_bytes()) if reader == "gzip" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in raw[:4096]:
        return None  # binary
    text = raw.decode("utf-8", errors="replace")
    if reader == "fortune":
        text = re.sub(r"\n%\n", "\n\n", "\n" + text).strip() + "\n"
    return text


def candidate_files(spec: CorpusSpec) -> list[Path]:
    """Every file the spec's patterns match, sorted, without refused names and excluded paths."""
    found = set()
    for pattern in spec.globs:
        for name in glob.glob(pattern, recursive=True):
            path = Path(name)
            if (path.is_file() and not REFUSED_NAME.search(path.name)
                    and not any(x in name for x in spec.exclude)
                    and not (spec.domain == "prose" and path.name in NOT_PROSE)):
                found.add(path)
    return sorted(found)


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _para_key(paragraph: str) -> str:
    return hashlib.sha1(" ".join(paragraph.split()).encode()).hexdigest()


def _split_signature(spec: CorpusSpec, split: SplitConfig, fingerprint: str) -> dict:
    return {"spec": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
            "split": asdict(split), "tokenizer_fingerprint": fingerprint}


def corpus_folder(domain: str) -> Path:
    """MESH_HOME/corpora/<domain>: manifest, held-out text and training tokens of one domain."""
    return mesh_home() / "corpora" / domain


def load_prepared(domain: str, spec: CorpusSpec, split: SplitConfig, fingerprint: str) -> PreparedCorpus | None:
    """The corpus prepared earlier with exactly these settings, or None."""
    folder = corpus_folder(domain)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        ids = np.load(folder / TRAIN_TOKENS)
    except (OSError, ValueError):
        return None
    if manifest.get("signature") != _split_signature(spec, split, fingerprint):
        return None
    return PreparedCorpus(domain=domain, folder=folder, train_ids=ids, heldout_path=folder / HELDOUT_TEXT,
                          manifest_path=folder / MANIFEST)


def check_corpus(spec: CorpusSpec) -> list[Path]:
    """The spec's candidate files; raises CorpusError naming the fix when there are none."""
    files = candidate_files(spec)
    if not files:
        fix = spec.hint or "point it at a folder that holds text files"
        raise CorpusError(f"corpus {spec.domain!r} is empty: no file matches {', '.join(spec.globs)}; {fix}")
    return files


def prepare_corpus(spec: CorpusSpec, split: SplitConfig, tokenizer, fingerprint: str) -> PreparedCorpus:
    """Read, split by file, tokenize and save one domain (reusing an identical earlier preparation)."""
    earlier = load_prepared(spec.domain, spec, split, fingerprint)
    if earlier is not None:
        log.info("corpus %s: reusing %s", spec.domain, earlier.folder)
        return earlier
    files = check_corpus(spec)
    random.Random(split.seed).shuffle(files)
    seen, heldout, train = set(), [], []
    train_tokens = heldout_tokens = 0
    for path in files:
        if train_tokens >= split.max_train_tokens:
            break
        text = _read(path, spec.reader)
        if text is None or not spec.min_chars <= len(text) <= spec.max_chars:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            continue  # same content under another name
        seen.add(digest)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        record = {"path": str(path), "sha256": digest, "tokens": len(ids), "text": text, "ids": ids}
        if heldout_tokens < split.heldout_tokens:
            heldout.append(record)
            heldout_tokens += len(ids)
        else:
            train.append(record)
            train_tokens += len(ids)
    if not train or not heldout:
        raise CorpusError(f"corpus {spec.domain!r} has too little text ({len(heldout) + len(train)} usable files "
                          f"of {len(files)}); it needs files of {spec.min_chars}-{spec.max_chars} characters "
                          "for both a training and a held-out split")
    return _save(spec, split, fingerprint, tokenizer, train, heldout, len(files))


def _heldout_text(train: list[dict], heldout: list[dict], tokenizer, limit: int) -> tuple[str, int, int]:
    train_keys = {_para_key(p) for r in train for p in _paragraphs(r["text"])}
    kept, dropped, tokens = [], 0, 0
    for record in heldout:
        for paragraph in _paragraphs(record["text"]):
            if _para_key(paragraph) in train_keys:
                dropped += 1
                continue
            kept.append(paragraph)
            tokens += len(tokenizer(paragraph + "\n\n", add_special_tokens=False)["input_ids"])
            if tokens >= limit:
                return "\n\n".join(kept) + "\n", tokens, dropped
        kept.append("")  # a blank paragraph marks the end of a file
    return "\n\n".join(kept).strip() + "\n", tokens, dropped


def _save(spec, split, fingerprint, tokenizer, train, heldout, candidates) -> PreparedCorpus:
    folder = corpus_folder(spec.domain)
    folder.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    ids = np.array([t for r in train for t in [*r["ids"], eos]], dtype=np.int32)
    text, text_tokens, dropped = _heldout_text(train, heldout, tokenizer, split.heldout_text_tokens)
    (folder / HELDOUT_TEXT).write_text(text)
    np.save(folder / TRAIN_TOKENS, ids)

    def listing(records):
        return {"files": len(records), "tokens": sum(r["tokens"] for r in records),
                "list": [{k: r[k] for k in ("path", "sha256", "tokens")} for r in records]}

    manifest = {
        "domain": spec.domain, "description": spec.description, "signature": _split_signature(spec, split, fingerprint),
        "candidate_files": candidates, "excluded_names": REFUSED_NAME.pattern,
        "train": listing(train), "heldout": listing(heldout),
        "heldout_text": {"path": str(folder / HELDOUT_TEXT), "tokens": text_tokens,
                         "paragraphs_dropped_as_seen_in_training": dropped},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("corpus %s: %d train files (%d tokens), %d held-out files (%d tokens), heldout.txt %d tokens",
             spec.domain, len(train), manifest["train"]["tokens"], len(heldout), manifest["heldout"]["tokens"],
             text_tokens)
    return PreparedCorpus(domain=spec.domain, folder=folder, train_ids=ids, heldout_path=folder / HELDOUT_TEXT,
                          manifest_path=folder / MANIFEST)

"""Held-out evaluation text written after the default model was trained, in three genres, with a manifest.

    .venv/bin/python experiments/heldout_corpus.py                  # check the manifest and print each genre's size
    .venv/bin/python experiments/heldout_corpus.py --build          # choose the text again and rewrite the manifest
    .venv/bin/python experiments/heldout_corpus.py --show code      # print one genre's text

SmolLM2-135M was released in November 2024, so only text dated 2025-01-01 or later is used:

- changelog: Debian changelog entries (/usr/share/doc/*/changelog.Debian.gz) whose trailer date is
  2025 or later, one distinct entry text once (binary packages of one source share a changelog);
- release-notes: sections of the Google Cloud CLI release notes headed by a release date in 2025 or later;
- code: hand-written Python modules of the Google Cloud CLI (googlecloudsdk/command_lib) whose
  copyright header says 2025 or later, without that header (it is licence boilerplate).

None of these files can be read by the fine-tuning corpora (mesh_llm.models.corpora refuses every
changelog, and no domain globs the Cloud CLI tree); `--build` checks this file by file. The manifest
(meshlab/heldout_manifest.json) keeps each file's path, sha256 and dates, never the text: the text is
re-extracted from the files (only the entries of the recorded dates, so a package update that adds a
changelog entry changes nothing) and checked against the recorded text hash.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from email.utils import parsedate_to_datetime
from pathlib import Path

CUTOFF = date(2025, 1, 1)
MANIFEST = Path(__file__).resolve().parent / "meshlab" / "heldout_manifest.json"
CLOUD_SDK = Path("/usr/lib/google-cloud-sdk")
CHANGELOG_GLOB = "/usr/share/doc/*/changelog.Debian.gz"
GENRES = ("changelog", "release-notes", "code")
CHARS_PER_GENRE = 24_000  # about 6,000 tokens of each genre; runs score a prefix of it
PIECE_CHARS = 3_000  # a longer piece is cut at a line end, so no single file dominates a genre

_TRAILER = re.compile(r"^ -- .*?>  (?P<date>.+)$")
_RELEASE = re.compile(r"^## (?P<version>\S+) \((?P<date>\d{4}-\d{2}-\d{2})\)\s*$")
_COPYRIGHT = re.compile(r"^# Copyright (?P<year>\d{4}) ")


class HeldoutError(RuntimeError):
    """The held-out text cannot be rebuilt as recorded; the message names the file and the fix."""


@dataclass(frozen=True, kw_only=True)
class Piece:
    genre: str  # changelog, release-notes or code
    path: str  # file the text comes from
    dated: str  # ISO date of the text (entry trailer, release heading), or the copyright year of a module
    text: str  # the extracted text


def changelog_entries(text: str, path: str) -> Iterator[Piece]:
    """Entries of a Debian changelog dated on or after CUTOFF."""
    lines: list[str] = []
    for line in text.splitlines():
        lines.append(line)
        trailer = _TRAILER.match(line)
        if trailer:
            entry = "\n".join(lines).strip("\n")
            lines = []
            try:
                when = parsedate_to_datetime(trailer["date"].strip()).date()
            except (TypeError, ValueError):
                continue
            if when >= CUTOFF:
                yield Piece(genre="changelog", path=path, dated=when.isoformat(), text=entry)


def release_sections(text: str, path: str) -> Iterator[Piece]:
    """Sections of a release-notes file whose '## VERSION (YYYY-MM-DD)' heading is on or after CUTOFF."""
    heading, body = None, []
    for line in [*text.splitlines(), "## end (0001-01-01)"]:
        match = _RELEASE.match(line)
        if match:
            if heading and date.fromisoformat(heading["date"]) >= CUTOFF:
                yield Piece(genre="release-notes", path=path, dated=heading["date"], text="\n".join(body).strip())
            heading, body = match, [line]
        elif heading:
            body.append(line)


def dated_module(text: str, path: str) -> Iterator[Piece]:
    """A Python module whose copyright header year is on or after CUTOFF's, without its header comments."""
    lines = text.splitlines()
    year = next((int(m["year"]) for m in map(_COPYRIGHT.match, lines[:5]) if m), None)
    if year is None or year < CUTOFF.year:
        return
    start = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    body = "\n".join(lines[start:]).strip()
    if len(body) >= 400:  # package markers and one-line stubs say nothing
        yield Piece(genre="code", path=path, dated=str(year), text=body)


def _read(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", errors="replace")


EXTRACTORS = {"changelog": changelog_entries, "release-notes": release_sections, "code": dated_module}


def source_files(genre: str) -> list[Path]:
    """Candidate files of one genre on this machine, sorted."""
    if genre == "changelog":
        return sorted(Path("/").glob(CHANGELOG_GLOB.lstrip("/")))
    if genre == "release-notes":
        return [CLOUD_SDK / "RELEASE_NOTES"] if (CLOUD_SDK / "RELEASE_NOTES").exists() else []
    if genre == "code":  # ordered by a hash of the path, so the chosen modules spread over the whole tree
        modules = (CLOUD_SDK / "lib" / "googlecloudsdk" / "command_lib").rglob("*.py")
        return sorted(modules, key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    raise HeldoutError(f"unknown genre {genre!r}; known: {', '.join(GENRES)}")


def choose(genre: str, budget: int = CHARS_PER_GENRE, recorded: dict[str, set[str]] | None = None) -> list[Piece]:
    """Up to budget characters of a genre, newest piece per file first; recorded (path: dates) re-picks a manifest's."""
    per_file, seen = [], set()
    for path in source_files(genre) if recorded is None else [Path(p) for p in recorded]:
        pieces = []
        for piece in EXTRACTORS[genre](_read(path), str(path)):
            key = _body_key(piece)
            if key not in seen:
                seen.add(key)
                if recorded is None or piece.dated in recorded[str(path)]:
                    pieces.append(_cut(piece))
        if pieces:
            per_file.append(sorted(pieces, key=lambda p: p.dated, reverse=True))
    chosen, used, depth = [], 0, 0
    while used < budget and any(depth < len(p) for p in per_file):
        for pieces in per_file:
            if depth < len(pieces) and used < budget:
                chosen.append(pieces[depth])
                used += len(pieces[depth].text)
        depth += 1
    return chosen


def _cut(piece: Piece) -> Piece:
    if len(piece.text) <= PIECE_CHARS:
        return piece
    end = piece.text.rfind("\n", 0, PIECE_CHARS)
    return Piece(genre=piece.genre, path=piece.path, dated=piece.dated, text=piece.text[: end if end > 0 else PIECE_CHARS])


def _body_key(piece: Piece) -> str:
    """Entries repeated across binary packages differ only in the package name (first line) and time (last)."""
    lines = piece.text.splitlines()
    body = lines[1:-1] if piece.genre == "changelog" else lines
    return hashlib.sha256("\n".join(body).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def training_overlap(paths: list[str]) -> list[str]:
    """The paths any built-in fine-tuning corpus would read (must be none)."""
    from mesh_llm.models.corpora import builtin_domains, candidate_files

    wanted = {str(Path(p).resolve()) for p in paths}
    return sorted(wanted & {str(f.resolve()) for spec in builtin_domains().values() for f in candidate_files(spec)})


def build_manifest(budget: int = CHARS_PER_GENRE) -> dict:
    """Choose every genre's text and describe it (paths, sha256, dates, text hash), never the text itself."""
    genres = {}
    for genre in GENRES:
        pieces = choose(genre, budget)
        if not pieces:
            raise HeldoutError(f"no {genre} text dated {CUTOFF} or later on this machine "
                               f"(looked in {CHANGELOG_GLOB if genre == 'changelog' else CLOUD_SDK})")
        files = []
        for path in dict.fromkeys(p.path for p in pieces):
            dates = sorted({p.dated for p in pieces if p.path == path})
            files.append({"path": path, "sha256": sha256_file(Path(path)), "dates": dates})
        text = join(pieces)
        genres[genre] = {"files": files, "pieces": len(pieces), "chars": len(text),
                         "first_date": min(p.dated for p in pieces), "last_date": max(p.dated for p in pieces),
                         "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    overlap = training_overlap([f["path"] for g in genres.values() for f in g["files"]])
    if overlap:
        raise HeldoutError(f"held-out files are also fine-tuning text: {', '.join(overlap[:5])}; "
                           "exclude them in experiments/heldout_corpus.py")
    return {"cutoff": CUTOFF.isoformat(), "chars_per_genre": budget, "genres": genres}


def join(pieces: list[Piece]) -> str:
    """The genre's text: its pieces in order, a blank line between them."""
    return "\n\n".join(p.text for p in pieces) + "\n"


def load_texts(manifest_path: Path = MANIFEST) -> dict[str, str]:
    """Every genre's text re-extracted from the files the manifest names, checked against its hashes."""
    if not Path(manifest_path).exists():
        raise HeldoutError(f"{manifest_path} is missing; run .venv/bin/python experiments/heldout_corpus.py --build")
    manifest = json.loads(Path(manifest_path).read_text())
    texts = {}
    for genre, entry in manifest["genres"].items():
        missing = [f["path"] for f in entry["files"] if not Path(f["path"]).exists()]
        if missing:
            raise HeldoutError(f"{missing[0]} is missing ({len(missing)} {genre} file(s) in all); install its package "
                               "or rebuild with experiments/heldout_corpus.py --build (the figures change)")
        recorded = {f["path"]: set(f["dates"]) for f in entry["files"]}
        text = join(choose(genre, manifest["chars_per_genre"], recorded))
        if hashlib.sha256(text.encode()).hexdigest() != entry["text_sha256"]:
            raise HeldoutError(f"the {genre} text extracted now differs from the manifest's (an entry of a recorded "
                               "date changed); rebuild it with experiments/heldout_corpus.py --build")
        texts[genre] = text
    return texts


def main(argv: list[str] | None = None) -> int:
    """Build or check the manifest and print what each genre holds."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help="choose the text again and rewrite the manifest")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--show", choices=GENRES, help="print this genre's text")
    args = p.parse_args(argv)
    if args.build:
        args.manifest.write_text(json.dumps(build_manifest(), indent=1) + "\n")
    texts = load_texts(args.manifest)
    if args.show:
        print(texts[args.show])
        return 0
    manifest = json.loads(args.manifest.read_text())
    for genre, entry in manifest["genres"].items():
        print(f"{genre}: {entry['pieces']} pieces from {len(entry['files'])} files, {entry['chars']:,} chars, "
              f"dated {entry['first_date']} to {entry['last_date']}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except HeldoutError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

